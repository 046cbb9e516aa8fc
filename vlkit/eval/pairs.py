"""Evaluation of NLVR2 (``vlkit eval --task nlvr2``): is each row's sentence true of its two images?

The trained pair head is read from beside the model (``nlvr2_head.safetensors``, written when training ends)
or, for a checkpoint, from the checkpoint's state of its ``nlvr2`` task. Every row of the split is scored as
training validates it (:func:`vlkit.tasks.nlvr2.pair_logits`): each image fused with the sentence, the two
``[CLS]`` features concatenated, the head's true/false logits. The metrics are accuracy (NLVR2's measure),
the recall of true and of false sentences, and the accuracy of always answering the split's most common label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch

from vlkit.data.store import OpenedDataset, open_dataset
from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import classification_metrics
from vlkit.tasks.nlvr2 import PAIR_CLASSES, PairHead, head_from_state, load_pair_head


def require_pairs(data: OpenedDataset, split: str, limit: int | None = None) -> int:
    """Check, before the model is loaded, that the rows to score are pairs with a sentence and a true/false label.

    Returns:
        The number of rows to score.

    Raises:
        DataError: no second images, or a row without a second image, a sentence or a label 0/1 (naming it).
    """
    ds = open_dataset(data)
    if "image2" not in ds.schema.names:
        raise DataError(f"{data}: no second images (column 'image2'); --task nlvr2 needs a dataset of image pairs, "
                        "e.g. one ingested from NLVR2 or made by vlkit data synth --kind pairs")
    offsets = data.split(split)[:limit]
    table = ds.take(offsets, columns=["id", "label", "captions", "image2"])
    ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
    counts = pc.fill_null(pc.list_value_length(table.column("captions")), 0).to_pylist()
    second = table.column("image2")
    for i, row_id in enumerate(ids):
        if not second[i].is_valid:
            raise DataError(f"{data}: row {row_id!r} of split '{split}' has no second image")
        if not counts[i]:
            raise DataError(f"{data}: row {row_id!r} of split '{split}' has no sentence (caption)")
        if labels[i] not in (0, 1):
            raise DataError(f"{data}: row {row_id!r} of split '{split}' has label {labels[i]!r}; NLVR2 rows are "
                            "labelled 0 (false) or 1 (true)")
    return len(offsets)


def require_pair_head(loaded) -> PairHead:
    """The NLVR2 head trained with ``loaded``'s model: beside its model folder, or in its checkpoint.

    Raises:
        VlkitError: there is none (saying how to train one), or it cannot be read.
    """
    source = Path(loaded.source)
    head = load_pair_head(source)
    if head is None and (source / "state.pt").exists():
        head = _checkpoint_head(source)
    if head is None:
        raise VlkitError(f"{source}: the model has no NLVR2 head (nlvr2_head.safetensors); train it with an "
                         "'nlvr2' task (e.g. vlkit train nlvr2_synth)")
    return head


def _checkpoint_head(path: Path) -> PairHead | None:
    """The head of the first ``nlvr2`` task in a training checkpoint, or None when it has none."""
    from vlkit.config.load import load_config
    from vlkit.train.checkpoint import load_checkpoint

    cfg = load_config(path.parent.parent / "config.yaml")  # the loader has checked that it exists
    state = load_checkpoint(path)
    for task, saved in zip(cfg.tasks, state.get("tasks") or []):
        if task.name == "nlvr2":
            return head_from_state(saved, f"{path} (task nlvr2)")
    return None


@torch.no_grad()
def score_pairs(loaded, head: PairHead, data: OpenedDataset, split: str, batch_size: int = 64,
                limit: int | None = None, num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
    """True/false logits of every row of ``split`` (the first ``limit``), in split order.

    Returns:
        ``{"ids", "texts", "scores" ([rows, 2] logits: false, true), "labels" ([rows])}``.
    """
    from vlkit.data.dataset import LanceImageTextDataset, make_loader
    from vlkit.data.sampler import DistributedEpochSampler
    from vlkit.tasks.nlvr2 import pair_logits

    ds = LanceImageTextDataset(data, split, loaded.model.preprocess.image_transform(train=False), None,
                               captions="first", pairs=True)
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    sampler = DistributedEpochSampler(len(ds), 1, 0, shuffle=False)
    head = head.to(loaded.device).eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), desc="nlvr2", unit="pair", dynamic_ncols=True)
    ids, texts, scores, labels = [], [], [], []
    try:
        for batch in make_loader(ds, batch_size, sampler, num_workers=num_workers):
            with loaded.inference():
                logits = pair_logits(loaded.model, head, loaded.tokenizer, batch["image"], batch["image2"],
                                     batch["text"], loaded.device)
            scores.append(logits.float().cpu())
            ids.extend(str(i) for i in batch["id"])
            texts.extend(batch["text"])
            labels.append(batch["label"])
            if bar is not None:
                bar.update(len(batch["id"]))
    finally:
        if bar is not None:
            bar.close()
    return {"ids": ids, "texts": texts, "scores": torch.cat(scores), "labels": torch.cat(labels)}


def evaluate_nlvr2(loaded, data: OpenedDataset, split: str, base: dict, prefix: str, batch_size: int,
                   limit: int | None, num_workers: int, progress: bool):
    """The :class:`~vlkit.eval.evaluate.EvalResult` of ``--task nlvr2``: accuracy, the recall of true and of
    false sentences, the majority baseline; ``samples`` holds each row's id, sentence and answer."""
    from vlkit.eval.evaluate import EvalResult, class_details
    from vlkit.tasks.nlvr2 import fused_width

    fused_width(loaded.model, "--task nlvr2")  # a fusion model, or one clear error
    head = require_pair_head(loaded)
    out = score_pairs(loaded, head, data, split, batch_size, limit, num_workers, progress)
    labels = out["labels"]
    m = classification_metrics(out["scores"], labels)
    recall = m.per_class_recall.tolist()
    true_share = float(labels.float().mean()) * 100
    metrics = {f"{prefix}accuracy": float(m.top1), f"{prefix}recall_true": float(recall[1]),
               f"{prefix}recall_false": float(recall[0]),
               f"{prefix}majority_accuracy": max(true_share, 100 - true_share)}
    details = {"images": m.num_samples, "pairs": m.num_samples, **class_details(list(PAIR_CLASSES), labels),
               "true_share": true_share, "text": "sentence"}
    predicted = out["scores"].argmax(-1).tolist()
    samples = [{"id": i, "text": t, "answer": bool(p)} for i, t, p in zip(out["ids"], out["texts"], predicted)]
    return EvalResult(**base, metrics=metrics, details=details, embeddings=None, classification=m,
                      class_names=list(PAIR_CLASSES), scores=out["scores"], labels=labels, samples=samples)
