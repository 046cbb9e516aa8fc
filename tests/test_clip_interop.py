"""CLIP weights from and to Hugging Face, OpenAI and open_clip formats, checked against transformers' CLIPModel
on tiny models whose every weight (LayerNorms and biases included) is random, so no wrong mapping can pass."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vlkit
from vlkit.errors import VlkitError
from vlkit.models.clip.convert import (
    HF_DEFAULTS,
    HF_TEXT_DEFAULTS,
    HF_VISION_DEFAULTS,
    clip_config_from_hf,
    clip_config_from_state,
    convert_state_dict,
    detect_format,
    export_hf,
    load_clip,
)
from vlkit.models.io import load_model, save_model

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, IMAGE, ATOL = 100, 16, 32, 1e-5
#: (hidden_act, HF eos_token_id, token that ends the texts, LayerNorm eps (vision, text)). HF pools at the first
#: eos_token_id, except for eos_token_id == 2 (legacy configs), where it pools at the highest id.
CASES = {
    "quick_gelu-eos99": ("quick_gelu", 99, 99, (1e-5, 1e-5)),
    "gelu-argmax": ("gelu", 2, 99, (1e-5, 1e-5)),
    "gelu-eos7": ("gelu", 7, 7, (1e-3, 1e-4)),  # texts also hold ids above 7: argmax pooling would be wrong
}
# the builder arguments that make clip-tiny the size of the tiny HF model
TINY = dict(vocab_size=VOCAB, context_length=CONTEXT)


def tiny_hf(act: str, eos: int, seed: int = 0, width: int = 64, eps: tuple[float, float] = (1e-5, 1e-5)):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, hidden_act=act, eos_token_id=eos,
                         bos_token_id=1, pad_token_id=0, layer_norm_eps=eps[1]),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMAGE, patch_size=8, hidden_act=act,
                           layer_norm_eps=eps[0]),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            nn.init.normal_(param, std=0.3)
        model.logit_scale.fill_(math.log(1 / 0.07))
    return model


def inputs(end_token: int, seed: int = 1):
    """Random pixels, and token ids with exactly one end token followed by padding (0), with their mask."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    lengths = [3, 7, 11, CONTEXT - 1]
    ids = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB - 1, (n,), generator=g)
        tokens[tokens == end_token] = end_token + 1
        ids[row, :n] = tokens
        ids[row, n] = end_token
    mask = (ids != 0).long()
    return pixels, ids, mask


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


@torch.no_grad()
def assert_matches_hf(model, hf, end_token: int):
    model.eval()
    pixels, ids, mask = inputs(end_token)
    hf_image = nn.functional.normalize(_features(hf.get_image_features(pixel_values=pixels)), dim=-1)
    hf_text = nn.functional.normalize(_features(hf.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
    hf_logits = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image
    torch.testing.assert_close(model.encode_image(pixels), hf_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.encode_text(ids, mask), hf_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(pixels, ids, mask).logits_per_image, hf_logits, atol=ATOL, rtol=0)


def to_openai(hf_state: dict) -> dict:
    """Hugging Face CLIPModel keys -> OpenAI CLIP keys (written here from the documented names, independently
    of vlkit's key map)."""
    s = {k: v.clone() for k, v in hf_state.items() if not k.endswith("position_ids")}
    out = {
        "visual.conv1.weight": s.pop("vision_model.embeddings.patch_embedding.weight"),
        "visual.class_embedding": s.pop("vision_model.embeddings.class_embedding"),
        "visual.positional_embedding": s.pop("vision_model.embeddings.position_embedding.weight"),
        "visual.proj": s.pop("visual_projection.weight").t().contiguous(),
        "token_embedding.weight": s.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": s.pop("text_model.embeddings.position_embedding.weight"),
        "text_projection": s.pop("text_projection.weight").t().contiguous(),
        "logit_scale": s.pop("logit_scale"),
    }
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = s.pop(f"vision_model.pre_layrnorm.{p}")
        out[f"visual.ln_post.{p}"] = s.pop(f"vision_model.post_layernorm.{p}")
        out[f"ln_final.{p}"] = s.pop(f"text_model.final_layer_norm.{p}")
    for hf_tower, oa_prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            src, dst = f"{hf_tower}.encoder.layers.{i}.", f"{oa_prefix}.resblocks.{i}."
            for p in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{p}"] = torch.cat(
                    [s.pop(f"{src}self_attn.{x}_proj.{p}") for x in ("q", "k", "v")])
                out[f"{dst}attn.out_proj.{p}"] = s.pop(f"{src}self_attn.out_proj.{p}")
                out[f"{dst}ln_1.{p}"] = s.pop(f"{src}layer_norm1.{p}")
                out[f"{dst}ln_2.{p}"] = s.pop(f"{src}layer_norm2.{p}")
                out[f"{dst}mlp.c_fc.{p}"] = s.pop(f"{src}mlp.fc1.{p}")
                out[f"{dst}mlp.c_proj.{p}"] = s.pop(f"{src}mlp.fc2.{p}")
    assert not s, f"unconverted keys {sorted(s)}"
    return out


def scripted(state: dict) -> torch.jit.ScriptModule:
    """A TorchScript module whose state_dict is ``state`` (like the archives of OpenAI's release)."""
    root = nn.Module()
    for key, value in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        return torch.jit.script(root)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A tiny HF CLIP saved with save_pretrained (safetensors), for each activation / pooling case."""
    act, eos, end, eps = CASES[request.param]
    hf = tiny_hf(act, eos, eps=eps)
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(directory)
    return {"act": act, "eos": eos, "end": end, "eps": eps, "hf": hf, "dir": directory}


@pytest.fixture(scope="module")
def openai_case(tmp_path_factory):
    """The quick_gelu case (its end token 99 is the highest id, so OpenAI's argmax pooling agrees), with
    heads 64 wide as OpenAI's checkpoints (whose head count is inferred as width // 64)."""
    act, eos, end, _ = CASES["quick_gelu-eos99"]
    hf = tiny_hf(act, eos, seed=3, width=128)
    return {"hf": hf, "end": end, "state": to_openai(hf.state_dict()), "dir": tmp_path_factory.mktemp("openai")}


# --------------------------------------------------------------------------------------------------------------


def test_hf_defaults_match_transformers():
    text, vision = transformers.CLIPTextConfig().to_dict(), transformers.CLIPVisionConfig().to_dict()
    top = transformers.CLIPConfig().to_dict()
    assert {k: text[k] for k in HF_TEXT_DEFAULTS} == HF_TEXT_DEFAULTS
    assert {k: vision[k] for k in HF_VISION_DEFAULTS} == HF_VISION_DEFAULTS
    assert {k: top[k] for k in HF_DEFAULTS} == HF_DEFAULTS


def test_load_hf_directory(case):
    assert detect_format(case["dir"]) == "hf"
    model = load_clip(case["dir"])
    assert model.config.text.act == model.config.vision.act == case["act"]
    assert model.config.text.eos_token_id == (None if case["eos"] == 2 else case["eos"])
    assert (model.config.vision.norm_eps, model.config.text.norm_eps) == case["eps"]
    assert model.config.preprocess.context_length == CONTEXT and model.config.preprocess.image_size == IMAGE
    assert_matches_hf(model, case["hf"], case["end"])
    # the same weights through the registry into a named size
    eos = None if case["eos"] == 2 else case["eos"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        named = vlkit.create_model("clip-tiny", pretrained=case["dir"], act=case["act"], eos_token_id=eos, **TINY)
    if case["eps"] == (1e-5, 1e-5):  # clip-tiny's LayerNorm eps
        assert not caught
        assert_matches_hf(named, case["hf"], case["end"])
    else:
        assert any("norm_eps is 0.001 but the model uses 1e-05" in str(w.message) for w in caught)
    # a named size whose activation differs from the checkpoint's loads with a warning
    other = "gelu" if case["act"] == "quick_gelu" else "quick_gelu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vlkit.create_model("clip-tiny", pretrained=case["dir"], act=other, **TINY)
    assert any(f"act is '{case['act']}' but the model uses '{other}'" in str(w.message) for w in caught)


def test_load_hf_bin_with_tokenizer_and_preprocessor(case, tmp_path):
    from vlkit.data.text import TextTokenizer, build_word_tokenizer

    directory = tmp_path / "hf-bin"
    directory.mkdir()
    shutil.copy(case["dir"] / "config.json", directory)
    state = dict(case["hf"].state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]  # older checkpoints kept these
    torch.save(state, directory / "pytorch_model.bin")
    build_word_tokenizer(["a red square", "a blue circle"]).save(directory)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    assert detect_format(directory) == "hf"
    model = load_clip(directory)
    assert_matches_hf(model, case["hf"], case["end"])
    assert model.preprocess.tokenizer == str((directory / "tokenizer.json").resolve())
    assert TextTokenizer(model.preprocess.tokenizer)(["a red circle"])["input_ids"].shape[0] == 1
    assert tuple(model.preprocess.mean) == tuple(mean) and tuple(model.preprocess.std) == tuple(std)


def test_export_hf_round_trip(case, tmp_path):
    model = load_clip(case["dir"]).eval()
    out = export_hf(model, tmp_path / "exported")
    assert detect_format(out) == "hf"
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    assert_matches_hf(model, reloaded, case["end"])
    assert_matches_hf(load_clip(out), case["hf"], case["end"])
    config = load_clip(out).config
    assert (config.vision, config.text, config.embed_dim) == (model.config.vision, model.config.text, 32)
    # exporting again replaces the directory
    export_hf(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_export_argmax_pooling_and_clamped_scale(tmp_path):
    """A vlkit model pooling at the highest id (eos None) exports as HF eos_token_id 2; a logit scale above
    max_logit_scale is written clamped, since HF does not clamp."""
    torch.manual_seed(5)
    model = vlkit.create_model("clip-tiny", act="quick_gelu", eos_token_id=None, max_logit_scale=20.0, **TINY).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.0)  # exp(4) = 54.6 > 20
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["text_config"]["eos_token_id"] == 2
    assert_matches_hf(model, transformers.CLIPModel.from_pretrained(out).eval(), end_token=VOCAB - 1)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    with pytest.raises(VlkitError, match="eos_token_id 2"):
        export_hf(vlkit.create_model("clip-tiny", eos_token_id=2, **TINY), tmp_path / "a")
    model = vlkit.create_model("clip-tiny", **TINY)
    model.config.vision.pool = "mean"
    with pytest.raises(VlkitError, match="pool='mean'"):
        export_hf(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_openai_state_dict(openai_case):
    path = openai_case["dir"] / "ViT-tiny.pt"
    torch.save(openai_case["state"], path)
    assert detect_format(path) == "openai" and detect_format(openai_case["state"]) == "openai"
    model = load_clip(path)
    assert model.config.text.eos_token_id is None and model.config.vision.act == "quick_gelu"
    assert_matches_hf(model, openai_case["hf"], openai_case["end"])
    named = vlkit.create_model("clip-tiny", pretrained=path, act="quick_gelu", vision_width=128, text_width=128,
                               **TINY)
    assert_matches_hf(named, openai_case["hf"], openai_case["end"])


def test_openai_torchscript_archive(openai_case):
    state = dict(openai_case["state"])
    # the release's archives also hold these scalars, which carry no weights
    state.update(input_resolution=torch.tensor(IMAGE), context_length=torch.tensor(CONTEXT),
                 vocab_size=torch.tensor(VOCAB))
    path = openai_case["dir"] / "ViT-tiny-jit.pt"
    scripted(state).save(str(path))
    assert detect_format(path) == "openai"
    assert_matches_hf(load_clip(path), openai_case["hf"], openai_case["end"])


def test_open_clip_checkpoints(openai_case):
    wrapped = {"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in openai_case["state"].items()}}
    path = openai_case["dir"] / "epoch_3.pt"
    torch.save(wrapped, path)
    assert detect_format(path) == "open_clip" and detect_format(wrapped) == "open_clip"
    assert_matches_hf(load_clip(path, act="quick_gelu"), openai_case["hf"], openai_case["end"])
    # the Hub's open_clip_model.safetensors, in a directory
    hub = openai_case["dir"] / "hub"
    hub.mkdir()
    save_file(openai_case["state"], str(hub / "open_clip_model.safetensors"))
    assert detect_format(hub) == "open_clip"
    assert_matches_hf(load_clip(hub), openai_case["hf"], openai_case["end"])


def test_open_clip_hub_directory_with_its_config(tmp_path):
    """open_clip's Hub layout: open_clip_model.safetensors + open_clip_config.json, which records what the
    weights cannot tell: GELU (not QuickGELU), heads 32 wide (not 64), mean/std."""
    act, eos, end, _ = CASES["gelu-argmax"]
    hf = tiny_hf(act, eos, seed=4)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(to_openai(hf.state_dict()), str(hub / "open_clip_model.safetensors"))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 64, "head_width": 32,
                                           "patch_size": 8},
                            "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 64, "heads": 2,
                                         "layers": 2}},
              "preprocess_cfg": {"mean": mean, "std": std}}
    (hub / "open_clip_config.json").write_text(json.dumps(config))
    assert detect_format(hub) == "open_clip"
    model = load_clip(hub)
    assert (model.config.vision.act, model.config.vision.heads, model.config.text.heads) == ("gelu", 2, 2)
    assert tuple(model.preprocess.mean) == tuple(mean) and tuple(model.preprocess.std) == tuple(std)
    assert_matches_hf(model, hf, end)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        named = vlkit.create_model("clip-tiny", pretrained=hub, vision_heads=4, **TINY)
    assert any("vision heads is 2 but the model uses 4" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="vision heads is 2"):  # the file alone: the config beside it counts
        named.load_pretrained(hub / "open_clip_model.safetensors")
    config["model_cfg"]["text_cfg"]["pool_type"] = "last"
    (hub / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(VlkitError, match="text_cfg.pool_type='last'"):
        load_clip(hub)


@pytest.mark.parametrize("extra, feature", [
    ({"visual.attn_pool.query": torch.zeros(4, 64)}, "attn_pool"),
    ({"visual.patchnorm_pre_ln.weight": torch.ones(192), "visual.patchnorm_pre_ln.bias": torch.zeros(192)},
     "patchnorm_pre_ln"),
])
def test_open_clip_variants_are_refused(openai_case, extra, feature):
    state = {"state_dict": {**openai_case["state"], **extra}}
    assert detect_format(state) == "open_clip"
    with pytest.raises(VlkitError, match=f"unsupported open_clip CLIP variant.*{feature}"):
        convert_state_dict(state, "open_clip")
    path = openai_case["dir"] / f"variant-{feature}.pt"
    torch.save(state, path)
    with pytest.raises(VlkitError, match=feature):
        load_clip(path)


def test_missing_and_unknown_keys_are_named(case, openai_case, tmp_path):
    hf_state = dict(case["hf"].state_dict())
    config = json.loads((case["dir"] / "config.json").read_text())
    model = vlkit.create_model("clip-tiny", act=case["act"], **TINY)
    model.config.vision.norm_eps, model.config.text.norm_eps = case["eps"]  # no mismatch warning

    def hf_dir(state, name):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        save_file(state, str(directory / "model.safetensors"))
        return directory

    for key in ("vision_model.post_layernorm.bias", "text_model.encoder.layers.1.self_attn.k_proj.weight"):
        broken = hf_dir({k: v for k, v in hf_state.items() if k != key}, f"missing-{key}")
        for load in (load_clip, model.load_pretrained):
            with pytest.raises(VlkitError, match="missing keys") as err:
                load(broken)
            assert key in str(err.value)
    unknown = "vision_model.encoder.layers.0.extra.weight"
    broken = hf_dir({**hf_state, unknown: torch.zeros(3)}, "unknown")
    with pytest.raises(VlkitError, match=f"unexpected keys.*{unknown}"):
        load_clip(broken)

    oa = openai_case["state"]
    for key in ("visual.proj", "transformer.resblocks.1.mlp.c_proj.bias"):
        path = tmp_path / f"missing-{key}.pt"
        torch.save({k: v for k, v in oa.items() if k != key}, path)
        with pytest.raises(VlkitError, match="missing keys") as err:
            load_clip(path)
        assert key in str(err.value)
    path = tmp_path / "unknown.pt"
    torch.save({**oa, "visual.extra_scale": torch.ones(1)}, path)
    with pytest.raises(VlkitError, match="unexpected keys.*visual.extra_scale"):
        load_clip(path)
    # sizes that do not fit the model are reported too (the OpenAI model is 128 wide, the HF one 64)
    torch.save(oa, tmp_path / "wide.pt")
    with pytest.raises(VlkitError, match=r"shape mismatches .*'text.pos_embed: \(16, 128\) vs \(16, 64\)'"):
        load_clip(case["dir"]).load_pretrained(tmp_path / "wide.pt")


def test_vlkit_save_load_round_trip(case, tmp_path):
    model = load_clip(case["dir"]).eval()
    saved = save_model(model, tmp_path / "vlkit")
    assert detect_format(saved) == "vlkit"
    loaded = load_model(saved).eval()
    assert loaded.config == model.config
    pixels, ids, mask = inputs(case["end"])
    with torch.no_grad():
        for other in (loaded, load_clip(saved).eval()):
            assert torch.equal(other.encode_image(pixels), model.encode_image(pixels))
            assert torch.equal(other.encode_text(ids), model.encode_text(ids))
            assert torch.equal(other(pixels, ids).logits_per_image, model(pixels, ids).logits_per_image)
    eos = None if case["eos"] == 2 else case["eos"]
    named = vlkit.create_model("clip-tiny", act=case["act"], eos_token_id=eos, **TINY)
    for ln in named.modules():
        if isinstance(ln, nn.LayerNorm):
            ln.eps = case["eps"][1] if ln in list(named.text.modules()) else case["eps"][0]
    named.load_pretrained(saved)
    assert_matches_hf(named, case["hf"], case["end"])


def test_configs_from_hf_and_state(openai_case):
    hf_config = openai_case["hf"].config.to_dict()
    from_hf = clip_config_from_hf(hf_config)
    from_state = clip_config_from_state(openai_case["state"])
    for config in (from_hf, from_state):
        assert config.embed_dim == 32
        v, t = config.vision, config.text
        assert (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio) == (IMAGE, 8, 128, 2, 2, 4.0)
        assert (t.vocab_size, t.context_length, t.width, t.layers, t.heads, t.mlp_ratio) == (
            VOCAB, CONTEXT, 128, 2, 2, 4.0)
    assert from_hf.text.eos_token_id == 99 and from_state.text.eos_token_id is None
    assert clip_config_from_state(openai_case["state"], vision_heads=4).vision.heads == 4
    with pytest.raises(VlkitError, match="not divisible by 3 heads"):
        clip_config_from_state(openai_case["state"], text_heads=3)
    # legacy configs: eos_token_id 2 means "pool at the highest id"; text_config_dict overrides text_config
    assert clip_config_from_hf({"text_config": {"eos_token_id": 2}}).text.eos_token_id is None
    assert clip_config_from_hf({"text_config_dict": {"eos_token_id": 5}}).text.eos_token_id == 5
    default = clip_config_from_hf({})  # transformers' defaults: ViT-B/32
    assert (default.vision.width, default.text.width, default.embed_dim, default.text.eos_token_id) == (
        768, 512, 512, 49407)


def test_pickled_objects_are_not_unpickled(openai_case, tmp_path):
    import argparse

    torch.save({"state_dict": openai_case["state"], "args": argparse.Namespace(lr=1)}, tmp_path / "ckpt.pt")
    with pytest.raises(VlkitError, match="weights_only=True"):
        load_clip(tmp_path / "ckpt.pt")


def test_detection_errors(tmp_path):
    with pytest.raises(VlkitError, match="not a CLIP checkpoint"):
        detect_format({"encoder.weight": torch.zeros(2)})
    with pytest.raises(VlkitError, match="no such file"):
        detect_format(tmp_path / "nothing.pt")
    with pytest.raises(VlkitError, match="unknown checkpoint format"):
        convert_state_dict({"logit_scale": torch.zeros(())}, "tf")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VlkitError, match="cannot read weights"):
        detect_format(tmp_path / "junk.pt")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VlkitError, match="'bert' model"):
        load_clip(tmp_path / "bert")
