"""Text-video retrieval with a two-tower image-text model (CLIP, LiT, BriVL), as CLIP4Clip's "meanP" does it.

Each training clip's ``frames`` frames go through the image tower in one batch (the model's own forward, so data
parallel wrappers see the call), each frame embedding is normalised and a video's embedding is the normalised
mean of its frames' (:func:`vlkit.models.video_two_tower.pool_frames`); the contrastive loss of the retrieval
task then pairs videos with captions. Validation embeds one clip per video (the centre of each segment) and its
first caption, and reports recall@1/5/10 both ways as the retrieval task does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlkit.config.schema import TaskConfig
from vlkit.errors import VlkitError
from vlkit.metrics.retrieval import retrieval_metrics
from vlkit.models.video_two_tower import pool_frames
from vlkit.tasks import register_task
from vlkit.tasks.retrieval import RetrievalTask
from vlkit.train.distributed import all_gather_objects, unwrap


@register_task("video_retrieval")
class VideoRetrievalTask(RetrievalTask):
    """Contrastive training of a two-tower model on (video, caption) pairs; see the module docstring.

    Args: as :class:`~vlkit.tasks.retrieval.RetrievalTask`; ``cfg.frames`` frames per clip.
    """

    @classmethod
    def reads(cls, cfg: TaskConfig) -> list[str]:
        return ["captions", "video"]

    def _videos(self, split: str, train: bool, captions: str):
        from vlkit.data.video_dataset import LanceVideoDataset

        transform = self.preprocess.image_transform(train=train and self.augment)
        return LanceVideoDataset(self.data.path, split, transform, num_frames=self.cfg.frames, train=train,
                                 tokenizer=self.tokenizer, captions=captions, seed=self.seed)

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self._videos(self.data.train_split, True, self.cfg.captions), per_rank_batch)

    def _embeds(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Video and text embeddings ``[batch, embed_dim]`` through the model's forward (frames flattened)."""
        device = self.dist.device
        video = batch["video"].to(device, non_blocking=True)  # [batch, frames, 3, H, W]
        out = model(video.flatten(0, 1), batch["input_ids"].to(device, non_blocking=True),
                    batch["attention_mask"].to(device, non_blocking=True))
        return pool_frames(out.image_embeds.float(), video.shape[1]), out.text_embeds.float()

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if micro_batches != 1 or self.cfg.loss == "momentum":
            raise VlkitError("task video_retrieval: use grad_accum=1 and the contrastive or siglip loss")
        with autocast:
            video_embeds, text_embeds = self._embeds(model, batch)
            loss = self.loss_from_embeddings(model, video_embeds, text_embeds)
        self._backward(loss * self.cfg.weight * loss_scale, scaler)
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        """Recall@1/5/10 both ways between the validation videos and their first captions."""
        if not self.data.val_split:
            return {}
        from vlkit.data.dataset import make_loader
        from vlkit.data.sampler import DistributedEpochSampler

        ds = self._videos(self.data.val_split, False, "first")
        sampler = DistributedEpochSampler(len(ds), self.dist.world_size, self.dist.rank, shuffle=False)
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        rows: list[tuple[int, Tensor, Tensor]] = []
        try:
            for batch in make_loader(ds, batch_size, sampler, num_workers=0):
                with autocast:
                    video, text = self._embeds(inner, batch)
                for j, index in enumerate(batch["index"].tolist()):
                    rows.append((index, video[j].cpu(), text[j].cpu()))
        finally:
            inner.train(was_training)
        merged = {index: (v, t) for part in all_gather_objects(rows) for index, v, t in part}
        order = sorted(merged)
        videos = torch.stack([merged[k][0] for k in order])
        texts = torch.stack([merged[k][1] for k in order])
        metrics = retrieval_metrics(videos, texts, torch.arange(len(order)))
        return {f"val/{self.key}/{name}": float(v) for name, v in metrics.as_dict().items()}
