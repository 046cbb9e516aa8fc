"""Evaluation of video classification (``vlkit eval --task video-classification``): a video classifier
(``timesformer-*``) on the videos of one split, ``clips`` clips per video with their softmax scores averaged
(:func:`vlkit.tasks.video_classification.video_scores`, the function the training task validates with).

Reports top-1, top-5 and mean per-class recall, the recall of each class and the confusion matrix (rows: true
class). The class names are the dataset's; the model's head must have as many outputs as the dataset has
classes.
"""

from __future__ import annotations

from typing import Any

from vlkit.data.store import OpenedDataset, open_dataset
from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import classification_metrics
from vlkit.tasks.labels import dataset_classes
from vlkit.tasks.video_classification import collect_scores, require_video_classifier, video_scores


def check_videos(data: OpenedDataset, split: str, limit: int | None = None) -> int:
    """Check, before any video is decoded, that the split's rows hold a video and a label.

    Returns:
        The number of videos to classify.

    Raises:
        DataError: no video column, or the first row without a video or a label (named).
    """
    ds = open_dataset(data)
    if "video" not in ds.schema.names:
        raise DataError(f"{data}: no videos (column 'video'); --task video-classification reads videos")
    offsets = data.split(split)[:limit]
    table = ds.take(offsets, columns=["id", "label", "video"])
    ids, labels, videos = table.column("id").to_pylist(), table.column("label"), table.column("video")
    for i, row_id in enumerate(ids):
        if not videos[i].is_valid:
            raise DataError(f"{data}: row {row_id!r} of split '{split}' has no video")
        if not labels[i].is_valid:
            raise DataError(f"{data}: row {row_id!r} of split '{split}' has no label; --task video-classification "
                            "needs every row labelled")
    return len(offsets)


def evaluate_video_classification(loaded, data: OpenedDataset, split: str, base: dict, prefix: str,
                                  batch_size: int, limit: int | None, num_workers: int, clips: int = 1):
    """The :class:`~vlkit.eval.evaluate.EvalResult` of ``--task video-classification``.

    Args:
        loaded: the loaded model (a video classifier).
        data: the opened dataset.
        split: the split to evaluate.
        base: the result's common fields (task, dataset, split, model, tag).
        prefix: the metric-name prefix ``split/dataset/``.
        batch_size: videos per forward pass (times ``clips`` clips).
        limit: the first ``limit`` videos only.
        num_workers: decoding worker processes.
        clips: clips per video, evenly spaced within the segments; their scores are averaged.

    Raises:
        VlkitError: not a video classifier, or a head that does not fit the dataset's classes.
        DataError: see :func:`check_videos`.
    """
    from vlkit.data.dataset import make_loader
    from vlkit.data.sampler import DistributedEpochSampler
    from vlkit.data.video_dataset import LanceVideoDataset
    from vlkit.eval.evaluate import EvalResult, class_details

    if clips < 1:
        raise VlkitError(f"--clips must be at least 1, got {clips}")
    class_names = dataset_classes(data)
    frames = require_video_classifier(loaded.model, len(class_names), "--task video-classification")
    check_videos(data, split, limit)
    transform = loaded.model.preprocess.image_transform(train=False)
    ds = LanceVideoDataset(data, split, transform, num_frames=frames, train=False, clips=clips, captions="none")
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    loader = make_loader(ds, batch_size, DistributedEpochSampler(len(ds), 1, 0, shuffle=False),
                         num_workers=num_workers)
    with loaded.inference():
        out = collect_scores(video_scores(loaded.model, loader, loaded.device))
    m = classification_metrics(out.scores, out.labels)
    details: dict[str, Any] = {"images": m.num_samples, "videos": m.num_samples, "clips_per_video": clips,
                               "frames": frames,
                               **class_details(class_names, out.labels)}
    return EvalResult(**base, metrics=m.as_dict(prefix), details=details, embeddings=None, classification=m,
                      class_names=list(class_names), scores=out.scores, labels=out.labels,
                      samples=[{"id": i} for i in out.ids])
