"""open_clip CoCa checkpoints to vlkit's :class:`~vlkit.models.coca.model.CoCa`.

One key map, :data:`OPEN_CLIP_COCA_KEYS`, read from vlkit's side: each vlkit key names the open_clip key(s) it is
made of and how (copied, transposed, concatenated, or a slice of a fused ``in_proj``). Loading walks the model's
own keys, so a checkpoint key no rule reads is unknown and a key a rule needs is missing; both are errors that
name the keys, as are shape mismatches.

Example:
    >>> model = vlkit.create_model("coca-vit-b-32", pretrained="coca_ViT-B-32-laion2b.bin")
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError
from vlkit.models.clip.convert import _OPENAI_BLOCK, _compile, _read_file, _state_file_in, _unwrap
from vlkit.models.io import CONFIG_NAME, check_keys, load_state_into

Op = Callable[[list[Tensor]], Tensor]


def _copy(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _transpose(ts: list[Tensor]) -> Tensor:
    return ts[0].t()  # open_clip's [in, out] projection matrices -> nn.Linear's [out, in]


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts, dim=0)


def _query_rows(ts: list[Tensor]) -> Tensor:
    return ts[0][: ts[0].shape[0] // 3]  # q of a fused [3 * dim, ...] in_proj


def _key_value_rows(ts: list[Tensor]) -> Tensor:
    return ts[0][ts[0].shape[0] // 3:]  # k and v of a fused in_proj, in vlkit's kv_proj order


@dataclass(frozen=True)
class Source:
    """Foreign key templates and how their tensors make the vlkit tensor."""

    keys: tuple[str, ...]
    op: Op = _copy


class CoCaKeyMap:
    """vlkit key templates (``{i}`` a layer, ``{p}`` weight/bias) -> one or more alternative :class:`Source`;
    the first alternative whose keys are all in the checkpoint is used.

    Args:
        rules: ``(vlkit_template, source_or_alternatives)``.
        ignore: regular expressions of foreign keys that carry no weights.
    """

    def __init__(self, rules: list[tuple[str, Source | tuple[Source, ...]]], ignore: tuple[str, ...] = ()):
        self.rules = [(_compile(v), (s,) if isinstance(s, Source) else s) for v, s in rules]
        self.ignore = tuple(re.compile(p) for p in ignore)

    def sources(self, vlkit_key: str) -> tuple[Source, ...]:
        """The alternatives of a vlkit key with the layer index and parameter filled in (empty: no rule)."""
        for regex, alternatives in self.rules:
            m = regex.match(vlkit_key)
            if m:
                return tuple(Source(tuple(k.format(**m.groupdict()) for k in s.keys), s.op) for s in alternatives)
        return ()

    def to_vlkit(self, state: Mapping[str, Tensor], model: nn.Module, source: str = "open_clip checkpoint") \
            -> dict[str, Tensor]:
        """The state dict of ``model`` made from the foreign ``state``.

        Raises:
            VlkitError: foreign keys no rule reads, keys a rule needs that are absent, or shapes that differ
                from the model's; each named.
        """
        own = model.state_dict()
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        missing: list[str] = []
        for key in own:
            alternatives = self.sources(key)
            if not alternatives:
                raise RuntimeError(f"no open_clip rule for vlkit key {key!r}")  # a bug in the key map
            found = next((s for s in alternatives if all(k in state for k in s.keys)), None)
            if found is None:
                missing.extend(k for k in alternatives[0].keys if k not in state and k not in missing)
                continue
            used.update(found.keys)
            out[key] = found.op([state[k] for k in found.keys])
        unknown = sorted(k for k in state if k not in used and not any(p.search(k) for p in self.ignore))
        problems = []
        if unknown:
            hint = ""
            if any(k.startswith("visual.attn_pool_contrastive.") for k in unknown):
                hint = " (a separate contrastive pooler: build the model with contrastive_pooler='separate')"
            problems.append(f"unknown key(s) {unknown[:10]}" + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10
                                                                 else "") + hint)
        if missing:
            problems.append(f"missing key(s) {missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10
                                                                 else ""))
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in out.items() if v.shape != own[k].shape]
        if shapes:
            problems.append(f"shape mismatches (vlkit key: checkpoint vs model) {shapes[:10]}")
        if problems:
            raise VlkitError(f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(problems))
        return {k: v.contiguous() for k, v in out.items()}


def _block(vlkit_prefix: str, foreign_prefix: str) -> list[tuple[str, Source]]:
    """A pre-norm self-attention block (open_clip's ResidualAttentionBlock, vlkit's TransformerEncoderLayer)."""
    return [(vlkit_prefix + v, Source((foreign_prefix + f,))) for v, f in _OPENAI_BLOCK.items()]


def _pooler(vlkit_prefix: str, foreign_prefix: str) -> list[tuple[str, Source | tuple[Source, ...]]]:
    """open_clip's AttentionalPooler: separate q/k/v weights when the context is wider than the queries,
    one fused ``in_proj_weight`` when both widths are equal (as ``nn.MultiheadAttention`` stores them)."""
    v, f = vlkit_prefix, foreign_prefix
    return [
        (v + "queries", Source((f + "query",))),
        (v + "ln_q.{p}", Source((f + "ln_q.{p}",))),
        (v + "ln_context.{p}", Source((f + "ln_k.{p}",))),
        (v + "attn.q_proj.weight", (Source((f + "attn.q_proj_weight",)),
                                    Source((f + "attn.in_proj_weight",), _query_rows))),
        (v + "attn.kv_proj.weight", (Source((f + "attn.k_proj_weight", f + "attn.v_proj_weight"), _cat),
                                     Source((f + "attn.in_proj_weight",), _key_value_rows))),
        (v + "attn.q_proj.bias", Source((f + "attn.in_proj_bias",), _query_rows)),
        (v + "attn.kv_proj.bias", Source((f + "attn.in_proj_bias",), _key_value_rows)),
        (v + "attn.out_proj.{p}", Source((f + "attn.out_proj.{p}",))),
    ]


def _cross_block(vlkit_prefix: str, foreign_prefix: str) -> list[tuple[str, Source]]:
    """open_clip's cross-attention ResidualAttentionBlock (``ln_1_kv``) -> vlkit's CrossAttentionBlock."""
    v, f = vlkit_prefix, foreign_prefix
    return [
        (v + "ln_1.{p}", Source((f + "ln_1.{p}",))),
        (v + "ln_kv.{p}", Source((f + "ln_1_kv.{p}",))),
        (v + "attn.q_proj.{p}", Source((f + "attn.in_proj_{p}",), _query_rows)),
        (v + "attn.kv_proj.{p}", Source((f + "attn.in_proj_{p}",), _key_value_rows)),
        (v + "attn.out_proj.{p}", Source((f + "attn.out_proj.{p}",))),
        (v + "ln_2.{p}", Source((f + "ln_2.{p}",))),
        (v + "mlp.fc1.{p}", Source((f + "mlp.c_fc.{p}",))),
        (v + "mlp.fc2.{p}", Source((f + "mlp.c_proj.{p}",))),
    ]


#: open_clip ``CoCa`` keys (``visual.``, ``text.``, ``text_decoder.``, ``logit_scale``) by vlkit key.
OPEN_CLIP_COCA_KEYS = CoCaKeyMap([
    ("visual.patch_embed.proj.weight", Source(("visual.conv1.weight",))),
    ("visual.class_embedding", Source(("visual.class_embedding",))),
    ("visual.pos_embed", Source(("visual.positional_embedding",))),
    ("visual.ln_pre.{p}", Source(("visual.ln_pre.{p}",))),
    ("visual.ln_post.{p}", Source(("visual.ln_post.{p}",))),  # "separate": normalises the tokens both poolers read
    *_block("visual.transformer.layers.{i}.", "visual.transformer.resblocks.{i}."),
    *_pooler("attn_pool.", "visual.attn_pool."),
    ("attn_pool.ln_out.{p}", Source(("visual.ln_post.{p}",))),  # "first": the norm after the pooler
    *_pooler("attn_pool_contrastive.", "visual.attn_pool_contrastive."),
    ("visual_projection.weight", Source(("visual.proj",), _transpose)),
    ("text.token_embedding.weight", Source(("text.token_embedding.weight",))),
    ("text.pos_embed", Source(("text.positional_embedding",))),
    ("text.cls_emb", Source(("text.cls_emb",))),
    *_block("text.transformer.layers.{i}.", "text.transformer.resblocks.{i}."),
    ("text.ln_final.{p}", Source(("text.ln_final.{p}",))),
    ("text_projection.weight", Source(("text.text_projection",), _transpose)),
    *_block("decoder.layers.{i}.", "text_decoder.resblocks.{i}."),
    *_cross_block("decoder.cross_layers.{i}.", "text_decoder.cross_attn.{i}."),
    ("decoder.ln_final.{p}", Source(("text_decoder.ln_final.{p}",))),
    ("decoder.lm_head.weight", Source(("text_decoder.text_projection",), _transpose)),
    ("logit_scale", Source(("logit_scale",))),
], ignore=(r"(^|\.)attn_mask$", r"(^|\.)position_ids$"))


def detect_coca_format(keys, source: str = "state dict") -> str:
    """``"open_clip"`` (an open_clip CoCa: ``text_decoder.`` and ``text.cls_emb``) or ``"vlkit"``.

    Raises:
        VlkitError: neither.
    """
    keys = set(keys)
    if any(k.startswith("text_decoder.") for k in keys) or "text.cls_emb" in keys and "visual.proj" in keys:
        return "open_clip"
    if any(k.startswith("decoder.cross_layers.") for k in keys):
        return "vlkit"
    raise VlkitError(f"{source}: not a CoCa checkpoint (no open_clip 'text_decoder.' or vlkit 'decoder.cross_layers.'"
                     f" keys; first keys: {sorted(keys)[:5]})")


def convert_open_clip_coca(state: Mapping[str, Tensor], model: nn.Module, source: str = "open_clip checkpoint") \
        -> dict[str, Tensor]:
    """An open_clip CoCa state dict (possibly wrapped under ``state_dict`` or prefixed ``module.``) as the
    state dict of ``model`` (see :meth:`CoCaKeyMap.to_vlkit`)."""
    tensors, _ = _unwrap(state)
    return OPEN_CLIP_COCA_KEYS.to_vlkit(tensors, model, source)


def load_coca_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights into a CoCa, strictly (used by ``CoCa.load_pretrained``).

    Args:
        model: a CoCa whose sizes match the checkpoint.
        path: a vlkit model directory, or a ``.pt``/``.bin``/``.safetensors`` file (or a directory holding one)
            with open_clip CoCa or vlkit keys. Files are read with ``torch.load(weights_only=True)`` or
            safetensors.

    Raises:
        VlkitError: unreadable or unknown checkpoint; unknown, missing or mis-shaped keys (named).
    """
    path = Path(path)
    if not path.exists():
        raise VlkitError(f"{path}: no such file or directory")
    if path.is_dir() and (path / CONFIG_NAME).exists():
        load_state_into(model, path)
        return
    file = _state_file_in(path) if path.is_dir() else path
    obj, _ = _read_file(file)
    state, _ = _unwrap(obj)
    if detect_coca_format(state, str(file)) == "vlkit":
        check_keys(model, state, str(file))
    else:
        state = OPEN_CLIP_COCA_KEYS.to_vlkit(state, model, str(file))
    model.load_state_dict(state, strict=True)


__all__ = ["OPEN_CLIP_COCA_KEYS", "CoCaKeyMap", "Source", "detect_coca_format", "convert_open_clip_coca",
           "load_coca_weights"]
