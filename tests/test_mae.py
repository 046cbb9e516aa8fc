"""MAE: patch masking, an encoder that sees only visible patches, the masked-pixel loss, training and
fine-tuning from a pretrained encoder."""

from __future__ import annotations

import pytest
import torch

from vlkit.modules.layers.masking import gather_patches, random_patch_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masking_counts_differ_per_image_and_restore_order():
    m = random_patch_mask(8, 64, 0.75, torch.Generator().manual_seed(0))
    assert m.keep.shape == (8, 16)
    assert m.mask.sum(dim=1).tolist() == [48.0] * 8  # exactly 75% masked in every image
    # the kept patches are exactly the unmasked ones
    for b in range(8):
        visible = set(torch.nonzero(m.mask[b] == 0).flatten().tolist())
        assert set(m.keep[b].tolist()) == visible
    assert len({tuple(sorted(k.tolist())) for k in m.keep}) == 8  # a different mask per image
    # restore: [visible..., masked...] laid out by the shuffle goes back to the original order
    tokens = torch.arange(64).float()[None, :, None].expand(8, 64, 2)
    shuffled = gather_patches(tokens, m.restore.argsort(dim=1))
    assert torch.equal(shuffled[:, :16], gather_patches(tokens, m.keep))
    assert torch.equal(gather_patches(shuffled, m.restore), tokens)
    # seeded: the same generator seed gives the same masks, another ratio another count
    again = random_patch_mask(8, 64, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(again.keep, m.keep)
    assert random_patch_mask(2, 64, 0.5, torch.Generator().manual_seed(0)).keep.shape == (2, 32)
    with pytest.raises(ValueError):
        random_patch_mask(2, 64, 1.0)


# ---------------------------------------------------------------------------------------------- model
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tests.conftest import run_cli  # noqa: E402
from vlkit.errors import VlkitError  # noqa: E402
from vlkit.models.mae.loss import mae_loss, patchify, unpatchify  # noqa: E402
from vlkit.models.registry import create_model  # noqa: E402

#: an MAE whose encoder has clip-tiny's image tower sizes (32 px, 8 px patches, width 64, 2 layers, 2 heads)
CLIP_TINY_SIZES = {"width": 64, "layers": 2, "heads": 2, "patch_size": 8}


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_encoder_sees_only_visible_patches_and_costs_a_quarter():
    torch.manual_seed(0)
    model = create_model("mae-vit-tiny").eval()  # 64 patches
    images = torch.randn(4, 3, 32, 32)
    mask = model.random_mask(4, torch.device("cpu"), torch.Generator().manual_seed(1))
    tokens = model.forward_encoder(images, mask)
    assert tokens.shape == (4, 1 + 16, 128)
    # pixels of masked patches never reach the encoder: changing them leaves its output as it was
    noise = unpatchify(torch.randn(4, 64, 48) * mask.mask[..., None], 4, 32, 32)
    assert torch.allclose(model.forward_encoder(images + noise, mask), tokens, atol=1e-6)
    assert not torch.allclose(model.forward_encoder(images + torch.randn_like(images), mask), tokens, atol=1e-3)
    # FLOPs: at 75% masking the encoder does about a quarter of a full pass (17 of 65 tokens; attention less)
    masked = _flops(lambda: model.forward_encoder(images, mask))
    full = _flops(lambda: model.encoder.forward_features(images))
    assert 0.2 < masked / full < 17 / 65 + 0.01, masked / full
    # a whole MAE step (encoder + light decoder) against the full encoder alone: still clearly cheaper
    assert _flops(lambda: model(images, mask=mask)) < 0.6 * full


def test_patchify_against_a_slow_loop_and_round_trip():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)  # [2, 6, 48]
    for b in range(2):
        for i in range(2):
            for j in range(3):
                slow = images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(1, 2, 0).reshape(-1)
                assert torch.equal(patches[b, i * 3 + j], slow)
    assert torch.equal(unpatchify(patches, 4, 8, 12), images)


def test_loss_counts_masked_patches_only_with_normalised_targets():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 12, generator=gen), torch.randn(3, 16, 12, generator=gen) * 3 + 1
    mask = random_patch_mask(3, 16, 0.75, gen).mask
    loss = mae_loss(pred, target, mask)
    # reference: a loop over the masked patches, each target normalised by its own mean and (unbiased) std
    terms = []
    for b in range(3):
        for n in range(16):
            if mask[b, n]:
                t = target[b, n]
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                terms.append(((pred[b, n] - t) ** 2).mean())
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # predictions of visible patches do not count
    assert torch.equal(mae_loss(changed, target, mask), loss)
    changed = pred.clone()
    changed[mask == 1] += 1.0
    assert mae_loss(changed, target, mask) > loss
    raw = mae_loss(pred, target, mask, norm_pix=False)  # without normalisation: the plain masked MSE
    assert torch.allclose(raw, ((pred - target) ** 2).mean(-1)[mask == 1].mean(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def mae_run(synth, tmp_path_factory):
    """An MAE with clip-tiny's image tower sizes trained by the shipped recipe on ``synth`` for a few epochs."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    from tests.conftest import ROOT

    run = tmp_path_factory.mktemp("mae") / "run"
    args = ", ".join(f"{k}: {v}" for k, v in CLIP_TINY_SIZES.items())
    cfg = load_config(ROOT / "vlkit" / "configs" / "mae_synth.yaml",
                      [f"datasets.synth.path={synth}", f"output_dir={run}", "epochs=6", "batch_size=32",
                       "optim.warmup_steps=5", "log_every=1", "progress=false", "tensorboard=false",
                       f"model.args={{{args}}}"])
    metrics = Trainer(cfg).run()
    return run, metrics


def test_training_lowers_the_loss_and_draws_the_figure(mae_run):
    import json

    run, metrics = mae_run
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/synth/loss"] for x in lines if "train/synth/loss" in x]
    assert len(losses) >= 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])
    vals = [x["val/synth/mae_loss"] for x in lines if "val/synth/mae_loss" in x]
    assert metrics["val/synth/mae_loss"] == vals[-1] < 1.0  # 1.0: predicting the mean of each normalised patch
    figure = (run / "mae_reconstructions.png").read_bytes()
    assert figure.startswith(b"\x89PNG") and len(figure) > 10_000
    assert not (run / "model" / "tokenizer.json").exists()  # an image-only model has no tokenizer


def test_pretrained_image_copies_the_encoder_and_refuses_other_shapes(mae_run, synth, tmp_path):
    from safetensors.torch import load_file

    from vlkit.config.load import load_config
    from vlkit.train.distributed import DistInfo
    from vlkit.train.model_setup import build_model_and_tokenizer

    run, _ = mae_run
    saved = load_file(str(run / "model" / "model.safetensors"))
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={tmp_path / 'ft'}", "model.name=clip-tiny",
                             f"model.pretrained_image={run}"])
    model, tokenizer = build_model_and_tokenizer(cfg, DistInfo())
    tower = model.visual.state_dict()
    assert tokenizer is not None and len(tower) > 10
    for key, value in tower.items():
        assert torch.equal(value, saved[f"encoder.{key}"]), key
    scratch, _ = build_model_and_tokenizer(load_config(None, [*cfg_overrides(synth, tmp_path)]), DistInfo())
    assert not torch.equal(scratch.visual.pos_embed, model.visual.pos_embed)
    # ALBEF's momentum copy of the tower starts from the same weights
    from vlkit.models.mae.transfer import load_pretrained_image

    albef = create_model("albef-tiny")  # the same tower sizes as clip-tiny
    load_pretrained_image(albef, run)
    assert torch.equal(albef.visual.pos_embed, saved["encoder.pos_embed"])
    assert torch.equal(albef.momentum_encoders["visual"].pos_embed, saved["encoder.pos_embed"])
    # another width: one line naming the key and both shapes
    wide = create_model("clip-tiny", vision_width=96, vision_heads=2)
    with pytest.raises(VlkitError) as info:
        load_pretrained_image(wide, run)
    message = str(info.value)
    assert "\n" not in message and "encoder." in message and "(64" in message and "96" in message


def cfg_overrides(synth, tmp_path) -> list[str]:
    return [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
            f"output_dir={tmp_path / 'scratch'}", "model.name=clip-tiny"]


def test_linear_probe_on_an_mae_run(mae_run, synth, tmp_path):
    import json

    from vlkit.inference.embed import compute_embeddings
    from vlkit.inference.loading import load_for_inference

    run, _ = mae_run
    result = run_cli("eval", run, "--task", "linear-probe", "--data", synth, "--split", "test",
                     "--train-split", "train", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metrics"]["test/synth/top1"] > 3 * report["chance"]  # well above chance
    # the embeddings are the model's encode_image of the whole image, L2-normalised
    loaded = load_for_inference(run)
    loaded.precision = "fp32"
    emb = compute_embeddings(loaded, synth, "test", captions=False, limit=4, channels_last=False)
    assert torch.allclose(emb.image.norm(dim=-1), torch.ones(4), atol=1e-4)
    # a text task still refuses the image-only model in one line
    zs = run_cli("eval", run, "--task", "zeroshot", "--data", synth, "--split", "test", cwd=tmp_path)
    assert zs.returncode == 2 and "text" in zs.stderr
