"""CLIP weights from and to other formats: Hugging Face ``CLIPModel`` directories, OpenAI CLIP state dicts
(TorchScript archives included) and open_clip checkpoints (ViT towers).

Each foreign format has one key map (:data:`HF_KEYS`, :data:`OPENAI_KEYS`; open_clip uses OpenAI's names),
read in both directions: foreign -> vlkit to load, vlkit -> foreign to export and to name the checkpoint
keys behind a missing vlkit key.

Example:
    >>> model = load_clip("checkpoints/clip-vit-base-patch32")        # a Hugging Face directory
    >>> model = vlkit.create_model("clip-vit-b-32", pretrained="ViT-B-32.pt")   # an OpenAI checkpoint
    >>> export_hf(model, "out/hf-clip")   # transformers.CLIPModel.from_pretrained("out/hf-clip")
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlkit import __version__
from vlkit.errors import VlkitError
from vlkit.utils.fs import atomic_directory
from vlkit.models.clip.model import CLIP, CLIPConfig
from vlkit.models.io import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, check_keys, load_model, load_state_into
from vlkit.models.preprocess import Preprocess
from vlkit.modules.encoders.text_transformer import TextConfig
from vlkit.modules.encoders.vit import VisionConfig

FORMATS = ("hf", "openai", "open_clip", "vlkit")

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_PREPROCESSOR = "preprocessor_config.json"
#: The configuration open_clip writes beside weights it pushes to the Hub (activation, heads, mean/std).
OPEN_CLIP_CONFIG = "open_clip_config.json"
#: Weight files looked for in a directory without ``config.json`` (open_clip's names on the Hub first).
STATE_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
               "pytorch_model.bin")
STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


# --------------------------------------------------------------------------------------------------------------
# key maps


_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


def _compile(template: str) -> re.Pattern:
    pieces = re.split(r"\{(i|p)\}", template)  # literal, name, literal, name, ...
    regex = "".join(_PLACEHOLDERS[s] if n % 2 else re.escape(s) for n, s in enumerate(pieces))
    return re.compile(f"^{regex}$")


@dataclass(frozen=True)
class _Rule:
    """One vlkit key template and the foreign key template(s) it comes from. Several foreign templates are
    concatenated along dim 0 (Hugging Face's separate q, k, v projections into vlkit's fused ``in_proj``);
    ``transpose`` marks OpenAI's ``[width, embed]`` projection matrices (vlkit stores ``nn.Linear`` weights)."""

    vlkit: str
    foreign: tuple[str, ...]
    transpose: bool = False
    vlkit_re: re.Pattern = field(init=False, repr=False, compare=False)
    foreign_re: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "vlkit_re", _compile(self.vlkit))
        object.__setattr__(self, "foreign_re", tuple(_compile(t) for t in self.foreign))


class KeyMap:
    """A two-way map between vlkit's CLIP keys and one foreign format's keys.

    Args:
        name: the format, for messages.
        rules: ``(vlkit_template, foreign_template_or_templates[, transpose])``; templates use ``{i}`` for a
            layer index and ``{p}`` for ``weight``/``bias``.
        ignore: regular expressions of foreign keys that carry no weights (``position_ids`` buffers, ...).
    """

    def __init__(self, name: str, rules: list[tuple], ignore: tuple[str, ...] = ()):
        self.name = name
        self.rules = [_Rule(v, (f,) if isinstance(f, str) else tuple(f), *rest) for v, f, *rest in rules]
        self.ignore = tuple(re.compile(p) for p in ignore)

    def ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore)

    def _match_foreign(self, key: str) -> tuple[_Rule, int, dict[str, str]] | None:
        for rule in self.rules:
            for part, regex in enumerate(rule.foreign_re):
                m = regex.match(key)
                if m:
                    return rule, part, m.groupdict()
        return None

    def _match_vlkit(self, key: str) -> tuple[_Rule, dict[str, str]] | None:
        for rule in self.rules:
            m = rule.vlkit_re.match(key)
            if m:
                return rule, m.groupdict()
        return None

    def to_vlkit(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Foreign state -> (vlkit state, foreign keys no rule matched). A fused key some of whose parts
        are missing is left out (and so reported missing when loading)."""
        out: dict[str, Tensor] = {}
        fused: dict[str, tuple[_Rule, dict[int, Tensor]]] = {}
        unmatched = []
        for key, value in state.items():
            if self.ignored(key):
                continue
            hit = self._match_foreign(key)
            if hit is None:
                unmatched.append(key)
                continue
            rule, part, groups = hit
            target = rule.vlkit.format(**groups)
            if len(rule.foreign) > 1:
                fused.setdefault(target, (rule, {}))[1][part] = value
            else:
                out[target] = value.t() if rule.transpose else value
        for target, (rule, parts) in fused.items():
            if len(parts) == len(rule.foreign):
                out[target] = torch.cat([parts[n] for n in range(len(rule.foreign))], dim=0)
        return out, unmatched

    def from_vlkit(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """vlkit state -> foreign state (contiguous tensors that share no memory, ready for safetensors)."""
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            hit = self._match_vlkit(key)
            if hit is None:
                raise VlkitError(f"vlkit key '{key}' has no {self.name} equivalent")
            rule, groups = hit
            names = [t.format(**groups) for t in rule.foreign]
            values = value.chunk(len(names), dim=0) if len(names) > 1 else [value.t() if rule.transpose else value]
            for name, v in zip(names, values):
                out[name] = v.detach().cpu().contiguous().clone()
        return out

    def foreign_names(self, vlkit_key: str) -> list[str]:
        """The foreign key(s) a vlkit key is made of (empty when none is known)."""
        hit = self._match_vlkit(vlkit_key)
        if hit is None:
            return []
        rule, groups = hit
        return [t.format(**groups) for t in rule.foreign]


def _tower_rules(block: dict[str, Any], towers: list[tuple[str, str]]) -> list[tuple]:
    return [(v_prefix + v, tuple(f_prefix + x for x in ((f,) if isinstance(f, str) else f)))
            for v_prefix, f_prefix in towers for v, f in block.items()]


_HF_BLOCK = {
    "ln_1.{p}": "layer_norm1.{p}",
    "attn.in_proj.{p}": ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
    "attn.out_proj.{p}": "self_attn.out_proj.{p}",
    "ln_2.{p}": "layer_norm2.{p}",
    "mlp.fc1.{p}": "mlp.fc1.{p}",
    "mlp.fc2.{p}": "mlp.fc2.{p}",
}

#: Hugging Face ``CLIPModel`` keys.
HF_KEYS = KeyMap("Hugging Face", [
    ("visual.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.{p}", "vision_model.pre_layrnorm.{p}"),
    ("visual.ln_post.{p}", "vision_model.post_layernorm.{p}"),
    ("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
    ("text.ln_final.{p}", "text_model.final_layer_norm.{p}"),
    ("visual_projection.weight", "visual_projection.weight"),
    ("text_projection.weight", "text_projection.weight"),
    ("logit_scale", "logit_scale"),
    *_tower_rules(_HF_BLOCK, [("visual.transformer.layers.{i}.", "vision_model.encoder.layers.{i}."),
                              ("text.transformer.layers.{i}.", "text_model.encoder.layers.{i}.")]),
], ignore=(r"(^|\.)position_ids$",))

_OPENAI_BLOCK = {
    "ln_1.{p}": "ln_1.{p}",
    "attn.in_proj.weight": "attn.in_proj_weight",
    "attn.in_proj.bias": "attn.in_proj_bias",
    "attn.out_proj.{p}": "attn.out_proj.{p}",
    "ln_2.{p}": "ln_2.{p}",
    "mlp.fc1.{p}": "mlp.c_fc.{p}",
    "mlp.fc2.{p}": "mlp.c_proj.{p}",
}

#: OpenAI CLIP keys (open_clip's ViT models use the same names).
OPENAI_KEYS = KeyMap("OpenAI", [
    ("visual.patch_embed.proj.weight", "visual.conv1.weight"),
    ("visual.class_embedding", "visual.class_embedding"),
    ("visual.pos_embed", "visual.positional_embedding"),
    ("visual.ln_pre.{p}", "visual.ln_pre.{p}"),
    ("visual.ln_post.{p}", "visual.ln_post.{p}"),
    ("visual_projection.weight", "visual.proj", True),
    ("text.token_embedding.weight", "token_embedding.weight"),
    ("text.pos_embed", "positional_embedding"),
    ("text.ln_final.{p}", "ln_final.{p}"),
    ("text_projection.weight", "text_projection", True),
    ("logit_scale", "logit_scale"),
    *_tower_rules(_OPENAI_BLOCK, [("visual.transformer.layers.{i}.", "visual.transformer.resblocks.{i}."),
                                  ("text.transformer.layers.{i}.", "transformer.resblocks.{i}.")]),
], ignore=(r"^(input_resolution|context_length|vocab_size|attn_mask)$",))

KEY_MAPS = {"hf": HF_KEYS, "openai": OPENAI_KEYS, "open_clip": OPENAI_KEYS}

#: open_clip (and OpenAI) variants vlkit's CLIP cannot represent: key pattern -> what it is.
UNSUPPORTED = {
    r"^visual\.patchnorm_pre_ln\.": "input patch normalisation (input_patchnorm)",
    r"^visual\.attn_pool(_contrastive)?\.": "an attentional pooler (attn_pool)",
    r"^visual\.(attnpool|layer\d|bn\d|conv[2-9])\b": "a ResNet image tower",
    r"^visual\.(trunk|head)\.": "a timm image tower",
    r"^text\.": "a Hugging Face text tower",
    r"(^|\.)ls_[12]\.": "layer scale (ls_1/ls_2)",
    r"(^|\.)ln_attn\.|\.mlp\.ln\.|\.attn\.(ln_inner|head_scale|logit_scale)\b": "NormFormer / scaled-cosine attention",
    r"^logit_bias$": "a sigmoid loss bias (SigLIP)",
    r"^(text\.)?cls_emb$|^text_decoder\.": "a CoCa text decoder / class token",
}


# --------------------------------------------------------------------------------------------------------------
# reading checkpoints


def _is_torchscript(file: Path) -> bool:
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _jit_state(file: Path) -> dict[str, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; reading archives still works
        return dict(torch.jit.load(str(file), map_location="cpu").state_dict())


def _read_file(file: Path) -> tuple[Any, bool]:
    """The object stored in a weights file, and whether it was a TorchScript archive."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file)), False
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise VlkitError(f"{file}: not a readable safetensors file ({exc})") from None
    if _is_torchscript(file):
        return _jit_state(file), True
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        try:
            return _jit_state(file), True
        except Exception:  # noqa: BLE001
            hint = ("; it holds Python objects besides tensors, which vlkit does not unpickle (weights_only=True): "
                    "save its state_dict instead") if "weights only" in str(exc).lower() else ""
            raise VlkitError(f"{file}: cannot read weights: {str(exc).splitlines()[0]}{hint}") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    return obj, False


def _unwrap(state: Mapping) -> tuple[dict[str, Tensor], bool]:
    """Tensors of a (possibly wrapped) state dict: ``{"state_dict": ...}`` of open_clip training checkpoints,
    ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes. Also whether any
    wrapping was found."""
    if not isinstance(state, Mapping):
        raise VlkitError(f"expected a state dict, got {type(state).__name__}")
    wrapped = False
    for name in ("state_dict", "model"):
        if isinstance(state.get(name), Mapping):
            state, wrapped = state[name], True
            break
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors, wrapped = {k[len(prefix):]: v for k, v in tensors.items()}, True
    return tensors, wrapped


def _detect_keys(keys, wrapped: bool = False, torchscript: bool = False, hint: str = "") -> str:
    keys = set(keys)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("visual.patch_embed.", "visual.transformer.layers.", "text.transformer.layers."))
           for k in keys):
        return "vlkit"
    openai_like = any(k in ("visual.conv1.weight", "token_embedding.weight", "visual.class_embedding")
                      or k.startswith(("visual.transformer.resblocks.", "transformer.resblocks."))
                      or k.startswith(("visual.trunk.", "text.transformer.")) for k in keys)
    if openai_like:
        if torchscript or keys & {"input_resolution", "context_length", "vocab_size"}:
            return "openai"
        open_clip_only = [k for k in keys for p, what in UNSUPPORTED.items()
                          if re.search(p, k) and "ResNet" not in what]
        if wrapped or open_clip_only or "open_clip" in hint:
            return "open_clip"
        return "openai"
    some = sorted(keys)[:5]
    raise VlkitError(f"{hint or 'state dict'}: not a CLIP checkpoint this version reads (no Hugging Face, OpenAI, "
                     f"open_clip or vlkit CLIP keys; first keys: {some})")


@dataclass
class _Source:
    """An opened checkpoint: its format, foreign state (unwrapped) and where it came from."""

    fmt: str
    name: str
    state: dict[str, Tensor] | None = None
    hf_config: dict[str, Any] | None = None
    directory: Path | None = None
    weights: Path | None = None
    open_clip_config: dict[str, Any] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlkitError(f"{path}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise VlkitError(f"{path}: expected a JSON object")
    return data


def _hf_state(directory: Path) -> dict[str, Tensor]:
    for name in HF_WEIGHTS:
        if (directory / name).exists():
            state, _ = _read_file(directory / name)
            return _unwrap(state)[0]
    for name in HF_WEIGHT_INDEXES:
        if (directory / name).exists():
            shards = sorted(set(_read_json(directory / name).get("weight_map", {}).values()))
            state = {}
            for shard in shards:
                if not (directory / shard).exists():
                    raise VlkitError(f"{directory}: weight shard {shard} (named in {name}) is missing")
                state.update(_unwrap(_read_file(directory / shard)[0])[0])
            return state
    raise VlkitError(f"{directory}: Hugging Face CLIP directory without weights "
                     f"(none of {list(HF_WEIGHTS + HF_WEIGHT_INDEXES)})")


def _state_file_in(directory: Path) -> Path:
    for name in STATE_FILES:
        if (directory / name).exists():
            return directory / name
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(STATE_SUFFIXES))
    if len(found) == 1:
        return found[0]
    raise VlkitError(f"{directory}: no {CONFIG_NAME} and " + (f"several weight files {[p.name for p in found]}; "
                     "pass one of them" if found else "no weight file"))


def _open(path: str | Path, read_state: bool = True) -> _Source:
    path = Path(path)
    if not path.exists():
        raise VlkitError(f"{path}: no such file or directory")
    if path.is_dir() and (path / CONFIG_NAME).exists():
        config = _read_json(path / CONFIG_NAME)
        if "architecture" in config:
            if config["architecture"] != "clip":
                raise VlkitError(f"{path}: a vlkit '{config['architecture']}' model, not a CLIP")
            return _Source("vlkit", str(path), directory=path, weights=path / WEIGHTS_NAME)
        model_type = config.get("model_type")
        if model_type == "clip" or "CLIPModel" in (config.get("architectures") or []):
            return _Source("hf", str(path), _hf_state(path) if read_state else None, config, path)
        raise VlkitError(f"{path}: {CONFIG_NAME} describes a {model_type or 'unknown'!r} model, not a vlkit CLIP "
                         "or a Hugging Face CLIPModel")
    file = _state_file_in(path) if path.is_dir() else path
    obj, torchscript = _read_file(file)
    state, wrapped = _unwrap(obj)
    fmt = _detect_keys(state, wrapped, torchscript, hint=str(file))
    hf_config = open_clip_config = None
    if fmt == "hf" and (file.parent / CONFIG_NAME).exists():
        hf_config = _read_json(file.parent / CONFIG_NAME)
    if fmt in ("openai", "open_clip") and (file.parent / OPEN_CLIP_CONFIG).exists():
        fmt, open_clip_config = "open_clip", _read_json(file.parent / OPEN_CLIP_CONFIG)
    return _Source(fmt, str(file), state, hf_config, file.parent, file, open_clip_config)


# --------------------------------------------------------------------------------------------------------------
# public API: detection and conversion


def detect_format(state_or_path: Mapping | str | Path) -> str:
    """The format of a checkpoint: ``"hf"``, ``"openai"``, ``"open_clip"`` or ``"vlkit"``.

    Accepts a state dict (possibly wrapped under ``state_dict`` or prefixed ``module.``), a weights file
    (``.pt``/``.bin``/``.safetensors``, TorchScript archives included) or a directory. OpenAI and open_clip
    ViT checkpoints share key names: a TorchScript archive or OpenAI's metadata keys mean ``"openai"``; a
    wrapped state dict, open_clip-only keys or ``open_clip`` in the file name mean ``"open_clip"``; a plain
    state dict with only the shared names is reported as ``"openai"`` (both convert identically).

    Raises:
        VlkitError: no known CLIP keys, or an unreadable file.
    """
    if isinstance(state_or_path, Mapping):
        state, wrapped = _unwrap(state_or_path)
        return _detect_keys(state, wrapped)
    return _open(state_or_path, read_state=False).fmt


def _refuse_unsupported(keys: list[str], fmt: str) -> None:
    found: dict[str, list[str]] = {}
    for key in keys:
        for pattern, what in UNSUPPORTED.items():
            if re.search(pattern, key):
                found.setdefault(what, []).append(key)
                break
    if found:
        parts = [f"{what} (keys {sorted(k)[:4]}{' ...' if len(k) > 4 else ''})" for what, k in found.items()]
        raise VlkitError(f"unsupported {fmt} CLIP variant: " + "; ".join(parts)
                         + ". vlkit's CLIP has a plain ViT image tower and a causal text transformer")


def convert_state_dict(state: Mapping, fmt: str) -> dict[str, Tensor]:
    """A foreign CLIP state dict with vlkit's key names.

    Args:
        state: the checkpoint's state dict (wrapping under ``state_dict`` and ``module.`` prefixes are removed).
        fmt: ``"hf"``, ``"openai"``, ``"open_clip"`` or ``"vlkit"`` (see :func:`detect_format`).

    Keys that carry no weights (``position_ids``, OpenAI's ``input_resolution``...) are dropped; other keys
    the map does not know are kept under their own names, so that loading reports them as unexpected.

    Raises:
        VlkitError: unknown format, or an open_clip/OpenAI variant vlkit cannot represent (the error names
            the keys: ``input_patchnorm``, ``attn_pool``, ResNet towers, ...).
    """
    tensors, _ = _unwrap(state)
    if fmt == "vlkit":
        return dict(tensors)
    if fmt not in KEY_MAPS:
        raise VlkitError(f"unknown checkpoint format {fmt!r}; choose one of {list(FORMATS)}")
    out, unmatched = KEY_MAPS[fmt].to_vlkit(tensors)
    if fmt in ("openai", "open_clip"):
        _refuse_unsupported(unmatched, fmt)
    for key in unmatched:
        out.setdefault(key, tensors[key])
    return out


# --------------------------------------------------------------------------------------------------------------
# configurations


#: ``transformers.CLIPTextConfig`` / ``CLIPVisionConfig`` / ``CLIPConfig`` defaults (config.json files written by
#: transformers may leave out values equal to these).
HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407}
HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
HF_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}

#: Hugging Face activation names -> vlkit's (the tanh approximations of GELU are one function).
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
VLKIT_TO_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
                    "silu": "silu"}

#: Hugging Face pools the text tower at the highest token id when ``eos_token_id == 2`` (the value in configs
#: written before transformers PR #24773), else at the first ``eos_token_id``.
HF_ARGMAX_EOS = 2


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio with ``int(width * ratio) == hidden`` (as the encoder layers compute the MLP width)."""
    ratio = hidden / width
    for _ in range(4):
        if int(width * ratio) == hidden:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise VlkitError(f"MLP width {hidden} cannot be expressed for width {width}")


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise VlkitError(f"non-square {what} {list(value)} is not supported")
        value = value[0]
    return int(value)


def _act(name: str, where: str) -> str:
    if name not in HF_ACTS:
        raise VlkitError(f"{where}: activation {name!r} is not supported; known: {sorted(HF_ACTS)}")
    return HF_ACTS[name]


def hf_eos_to_vlkit(eos_token_id: Any) -> int | None:
    """vlkit's ``TextConfig.eos_token_id`` that pools where Hugging Face's CLIP text model does."""
    if isinstance(eos_token_id, (list, tuple)):
        if len(eos_token_id) != 1:
            raise VlkitError(f"several eos_token_id values {list(eos_token_id)} are not supported")
        eos_token_id = eos_token_id[0]
    if eos_token_id is None or eos_token_id == HF_ARGMAX_EOS:
        return None  # argmax of the ids (HF's legacy path)
    return int(eos_token_id)


def clip_config_from_hf(hf_config: Mapping[str, Any]) -> CLIPConfig:
    """A :class:`CLIPConfig` equal to a Hugging Face ``CLIPModel`` ``config.json`` (a dict).

    Missing values take transformers' defaults; ``text_config_dict``/``vision_config_dict`` (old configs)
    override ``text_config``/``vision_config`` as in transformers. The text pooling follows
    :func:`hf_eos_to_vlkit`.
    """
    text = {**HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {}), **(hf_config.get("text_config_dict") or {})}
    vision = {**HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {}),
              **(hf_config.get("vision_config_dict") or {})}
    top = {**HF_DEFAULTS, **{k: v for k, v in hf_config.items() if k in HF_DEFAULTS and v is not None}}
    if int(vision["num_channels"]) != 3:
        raise VlkitError(f"config.json: {vision['num_channels']} image channels are not supported (only 3)")
    image_size = _square(vision["image_size"], "image_size")
    patch_size = _square(vision["patch_size"], "patch_size")
    vw, tw = int(vision["hidden_size"]), int(text["hidden_size"])
    context = int(text["max_position_embeddings"])
    return CLIPConfig(
        embed_dim=int(top["projection_dim"]),
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vw,
                            layers=int(vision["num_hidden_layers"]), heads=int(vision["num_attention_heads"]),
                            mlp_ratio=_mlp_ratio(vw, int(vision["intermediate_size"])),
                            act=_act(vision["hidden_act"], "vision_config"),
                            norm_eps=float(vision["layer_norm_eps"])),
        text=TextConfig(vocab_size=int(text["vocab_size"]), context_length=context, width=tw,
                        layers=int(text["num_hidden_layers"]), heads=int(text["num_attention_heads"]),
                        mlp_ratio=_mlp_ratio(tw, int(text["intermediate_size"])),
                        act=_act(text["hidden_act"], "text_config"), norm_eps=float(text["layer_norm_eps"]),
                        eos_token_id=hf_eos_to_vlkit(text["eos_token_id"])),
        init_temperature=math.exp(-float(top["logit_scale_init_value"])),
        preprocess=Preprocess(image_size=image_size, context_length=context),
    )


def _layers(state: Mapping[str, Tensor], prefix: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    if not found:
        raise VlkitError(f"no transformer blocks ('{prefix}N.*') in the checkpoint")
    return max(found) + 1


def _heads(width: int, heads: int | None, where: str) -> int:
    if heads is not None:
        if width % heads:
            raise VlkitError(f"{where} width {width} is not divisible by {heads} heads")
        return heads
    if width % 64:
        raise VlkitError(f"{where} width {width} is not a multiple of 64; give its head count explicitly")
    return width // 64


def clip_config_from_state(state: Mapping, act: str = "quick_gelu", eos_token_id: int | None = None,
                           vision_heads: int | None = None, text_heads: int | None = None) -> CLIPConfig:
    """A :class:`CLIPConfig` inferred from the shapes of a CLIP state dict (OpenAI, open_clip, Hugging Face or
    vlkit keys): layers from the highest block index, heads = width // 64 (OpenAI's rule), patch size from
    the patch convolution, image size from the position grid, vocabulary and context from the embeddings.

    Weights cannot tell the activation, the pooling token or the number of heads: ``act`` (``quick_gelu`` for
    OpenAI weights and open_clip's ``-quickgelu`` models; ``gelu`` for most other open_clip models),
    ``eos_token_id`` (None: the highest id, as OpenAI CLIP) and ``vision_heads``/``text_heads`` (needed where
    heads are not 64 wide, e.g. open_clip ViT-H/14, -g/14 and -bigG/14 image towers: 16 heads) give them.
    """
    tensors, wrapped = _unwrap(state)
    fmt = _detect_keys(tensors, wrapped)
    s = convert_state_dict(tensors, fmt)
    need = ["visual.patch_embed.proj.weight", "visual.pos_embed", "text.token_embedding.weight", "text.pos_embed",
            "visual.transformer.layers.0.mlp.fc1.weight", "text.transformer.layers.0.mlp.fc1.weight",
            "text_projection.weight"]
    missing = [k for k in need if k not in s]
    if missing:
        names = [n for k in missing for n in (KEY_MAPS[fmt].foreign_names(k) if fmt in KEY_MAPS else [k])]
        raise VlkitError(f"cannot infer the CLIP sizes: the checkpoint lacks {names}")
    conv = s["visual.patch_embed.proj.weight"]  # [width, 3, patch, patch]
    if conv.dim() != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise VlkitError(f"unsupported patch embedding of shape {tuple(conv.shape)}")
    vw, patch = conv.shape[0], conv.shape[-1]
    n_patches = s["visual.pos_embed"].shape[0] - 1
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise VlkitError(f"the image position embedding has {n_patches} patches, not a square grid")
    vocab, tw = s["text.token_embedding.weight"].shape
    context = s["text.pos_embed"].shape[0]
    image_size = grid * patch
    return CLIPConfig(
        embed_dim=s["text_projection.weight"].shape[0],
        vision=VisionConfig(image_size=image_size, patch_size=patch, width=vw,
                            layers=_layers(s, "visual.transformer.layers."),
                            heads=_heads(vw, vision_heads, "image tower"),
                            mlp_ratio=_mlp_ratio(vw, s["visual.transformer.layers.0.mlp.fc1.weight"].shape[0]),
                            act=act),
        text=TextConfig(vocab_size=vocab, context_length=context, width=tw,
                        layers=_layers(s, "text.transformer.layers."), heads=_heads(tw, text_heads, "text tower"),
                        mlp_ratio=_mlp_ratio(tw, s["text.transformer.layers.0.mlp.fc1.weight"].shape[0]),
                        act=act, eos_token_id=eos_token_id),
        preprocess=Preprocess(image_size=image_size, context_length=context),
    )


# --------------------------------------------------------------------------------------------------------------
# loading


def _load_strict(model: CLIP, state: dict[str, Tensor], fmt: str, source: str, foreign: Mapping[str, Tensor]) -> None:
    """check_keys, naming the checkpoint's own keys behind missing vlkit keys; then load."""
    try:
        check_keys(model, state, source)
    except VlkitError as exc:
        keymap = KEY_MAPS.get(fmt)
        missing = sorted(set(model.state_dict()) - set(state))
        names = [n for k in missing for n in (keymap.foreign_names(k) if keymap else []) if n not in foreign]
        if names:
            more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
            raise VlkitError(f"{exc}; the {fmt} checkpoint lacks {names[:10]}{more}") from None
        raise
    model.load_state_dict(state, strict=True)


def open_clip_settings(open_clip_config: Mapping[str, Any]) -> dict[str, Any]:
    """What open_clip's ``open_clip_config.json`` records that the weights cannot tell: the activation
    (``quick_gelu``), the heads (``vision_cfg.head_width``, ``text_cfg.heads``), LayerNorm epsilon
    (``norm_kwargs``) and the image mean/std. Returns keyword arguments of :func:`clip_config_from_state` plus
    ``mean``/``std``.

    Raises:
        VlkitError: settings vlkit's CLIP cannot reproduce (pooling other than the class token / the highest
            text id, a non-causal text tower, non-learned image positions).
    """
    cfg = open_clip_config.get("model_cfg", open_clip_config)
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    refuse = {
        "vision_cfg.pool_type": vision.get("pool_type", "tok") not in (None, "tok"),
        "vision_cfg.pos_embed_type": vision.get("pos_embed_type", "learnable") not in (None, "learnable"),
        "text_cfg.pool_type": text.get("pool_type", "argmax") not in (None, "argmax"),
        "text_cfg.no_causal_mask": bool(text.get("no_causal_mask")),
        "text_cfg.embed_cls": bool(text.get("embed_cls")),
    }
    bad = [f"{k}={(vision if k.startswith('vision') else text).get(k.split('.')[1])!r}" for k, v in refuse.items() if v]
    if bad:
        raise VlkitError(f"unsupported open_clip model settings {bad}: vlkit's CLIP pools the class token and "
                         "the highest text id of a causal text transformer")
    settings: dict[str, Any] = {"act": "quick_gelu" if cfg.get("quick_gelu") else "gelu"}
    if vision.get("width"):
        settings["vision_heads"] = int(vision["width"]) // int(vision.get("head_width") or 64)
    if text.get("heads"):
        settings["text_heads"] = int(text["heads"])
    elif text.get("width"):
        settings["text_heads"] = 8  # open_clip's CLIPTextCfg default
    for tower, c in (("vision", vision), ("text", text)):
        eps = (c.get("norm_kwargs") or {}).get("eps")
        if eps is not None:
            settings[f"{tower}_norm_eps"] = float(eps)
    pre = open_clip_config.get("preprocess_cfg") or {}
    for name in ("mean", "std"):
        if isinstance(pre.get(name), (list, tuple)) and len(pre[name]) == 3:
            settings[name] = tuple(float(v) for v in pre[name])
    return settings


def _config_from_state(state: Mapping, settings: Mapping[str, Any], act: str | None = None,
                       vision_heads: int | None = None, text_heads: int | None = None) -> CLIPConfig:
    """clip_config_from_state with open_clip's recorded settings, explicit arguments taking precedence."""
    config = clip_config_from_state(state, act=act or settings.get("act", "quick_gelu"),
                                    vision_heads=vision_heads or settings.get("vision_heads"),
                                    text_heads=text_heads or settings.get("text_heads"))
    for tower in ("vision", "text"):
        if f"{tower}_norm_eps" in settings:
            getattr(config, tower).norm_eps = settings[f"{tower}_norm_eps"]
    return config


def _recorded_config(src: _Source, state: Mapping[str, Tensor]) -> CLIPConfig | None:
    """The configuration a checkpoint records (Hugging Face config.json, open_clip_config.json), or None."""
    if src.hf_config is not None:
        return clip_config_from_hf(src.hf_config)
    if src.open_clip_config is not None:
        return _config_from_state(state, open_clip_settings(src.open_clip_config))
    return None


def _warn_config_mismatch(model: CLIP, want: CLIPConfig, source: str) -> None:
    for tower in ("vision", "text"):
        have, need = getattr(model.config, tower), getattr(want, tower)
        for name in ("act", "norm_eps", "heads"):
            if getattr(have, name) != getattr(need, name):
                warnings.warn(f"{source}: the checkpoint's {tower} {name} is {getattr(need, name)!r} but the model "
                              f"uses {getattr(have, name)!r}; outputs will differ (use load_clip to build a "
                              "matching model)", stacklevel=4)


def load_clip_weights(model: CLIP, path: str | Path) -> None:
    """Load CLIP weights of any supported format into ``model``, strictly (used by ``CLIP.load_pretrained``).

    Where the checkpoint records its activation, LayerNorm epsilon or heads (Hugging Face ``config.json``,
    open_clip's ``open_clip_config.json``) and they differ from the model's, a warning says so.

    Args:
        model: a CLIP whose sizes match the checkpoint.
        path: a vlkit model directory or ``.safetensors`` file, a Hugging Face ``CLIPModel`` directory, or an
            OpenAI / open_clip checkpoint (file or directory).

    Raises:
        VlkitError: unreadable or unknown checkpoint, unsupported variant, or missing / unexpected keys and
            shape mismatches (named; for foreign formats also under the checkpoint's own names).
    """
    src = _open(path)
    if src.fmt == "vlkit":
        if src.state is None:  # a vlkit model directory
            load_state_into(model, src.directory)
        else:  # a bare file with vlkit keys
            _load_strict(model, src.state, "vlkit", src.name, src.state)
        return
    state = convert_state_dict(src.state, src.fmt)
    want = _recorded_config(src, state)
    if want is not None:
        _warn_config_mismatch(model, want, src.name)
    _load_strict(model, state, src.fmt, src.name, src.state)


def _dir_preprocess(directory: Path, preprocess: Preprocess, mean=None, std=None) -> Preprocess:
    """Mean/std (given, or from a Hugging Face ``preprocessor_config.json``) and the ``tokenizer.json`` of a
    checkpoint directory."""
    changes: dict[str, Any] = {}
    if (directory / HF_PREPROCESSOR).exists():
        pre = _read_json(directory / HF_PREPROCESSOR)
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            value = pre.get(theirs)
            if isinstance(value, list) and len(value) == 3:
                changes[ours] = tuple(float(v) for v in value)
    changes.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    if (directory / TOKENIZER_NAME).exists():
        changes["tokenizer"] = str((directory / TOKENIZER_NAME).resolve())
    return replace(preprocess, **changes)


def load_clip(path: str | Path, act: str | None = None, vision_heads: int | None = None,
              text_heads: int | None = None) -> CLIP:
    """A CLIP built to match a checkpoint, with its weights.

    Args:
        path: a vlkit model directory; a Hugging Face ``CLIPModel`` directory (sizes, activations, LayerNorm
            epsilon and pooling from ``config.json``, mean/std from ``preprocessor_config.json``); or an
            OpenAI / open_clip checkpoint, file or directory (sizes inferred from the weights, see
            :func:`clip_config_from_state`; activation, heads and mean/std from an ``open_clip_config.json``
            beside the weights, see :func:`open_clip_settings`). A ``tokenizer.json`` beside foreign weights
            becomes ``preprocess.tokenizer``.
        act: the MLP activation of both towers, for checkpoints that do not record it (OpenAI, open_clip
            without ``open_clip_config.json``: ``quick_gelu`` unless given); else it overrides the recorded one.
        vision_heads, text_heads: attention heads of OpenAI / open_clip checkpoints (default: as recorded in
            ``open_clip_config.json``, else width // 64).

    Raises:
        VlkitError: as :func:`load_clip_weights`.
    """
    src = _open(path)
    if src.fmt == "vlkit":
        if src.directory is None or not (src.directory / CONFIG_NAME).exists() or src.state is not None:
            raise VlkitError(f"{path}: a bare vlkit weights file; load_clip needs the model directory "
                             f"(with {CONFIG_NAME})")
        model = load_model(src.directory)
        if not isinstance(model, CLIP):
            raise VlkitError(f"{path}: not a CLIP model")
        return model
    state = convert_state_dict(src.state, src.fmt)
    if src.fmt == "hf":
        if src.hf_config is None:
            raise VlkitError(f"{path}: Hugging Face weights without {CONFIG_NAME} beside them")
        config = clip_config_from_hf(src.hf_config)
        if act is not None:
            config.vision.act = config.text.act = act
        settings: dict[str, Any] = {}
    else:
        settings = open_clip_settings(src.open_clip_config) if src.open_clip_config is not None else {}
        config = _config_from_state(state, settings, act, vision_heads, text_heads)
    config.preprocess = _dir_preprocess(src.directory, config.preprocess, settings.get("mean"), settings.get("std"))
    model = CLIP(config)
    _load_strict(model, state, src.fmt, src.name, src.state)
    return model


# --------------------------------------------------------------------------------------------------------------
# export


def hf_config_dict(model: CLIP) -> dict[str, Any]:
    """Arguments of ``transformers.CLIPConfig`` describing ``model``.

    Raises:
        VlkitError: a model Hugging Face's ``CLIPModel`` cannot reproduce (mean pooling of the image tower,
            an activation it lacks, or pooling at token id 2, which HF treats as "argmax").
    """
    cfg = model.config
    v, t = cfg.vision, cfg.text
    if getattr(cfg, "swin", None) is not None:
        raise VlkitError("Hugging Face CLIPModel has a ViT image tower; this model's is a Swin Transformer")
    options = [k for k, plain in (("qk_norm", False), ("parallel", False), ("bias", True)) if getattr(v, k) != plain]
    if options:
        raise VlkitError(f"Hugging Face CLIPModel has no ViT option {', '.join(options)} of this image tower")
    if v.pool != "cls":
        raise VlkitError(f"Hugging Face CLIPModel pools the class token; this model uses pool={v.pool!r}")
    for tower, c in (("vision", v), ("text", t)):
        if c.act not in VLKIT_TO_HF_ACTS:
            raise VlkitError(f"{tower} activation {c.act!r} has no Hugging Face equivalent")
    if t.eos_token_id == HF_ARGMAX_EOS:
        raise VlkitError(f"eos_token_id {HF_ARGMAX_EOS} cannot be exported: Hugging Face's CLIP pools at the "
                         f"highest token id when eos_token_id == {HF_ARGMAX_EOS}")
    eos = HF_ARGMAX_EOS if t.eos_token_id is None else t.eos_token_id
    bos = 49406 if t.vocab_size == 49408 else None  # OpenAI's BPE: <|startoftext|>; unused by the model
    logit_scale = min(float(model.logit_scale.detach()), math.log(cfg.max_logit_scale))
    return {
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": VLKIT_TO_HF_ACTS[t.act],
            "layer_norm_eps": t.norm_eps, "projection_dim": cfg.embed_dim,
            "eos_token_id": eos, "bos_token_id": bos, "pad_token_id": t.pad_token_id,
        },
        "vision_config": {
            "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": VLKIT_TO_HF_ACTS[v.act], "layer_norm_eps": v.norm_eps,
            "projection_dim": cfg.embed_dim,
        },
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
    }


def _tokenizer_file(preprocess: Preprocess) -> Path | None:
    if not preprocess.tokenizer:
        return None
    path = Path(preprocess.tokenizer)
    path = path / TOKENIZER_NAME if path.is_dir() else path
    return path if path.is_file() else None


def export_hf(model: CLIP, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face ``CLIPModel`` directory (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``, and ``tokenizer.json`` when the model's preprocessing names one), which
    ``transformers.CLIPModel.from_pretrained(directory)`` loads and which computes the same embeddings.

    The logit scale is written clamped to ``max_logit_scale`` (HF does not clamp). ``config.json`` carries
    ``vlkit_version``: an existing ``directory`` is replaced only when it is such an export (or another vlkit
    model folder), never a Hugging Face folder vlkit did not write. The files are written to a temporary
    directory beside ``directory``, then moved into place.

    Raises:
        VlkitError: see :func:`hf_config_dict`; transformers not installed; ``directory`` holds files vlkit did
            not write.
    """
    try:
        import transformers
    except ImportError:
        raise VlkitError("exporting to Hugging Face needs the 'transformers' package") from None
    from safetensors.torch import save_file

    hf_config = transformers.CLIPConfig(**hf_config_dict(model))
    hf_config.architectures = ["CLIPModel"]
    hf_config.vlkit_version = __version__  # what marks the folder as vlkit's export, so exporting again replaces it
    state = HF_KEYS.from_vlkit(model.state_dict())
    logit_scale = torch.tensor(hf_config.logit_scale_init_value, dtype=model.logit_scale.dtype)
    state["logit_scale"] = logit_scale
    with torch.device("meta"):
        reference = transformers.CLIPModel(hf_config).state_dict()
    problems = sorted(set(reference) ^ set(state)) + [
        k for k in set(reference) & set(state) if reference[k].shape != state[k].shape]
    if problems:  # a bug in the key map, not a user error
        raise RuntimeError(f"exported keys do not fit transformers.CLIPModel: {problems[:10]}")

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        hf_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        pre = model.preprocess
        size = pre.image_size
        (tmp / HF_PREPROCESSOR).write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True,
        }, indent=2))
        tokenizer = _tokenizer_file(pre)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
    return directory


__all__ = ["FORMATS", "HF_KEYS", "OPENAI_KEYS", "KEY_MAPS", "KeyMap", "detect_format", "convert_state_dict",
           "clip_config_from_hf", "clip_config_from_state", "open_clip_settings", "hf_eos_to_vlkit", "hf_config_dict",
           "load_clip_weights", "load_clip", "export_hf"]
