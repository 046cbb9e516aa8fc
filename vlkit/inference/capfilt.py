"""CapFilt (BLIP's caption bootstrapping): a captioner writes synthetic captions for every image, a filter (the
image-text matching head) scores the original and the synthetic captions, and only the captions it judges to
match their image are kept.

:func:`capfilt` computes the decisions and touches no file; :func:`vlkit.data.capfilt_store.write_capfilt` writes them.

Every text of an image is scored by ``match_scores`` (see :mod:`vlkit.inference.matching`) and kept when its
matching probability reaches ``threshold``. An image whose texts are all below the threshold keeps its best
one (an image without any caption would drop out of training); the report counts these. A synthetic caption
equal to one of the image's original captions (ignoring case and spacing) is not added twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.errors import VlkitError
from vlkit.inference.captions import write_captions
from vlkit.inference.interface import require_generative
from vlkit.inference.matching import require_matching

ORIGINAL = "original"
SYNTHETIC = "synthetic"
#: BLIP samples its synthetic captions with nucleus sampling, for their diversity
DEFAULT_SETTINGS: dict[str, Any] = {"do_sample": True, "top_p": 0.9, "max_new_tokens": 30}


@dataclass
class ScoredText:
    """One caption of an image with its filter score.

    Attributes:
        text: the caption.
        source: ``original`` (in the dataset before) or ``synthetic`` (written by the captioner).
        score: the matching probability the filter gives it.
        kept: whether it stays.
    """

    text: str
    source: str
    score: float
    kept: bool = False


@dataclass
class FilteredImage:
    """The decision for one image (a row of the dataset).

    Attributes:
        id: the image's id.
        texts: its original and synthetic captions, scored.
        rescued: every text was below the threshold and the best one was kept anyway.
    """

    id: str
    texts: list[ScoredText]
    rescued: bool = False

    @property
    def kept(self) -> list[ScoredText]:
        return [t for t in self.texts if t.kept]


@dataclass
class CapFiltResult:
    """What :func:`capfilt` decided, and its counts.

    Attributes:
        images: one :class:`FilteredImage` per processed image, in split order.
        threshold: the matching probability a caption needed.
        settings: the decoding options of the captioner.
        prompt: the captioner's prompt.
        model: where the model came from; ``model_tag`` its weights' fingerprint.
    """

    images: list[FilteredImage]
    threshold: float
    settings: dict[str, Any]
    prompt: str | None
    model: str = ""
    model_tag: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        texts = [t for image in self.images for t in image.texts]
        original = [t for t in texts if t.source == ORIGINAL]
        synthetic = [t for t in texts if t.source == SYNTHETIC]
        self.counts = {
            "images": len(self.images),
            "original": len(original), "original_kept": sum(t.kept for t in original),
            "original_dropped": sum(not t.kept for t in original),
            "synthetic": len(synthetic), "synthetic_added": sum(t.kept for t in synthetic),
            "synthetic_dropped": sum(not t.kept for t in synthetic),
            "rescued_images": sum(image.rescued for image in self.images),
            "captions_before": len(original), "captions_after": sum(t.kept for t in texts),
        }

    def decisions(self) -> dict[str, list[tuple[str, str, float, bool]]]:
        """Per image id, its texts as ``(text, source, score, kept)`` (what
        :func:`vlkit.data.capfilt_store.write_capfilt` writes)."""
        return {image.id: [(t.text, t.source, t.score, t.kept) for t in image.texts] for image in self.images}

    def meta(self) -> dict[str, Any]:
        """What the written columns record about the run."""
        return {"model": self.model, "model_tag": self.model_tag, "threshold": self.threshold,
                "prompt": self.prompt, "decoding": self.settings}

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts, settings and mean scores."""
        def mean(source: str, kept: bool | None = None) -> float | None:
            values = [t.score for i in self.images for t in i.texts
                      if t.source == source and (kept is None or t.kept == kept)]
            return round(sum(values) / len(values), 4) if values else None

        return {"model": self.model, "model_tag": self.model_tag, "threshold": self.threshold,
                "prompt": self.prompt, "decoding": self.settings, **self.counts,
                "mean_score": {ORIGINAL: mean(ORIGINAL), SYNTHETIC: mean(SYNTHETIC)}}


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .")


def decide(texts: list[ScoredText], threshold: float) -> bool:
    """Mark the texts at or above ``threshold`` kept; if none is, keep the best one. Returns whether it was
    rescued that way."""
    for t in texts:
        t.kept = t.score >= threshold
    if texts and not any(t.kept for t in texts):
        max(texts, key=lambda t: t.score).kept = True
        return True
    return False


@torch.no_grad()
def score_pairs(model: torch.nn.Module, tokenizer, features: torch.Tensor, owner: list[int], texts: list[str],
                batch_size: int = 256) -> list[float]:
    """The matching probability of each text with the image of feature row ``owner[i]``, in batches."""
    scores: list[float] = []
    index = torch.tensor(owner, dtype=torch.long)
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size])
        rows = features.index_select(0, index[start:start + batch_size].to(features.device))
        device = features.device
        out = model.match_scores(rows, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        scores += out.float().cpu().tolist()
    return scores


@torch.no_grad()
def capfilt(loaded, dataset: str | Path, split: str | None = "train", *, threshold: float = 0.5,
            settings: dict[str, Any] | None = None, prompt: str | None = None, num_synthetic: int = 1,
            seed: int = 0, batch_size: int = 32, limit: int | None = None,
            progress: Callable[[int], None] | None = None) -> CapFiltResult:
    """Caption and filter the images of ``split`` of ``dataset`` (nothing is written).

    Args:
        loaded: a :class:`~vlkit.inference.loading.LoadedModel` whose model writes captions and has a matching head
            (a BLIP).
        dataset: a vlkit Lance dataset.
        split: the split to bootstrap (None: every row).
        threshold: matching probability a caption needs to stay, in [0, 1].
        settings: :func:`vlkit.inference.generate.generate` options (default: nucleus sampling, top-p 0.9).
        prompt: the captioner's prompt (None: the one the model was trained with).
        num_synthetic: synthetic captions written per image.
        seed: seed of the sampling.
        batch_size: images per step.
        limit: only the first ``limit`` images of the split.
        progress: called with the number of images done after each batch.

    Raises:
        VlkitError: a model that cannot write captions or has no matching head, a threshold out of range.
    """
    model = require_generative(loaded.model)
    require_matching(model, "CapFilt's filter")
    if not 0.0 <= threshold <= 1.0:
        raise VlkitError(f"--threshold must be in [0, 1], got {threshold}")
    if num_synthetic < 1:
        raise VlkitError(f"--num-synthetic must be at least 1, got {num_synthetic}")
    tokenizer = loaded.tokenizer
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    if not settings.get("do_sample"):
        settings.pop("top_p", None)
    settings["num_return_sequences"] = num_synthetic
    if settings.get("num_beams", 1) > 1:
        settings["num_beams"] = max(settings["num_beams"], num_synthetic)
    prompt = prompt if prompt is not None else getattr(loaded.generation, "prompt", None)
    ds = LanceImageTextDataset(dataset, split, model.preprocess.image_transform(train=False), None, captions="all")
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    images_out: list[FilteredImage] = []
    was_training = model.training
    model.eval()
    try:
        for batch in make_loader(ds, batch_size, list(range(len(ds))), num_workers=0):
            images = batch["image"].to(device)
            extra = {"generator": generator} if settings.get("do_sample") else {}
            written = write_captions(model, tokenizer, images, prompt or None, **settings, **extra)
            per_image: list[list[ScoredText]] = [[] for _ in batch["id"]]
            for text, image in zip(batch["text"], batch["caption_image"].tolist()):
                per_image[image].append(ScoredText(text, ORIGINAL, 0.0))
            for image, captions in enumerate(written):
                seen = {_norm(t.text) for t in per_image[image]}
                for text, _ in captions:
                    if text and _norm(text) not in seen:
                        seen.add(_norm(text))
                        per_image[image].append(ScoredText(text, SYNTHETIC, 0.0))
            owner = [i for i, texts in enumerate(per_image) for _ in texts]
            flat = [t for texts in per_image for t in texts]
            if flat:
                features = model.match_features(images)
                for t, score in zip(flat, score_pairs(model, tokenizer, features, owner, [t.text for t in flat])):
                    t.score = score
            for image_id, texts in zip(batch["id"], per_image):
                images_out.append(FilteredImage(image_id, texts, decide(texts, threshold)))
            if progress is not None:
                progress(len(batch["id"]))
    finally:
        model.train(was_training)
    return CapFiltResult(images_out, threshold, settings, prompt, str(loaded.source), loaded.tag)
