"""Video-text retrieval with an image-text two-tower model (CLIP, LiT, BriVL): a video's embedding is the mean
of its frames' image embeddings, as CLIP4Clip's parameter-free "meanP" similarity does (Luo et al. 2022).

Each frame goes through the image tower and is L2-normalised; the frames' mean is normalised again. With one
frame (or identical frames) the video embedding equals the image embedding, so an image-text model retrieves
videos without any new weights, and fine-tuning on video-text pairs trains the same towers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.models.outputs import TwoTowerOutput


def encode_video(model: nn.Module, video: Tensor, normalize: bool = True) -> Tensor:
    """Mean-pooled frame embeddings of a two-tower model.

    Args:
        model: a model with ``encode_image(images, normalize=...)``.
        video: ``[batch, frames, 3, H, W]``.
        normalize: L2-normalise the pooled embedding.

    Returns:
        ``[batch, embed_dim]``.
    """
    if video.dim() != 5:
        raise ValueError(f"videos must be [batch, frames, 3, H, W], got shape {tuple(video.shape)}")
    frames = model.encode_image(video.flatten(0, 1), normalize=True)  # [batch * frames, embed_dim]
    return pool_frames(frames, video.shape[1], normalize)


def pool_frames(frame_embeds: Tensor, frames: int, normalize: bool = True) -> Tensor:
    """The mean of each video's L2-normalised frame embeddings.

    Args:
        frame_embeds: ``[batch * frames, embed_dim]``, video by video (each already normalised).
        frames: frames per video.
        normalize: L2-normalise the mean.

    Returns:
        ``[batch, embed_dim]``.
    """
    pooled = frame_embeds.view(-1, frames, frame_embeds.shape[-1]).mean(dim=1)  # [batch, embed_dim]
    return F.normalize(pooled, dim=-1) if normalize else pooled


class VideoTwoTower(nn.Module):
    """A two-tower image-text model read as a video-text model: ``encode_video`` by :func:`encode_video`,
    ``encode_text`` unchanged, and ``forward(video, input_ids, attention_mask)`` returning the same
    :class:`~vlkit.models.outputs.TwoTowerOutput` (with video embeddings as ``image_embeds``) so the contrastive
    losses train it as they train images.

    Args:
        model: the two-tower model (its weights are shared, not copied).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in ("encode_image", "encode_text", "scale"):
            if not hasattr(model, name):
                raise ValueError(f"{type(model).__name__} is not a two-tower image-text model (no {name})")
        self.model = model

    @property
    def preprocess(self):
        return self.model.preprocess

    def encode_video(self, video: Tensor, normalize: bool = True) -> Tensor:
        """``[batch, frames, 3, H, W]`` -> ``[batch, embed_dim]``."""
        return encode_video(self.model, video, normalize)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask, normalize=normalize)

    def forward(self, video: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> TwoTowerOutput:
        return TwoTowerOutput(self.encode_video(video), self.encode_text(input_ids, attention_mask), self.model.scale())
