"""The pieces of ``gpu_train.py``'s training step: synthetic inputs, the model + loss module that is compiled,
the optimizer, the open_clip twin of a vlkit CLIP, and the scaled-dot-product-attention backend controls.

Not a benchmark itself (``run_all.py`` skips files whose name starts with ``_``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from vlkit.modules.losses.contrastive import contrastive_loss

#: vlkit named sizes and the open_clip model of the same architecture.
OPEN_CLIP_NAMES = {"clip-vit-b-16": "ViT-B-16", "clip-vit-b-32": "ViT-B-32", "clip-vit-l-14": "ViT-L-14"}

#: ``--sdpa`` choices and the ``torch.nn.attention.SDPBackend`` members each allows, in priority order.
#: ``flash-first`` allows every backend but tries flash first for each call (``auto``: torch's own choice).
SDPA_BACKENDS: dict[str, tuple[str, ...] | None] = {
    "flash": ("FLASH_ATTENTION",), "efficient": ("EFFICIENT_ATTENTION",), "cudnn": ("CUDNN_ATTENTION",),
    "math": ("MATH",), "flash-first": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "auto": None}


def synthetic_inputs(cfg: Any, batch: int, device: torch.device, *, seed: int = 0,
                     channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """Random normalised images and caption-like token ids, created on ``device``.

    Captions are 8 to 32 tokens long (the end-of-text token last), padded with zeros to the context length,
    as CLIP tokenizers pad. The end-of-text id is the configured one, else the vocabulary's largest id (which
    both vlkit and open_clip pool at).

    Args:
        cfg: a vlkit ``CLIPConfig`` (image size, context length and vocabulary).
        batch: samples.
        device: where the tensors are made (no host-to-device copy).
        seed: seed of the generator.
        channels_last: lay the images out channels-last.

    Returns:
        images ``[batch, 3, S, S]`` float32 and input_ids ``[batch, context]`` int64.
    """
    size, context, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    eos = cfg.text.eos_token_id if cfg.text.eos_token_id is not None else vocab - 1
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch, 3, size, size, device=device, generator=gen)  # [batch, 3, S, S]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ids = torch.randint(1, vocab - 1, (batch, context), device=device, generator=gen)
    ids = torch.where(ids == eos, torch.ones_like(ids), ids)
    lengths = torch.randint(8, min(context, 32) + 1, (batch,), device=device, generator=gen)
    positions = torch.arange(context, device=device)
    ids = torch.where(positions[None] < lengths[:, None], ids, torch.zeros_like(ids))  # [batch, context]
    ids[torch.arange(batch, device=device), lengths - 1] = eos
    return images, ids


class ContrastiveStep(nn.Module):
    """A CLIP and its contrastive loss in one module, so ``torch.compile`` sees the whole forward.

    Args:
        model: a vlkit CLIP (returns a ``TwoTowerOutput``) or an open_clip CLIP (returns a dict or a tuple).
        impl: ``vlkit`` or ``open_clip``.
    """

    def __init__(self, model: nn.Module, impl: str):
        super().__init__()
        if impl not in ("vlkit", "open_clip"):
            raise ValueError(f"impl must be 'vlkit' or 'open_clip', got {impl!r}")
        self.model, self.impl = model, impl

    def forward(self, images: Tensor, input_ids: Tensor) -> Tensor:
        """The scalar loss of one batch."""
        out = self.model(images, input_ids)
        if self.impl == "vlkit":
            image, text, scale = out.image_embeds, out.text_embeds, out.logit_scale
        elif isinstance(out, dict):
            image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            image, text, scale = out[0], out[1], out[2]
        return contrastive_loss(image, text, scale).loss


def make_optimizer(model: nn.Module, device: torch.device, fused: bool) -> torch.optim.AdamW:
    """AdamW as CLIP is trained (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on matrices only).

    Args:
        model: the model whose parameters it updates.
        device: ``fused=True`` is used on CUDA when ``fused`` is set; elsewhere torch's default.
        fused: ask for the fused CUDA kernel (False: the multi-tensor ``foreach`` implementation).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.2}, {"params": other, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6}
    if device.type == "cuda":
        kwargs["fused" if fused else "foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_open_clip(name: str, cfg: Any) -> tuple[nn.Module | None, str]:
    """The open_clip model of a vlkit CLIP's architecture (random weights), or None and why not.

    Named sizes map to open_clip's own configurations (``ViT-B-16`` ...); any other size is built from the
    vlkit configuration. QuickGELU is used where vlkit uses it, so both compute the same functions.

    Args:
        name: the vlkit model name.
        cfg: the vlkit ``CLIPConfig`` to mirror.

    Returns:
        ``(model, description)``; ``model`` is None when open_clip cannot be imported or built.
    """
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        return None, f"open_clip is not importable here ({type(exc).__name__}: {exc})"
    quick = cfg.vision.act == "quick_gelu"
    version = getattr(open_clip, "__version__", "?")
    try:
        if name in OPEN_CLIP_NAMES:
            model = open_clip.create_model(OPEN_CLIP_NAMES[name], pretrained=None, force_quick_gelu=quick,
                                           output_dict=True)
            return model, f"open_clip {version} {OPEN_CLIP_NAMES[name]}{' (QuickGELU)' if quick else ''}"
        vision = {"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                  "width": cfg.vision.width, "layers": cfg.vision.layers,
                  "head_width": cfg.vision.width // cfg.vision.heads, "mlp_ratio": cfg.vision.mlp_ratio}
        text = {"context_length": cfg.text.context_length, "vocab_size": cfg.text.vocab_size,
                "width": cfg.text.width, "heads": cfg.text.heads, "layers": cfg.text.layers}
        try:
            model = open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick,
                                   output_dict=True)
        except TypeError:  # versions without output_dict return a tuple
            model = open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick)
        return model, f"open_clip {version} CLIP built from the {name} configuration"
    except Exception as exc:  # noqa: BLE001 - report, do not abort the vlkit figures
        return None, f"open_clip could not build {name} ({type(exc).__name__}: {exc})"


def sdpa_context(backend: str):
    """A context that restricts ``scaled_dot_product_attention`` to ``backend`` (see :data:`SDPA_BACKENDS`).

    Raises:
        TypeError: ``flash-first`` on a torch whose ``sdpa_kernel`` cannot set priorities.
    """
    members = SDPA_BACKENDS[backend]
    if members is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = [getattr(SDPBackend, m) for m in members]
    return sdpa_kernel(chosen, set_priority=True) if len(chosen) > 1 else sdpa_kernel(chosen)


def classify_attention_kernels(names: Iterable[str]) -> list[str]:
    """The attention implementations that ran, from profiler event names (operators and kernels).

    Returns:
        sorted subset of ``flash``, ``efficient`` (memory-efficient / cutlass), ``cudnn``, ``math``,
        ``flash (cpu)``.
    """
    found = set()
    for name in names:
        low = name.lower().replace("_", "")  # aten::_scaled_dot_product_x and autograd's ScaledDotProductX alike
        if "flashattentionforcpu" in low:
            found.add("flash (cpu)")
        elif "cudnn" in low and ("attention" in low or "sdpa" in low or "fmha" in low or "mha" in low):
            found.add("cudnn")
        elif "flash" in low and ("attention" in low or "fwd" in low or "bwd" in low):
            found.add("flash")
        elif "efficientattention" in low or "fmhacutlass" in low or "memeff" in low:
            found.add("efficient")
        elif "scaleddotproductattentionmath" in low:
            found.add("math")
    return sorted(found)
