"""Evaluation of image-text classification (``vlkit eval --task classification``): visual entailment such as
SNLI-VE, or any labelled (image, text) pairs, scored by the classification head trained with the model.

Each row of the split pairs its image with the head's training prompt (when it was trained with one) or with
the row's first caption (an entailment hypothesis); the fused ``[CLS]`` feature goes through the saved head
(:func:`vlkit.tasks.classification.pair_logits`, the function the training task uses), and the metrics are
top-1 accuracy, mean per-class recall, the recall of each class and the confusion matrix.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
import torch

from vlkit.data.store import OpenedDataset, open_dataset
from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import classification_metrics
from vlkit.tasks.labels import dataset_classes


def require_classifier(loaded) -> Any:
    """The model's saved classification head, or a one-line error saying how to get one."""
    if loaded.classifier is None:
        raise VlkitError(f"{loaded.source}: the model has no classification head (classifier.json); train it "
                         "with a 'classification' task (e.g. vlkit train snli_ve_synth)")
    return loaded.classifier


def check_pairs(data: OpenedDataset, split: str, classifier, limit: int | None = None) -> int:
    """Check, before any image is read, that the rows to classify fit the head: every one labelled, labels
    within the head's classes and named as the head names them, and (without a prompt) every row with a text.

    Returns:
        The number of rows to classify.

    Raises:
        DataError: naming the dataset, the split and the first row at fault.
    """
    ds = open_dataset(data)
    offsets = data.split(split)[:limit]
    table = ds.take(offsets, columns=["id", "label", "captions"])
    labels, ids = table.column("label").to_pylist(), table.column("id").to_pylist()
    names = classifier.class_names
    for row_id, label in zip(ids, labels):
        if label is None:
            raise DataError(f"{data}: row {row_id!r} of split '{split}' has no label; --task classification "
                            "needs every row labelled")
        if not 0 <= label < len(names):
            raise DataError(f"{data}: row {row_id!r} has label {label}, beyond the head's {len(names)} classes "
                            f"({', '.join(names)})")
    stored = dataset_classes(data)
    for label in sorted(set(labels)):
        if label < len(stored) and not stored[label].startswith("class_") and stored[label] != names[label]:
            raise DataError(f"{data}: label {label} is {stored[label]!r} in the dataset but {names[label]!r} in "
                            "the model's classification head; evaluate on data labelled as the model was trained")
    if classifier.prompt is None:
        counts = pc.list_value_length(table.column("captions")).to_pylist()
        empty = next((i for i, c in enumerate(counts) if not c), None)
        if empty is not None:
            raise DataError(f"{data}: row {ids[empty]!r} of split '{split}' has no text (caption) to pair with "
                            "its image; the classification head was trained on captions")
    return len(offsets)


@torch.no_grad()
def classify_split(loaded, data: OpenedDataset, split: str, batch_size: int = 64, limit: int | None = None,
                   num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
    """Class scores of every row of ``split`` (the first ``limit``), in split order.

    Returns:
        ``{"ids", "texts", "scores" ([rows, classes] logits), "labels" ([rows])}``.
    """
    from vlkit.data.dataset import LanceImageTextDataset, make_loader
    from vlkit.data.sampler import DistributedEpochSampler
    from vlkit.tasks.classification import pair_logits

    classifier = require_classifier(loaded)
    captions = "none" if classifier.prompt is not None else "first"
    ds = LanceImageTextDataset(data, split, loaded.model.preprocess.image_transform(train=False), None,
                               captions=captions)
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    sampler = DistributedEpochSampler(len(ds), 1, 0, shuffle=False)
    head = classifier.head.to(loaded.device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), desc="classify", unit="pair", dynamic_ncols=True)
    ids, texts, scores, labels = [], [], [], []
    try:
        for batch in make_loader(ds, batch_size, sampler, num_workers=num_workers):
            n = batch["image"].shape[0]
            text = [classifier.prompt] * n if classifier.prompt is not None else list(batch["text"])
            with loaded.inference():
                scores.append(pair_logits(loaded.model, head, loaded.tokenizer, batch["image"], text,
                                          loaded.device).float().cpu())
            ids.extend(batch["id"])
            texts.extend(text)
            labels.append(batch["label"])
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return {"ids": [str(i) for i in ids], "texts": texts, "scores": torch.cat(scores),
            "labels": torch.cat(labels)}


def evaluate_classification(loaded, data: OpenedDataset, split: str, base: dict, prefix: str, batch_size: int,
                            limit: int | None, num_workers: int, progress: bool):
    """The :class:`~vlkit.eval.evaluate.EvalResult` of ``--task classification``: accuracy, mean per-class
    recall, per-class recall and the confusion matrix; ``samples`` holds each row's id and text."""
    from vlkit.eval.evaluate import EvalResult, class_details

    classifier = require_classifier(loaded)
    check_pairs(data, split, classifier, limit)
    out = classify_split(loaded, data, split, batch_size, limit, num_workers, progress)
    m = classification_metrics(out["scores"], out["labels"])
    metrics = {f"{prefix}accuracy": float(m.top1), f"{prefix}mean_per_class_recall": float(m.mean_per_class_recall)}
    details = {"images": m.num_samples, "pairs": m.num_samples, **class_details(classifier.class_names, out["labels"]),
               "text": "prompt" if classifier.prompt is not None else "first caption", "prompt": classifier.prompt}
    samples = [{"id": i, "text": t} for i, t in zip(out["ids"], out["texts"])]
    return EvalResult(**base, metrics=metrics, details=details, embeddings=None, classification=m,
                      class_names=list(classifier.class_names), scores=out["scores"], labels=out["labels"],
                      samples=samples)
