"""Visual Dialog as discriminative ranking of answer options with a fusion model.

Each candidate answer of a round is paired with the image as ``caption [SEP] history [SEP] question [SEP]
candidate`` (:mod:`vlkit.tasks.dialog_inputs`), and the fused ``[CLS]`` feature goes through the model's image-text
matching head; the candidate's score is the head's log-odds of "matched" (``logit[1] - logit[0]``).

Training takes one round with a known answer per image per epoch (a new draw every epoch, seeded by
``(seed, epoch, row)``), scores the right answer and ``negatives`` wrong options drawn from the round's others, and
minimises the cross-entropy of the right one among them. Evaluation ranks every option of every round of the
validation split and reports MRR, recall@1/5/10 and mean rank, NDCG where the dataset has dense relevance, and
the MRR of a random ranking (closed form, :func:`vlkit.metrics.ranking.chance_mrr`) beside them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.errors import VlkitError
from vlkit.metrics.ranking import chance_mrr, ranking_metrics
from vlkit.tasks import register_task
from vlkit.tasks.base import Task
from vlkit.tasks.dialog_inputs import (DialogRound, PairEncoder, dialog_columns, dialog_rounds,
                                       require_matching_logits)
from vlkit.train.distributed import DistInfo, all_gather_objects, unwrap


def match_score(logits: Tensor) -> Tensor:
    """``[pairs, 2]`` ITM logits -> ``[pairs]`` log-odds of "matched"."""
    return logits[:, 1] - logits[:, 0]


@register_task("visdial")
class VisDialTask(Task):
    """Visual Dialog answer ranking on one dataset of dialogs; see the module docstring.

    Args: as :class:`vlkit.tasks.base.Task`.
    """

    _encoder: PairEncoder | None = None

    @classmethod
    def reads(cls, cfg) -> list[str]:
        return ["dialog_questions", "dialog_options", "dialog_gt_index"]

    def encoder(self) -> PairEncoder:
        if self._encoder is None:
            self._encoder = PairEncoder(self.tokenizer)
        return self._encoder

    def dataset(self, split: str, train: bool) -> LanceImageTextDataset:
        return LanceImageTextDataset(self.data.path, split, self.preprocess.image_transform(train=train and self.augment),
                                     None, captions="none", seed=self.seed, columns=dialog_columns(self.data.path),
                                     require=["dialog_options"])

    def train_loader(self, per_rank_batch: int) -> torch.utils.data.DataLoader:
        return self.shuffled_loader(self.dataset(self.data.train_split, train=True), per_rank_batch)

    def _rng(self, what: str, index: int) -> random.Random:
        """The generator of one draw (``what``) for row ``index`` in this epoch."""
        return random.Random(f"{self.seed}:visdial-{what}:{self.train_set.epoch}:{index}")

    def forward_backward(self, model: nn.Module, batch: dict[str, Any], micro_batches: int, autocast,
                         loss_scale: float = 1.0, scaler=None) -> dict[str, float]:
        if micro_batches != 1:
            raise VlkitError("task visdial: use grad_accum=1")
        inner = unwrap(model)
        require_matching_logits(inner)
        rounds = dialog_rounds(batch, self.cfg.history_rounds, self.tokenizer,
                               pick=lambda index, known: self._rng("round", index).randrange(len(known)))
        if not rounds:
            raise VlkitError(f"dataset {self.key}: a training batch has no dialog round with a known answer")
        owners, contexts, texts, sizes = [], [], [], []
        for rd in rounds:
            candidates = training_candidates(rd, self.cfg.negatives, self._rng("negatives", rd.index))
            owners += [rd.owner] * len(candidates)
            contexts += [rd.context] * len(candidates)
            texts += candidates
            sizes.append(len(candidates))
        tokens = self.encoder()(contexts, texts)
        device = self.dist.device
        images = batch["image"][torch.tensor(owners, dtype=torch.long)].to(device, non_blocking=True)
        with autocast:
            cls = model(images, tokens["input_ids"].to(device), tokens["attention_mask"].to(device),
                        head="cls")  # fused [CLS]: [pairs, width]
            scores = match_score(inner.itm_head(cls).float())  # [pairs]
        loss = candidate_loss(scores, sizes)
        scaled = loss * self.cfg.weight * loss_scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast, batch_size: int = 64) -> dict[str, float]:
        """Ranking metrics over every round of the validation split (every rank scores its share)."""
        if not self.data.val_split:
            return {}
        ranked = rank_rounds(model, self.tokenizer, self.dataset(self.data.val_split, train=False), self.dist,
                             autocast, self.cfg.history_rounds, batch_size)
        m = ranking_metrics([r.scores for r in ranked], [r.gt_index for r in ranked],
                            [None if r.relevance is None else torch.tensor(r.relevance) for r in ranked])
        out = {f"val/{self.key}/{k}": float(v) for k, v in m.as_dict().items()}
        out[f"val/{self.key}/chance_mrr"] = chance_mrr([len(r.scores) for r in ranked if r.gt_index is not None])
        return out


def training_candidates(rd: DialogRound, negatives: int, rng: random.Random) -> list[str]:
    """The right answer first, then up to ``negatives`` other options of the round (drawn without replacement;
    an option that reads as the right answer is never a negative)."""
    right = rd.options[rd.gt_index]
    others = [o for k, o in enumerate(rd.options) if k != rd.gt_index and o != right]
    return [right, *rng.sample(others, min(negatives, len(others)))]


def candidate_loss(scores: Tensor, sizes: list[int]) -> Tensor:
    """Mean over rounds of the cross-entropy of the first candidate among its round's ``sizes[i]``.

    Args:
        scores: ``[sum(sizes)]`` the candidates' scores, round after round, the right one first in each.
        sizes: candidates per round.
    """
    losses = [F.cross_entropy(part[None, :], torch.zeros(1, dtype=torch.long, device=scores.device))
              for part in torch.split(scores, sizes)]
    return torch.stack(losses).mean()


@dataclass
class RankedRound:
    """One ranked round: its row index and round number, the options' scores, the right option, relevance."""

    index: int
    round: int
    scores: Tensor
    gt_index: int | None
    relevance: list[float] | None


def score_rounds(inner: nn.Module, encoder: PairEncoder, images: Tensor, rounds: list[DialogRound],
                 pair_batch: int, device) -> list[Tensor]:
    """The scores of every option of ``rounds`` (one ``[options]`` tensor each), each image encoded once.

    Args:
        inner: a fusion model with ``match_features`` and ``match_logits``.
        encoder: tokenises the pairs.
        images: ``[batch, 3, H, W]`` the batch's images (``rounds[i].owner`` indexes them).
        rounds: the rounds to score.
        pair_batch: pairs per forward pass.
        device: where the model is.
    """
    features = inner.match_features(images.to(device, non_blocking=True))  # [batch, ...]
    owners = [rd.owner for rd in rounds for _ in rd.options]
    contexts = [rd.context for rd in rounds for _ in rd.options]
    texts = [o for rd in rounds for o in rd.options]
    scores = []
    for start in range(0, len(texts), pair_batch):
        part = slice(start, start + pair_batch)
        tokens = encoder(contexts[part], texts[part])
        feats = features[torch.tensor(owners[part], dtype=torch.long, device=features.device)]
        logits = inner.match_logits(feats, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        scores.append(match_score(logits.float()).cpu())
    flat = torch.cat(scores) if scores else torch.zeros(0)
    return list(torch.split(flat, [len(rd.options) for rd in rounds]))


def rank_rounds(model: nn.Module, tokenizer, ds: LanceImageTextDataset, dist: DistInfo, autocast,
                history_rounds: int = 3, batch_size: int = 64, progress=None) -> list[RankedRound]:
    """Every round with options of ``ds`` scored, in dataset order (row, then round).

    Args:
        model: a fusion model with an ITM head (albef-*, vilt-*).
        tokenizer: its tokenizer.
        ds: a dataset opened with the dialog columns.
        dist: process-group information (each rank scores its share of the images).
        autocast: the precision context.
        history_rounds: previous rounds in each context.
        batch_size: images per batch, and image-text pairs per forward pass.
        progress: called with the number of images done after each batch, or None.
    """
    inner = unwrap(model)
    require_matching_logits(inner)
    encoder = PairEncoder(tokenizer)
    sampler = DistributedEpochSampler(len(ds), dist.world_size, dist.rank, shuffle=False)
    was_training = inner.training
    inner.eval()
    rows: list[tuple[int, list[RankedRound]]] = []
    try:
        for batch in make_loader(ds, batch_size, sampler, num_workers=0):
            rounds = dialog_rounds(batch, history_rounds, tokenizer)
            with autocast:
                scores = score_rounds(inner, encoder, batch["image"], rounds, max(batch_size, 16), dist.device)
            per_row: dict[int, list[RankedRound]] = {}
            for rd, s in zip(rounds, scores):
                per_row.setdefault(rd.index, []).append(RankedRound(rd.index, rd.round, s, rd.gt_index, rd.relevance))
            for index in batch["index"].tolist():
                rows.append((index, per_row.get(index, [])))
            if progress is not None:
                progress(len(batch["index"]))
    finally:
        inner.train(was_training)
    merged = {index: ranked for part in all_gather_objects(rows) for index, ranked in part}  # drops padding
    return [rd for index in sorted(merged) for rd in merged[index]]
