"""A figure of MAE reconstructions: originals, masked inputs and reconstructions, one row each."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vlkit.errors import VlkitError
from vlkit.models.mae.loss import patchify, unpatchify

FIGURE_NAME = "mae_reconstructions.png"


@torch.no_grad()
def reconstruct(model, images: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Originals, masked inputs and reconstructions ``[batch, 3, H, W]`` on the [0, 1] scale.

    The reconstruction shows the model's prediction at the masked patches (brought back from per-patch normalised
    pixels with each patch's own mean and spread when the model trains on those) and the original visible patches.

    Args:
        model: an :class:`~vlkit.models.mae.model.MAE`.
        images: normalised images ``[batch, 3, H, W]``.
        seed: seed of the masks.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    mask = model.random_mask(images.shape[0], torch.device("cpu"), gen)
    mask.keep, mask.mask, mask.restore = (t.to(images.device) for t in (mask.keep, mask.mask, mask.restore))
    out = model(images, mask=mask)
    model.train(was_training)
    p = model.config.patch_size
    target = patchify(images, p)  # [batch, patches, p*p*3]
    pred = out.pred.float()
    if model.config.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    m = out.mask[..., None]  # [batch, patches, 1]
    h, w = images.shape[-2:]
    masked = unpatchify(target * (1 - m), p, h, w)
    recon = unpatchify(target * (1 - m) + pred * m, p, h, w)
    pre = model.preprocess
    mean = torch.tensor(pre.mean, device=images.device)[None, :, None, None]
    std = torch.tensor(pre.std, device=images.device)[None, :, None, None]

    def to_unit(x: Tensor) -> Tensor:
        return (x * std + mean).clamp(0, 1).cpu()

    grey = (1 - unpatchify(m.expand_as(target), p, h, w)).cpu()  # masked patches drawn grey
    return to_unit(images), to_unit(masked) * grey + 0.5 * (1 - grey), to_unit(recon)


def save_reconstruction_figure(model, images: Tensor, path: str | Path, seed: int = 0) -> Path:
    """Draw :func:`reconstruct` of ``images`` (at most 8) to a PNG at ``path`` (written beside, then renamed).

    Raises:
        VlkitError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise VlkitError("the MAE figure needs matplotlib: pip install matplotlib") from None
    import io

    from vlkit.utils.fs import atomic_write

    rows = reconstruct(model, images[:8], seed)
    n = rows[0].shape[0]
    fig = Figure(figsize=(1.4 * n, 4.4))
    FigureCanvasAgg(fig)
    for r, (title, batch) in enumerate(zip(("original", "masked", "reconstruction"), rows)):
        for c in range(n):
            ax = fig.add_subplot(3, n, r * n + c + 1)
            ax.imshow(batch[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return atomic_write(Path(path), buf.getvalue())
