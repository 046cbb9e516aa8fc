"""``vlkit eval --task visdial``: rank the answer options of every dialog round of a split with a trained fusion
model and score the ranking (MRR, recall@1/5/10, mean rank, NDCG where the dataset has dense relevance).

The dialog history given with each question is as long as the model was trained with: the ``history_rounds``
of the visdial task in the run's ``config.yaml`` (beside the model directory), else 3.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch

from vlkit.data.store import OpenedDataset, open_dataset, split_indices
from vlkit.errors import DataError

DEFAULT_HISTORY_ROUNDS = 3


def require_dialogs(dataset: Any, split: str, limit: int | None = None) -> None:
    """Raise unless ``split`` of ``dataset`` holds dialog rounds with answer options.

    Raises:
        DataError: no dialog columns, or no round with options in the split (or its first ``limit`` images).
    """
    ds = open_dataset(dataset)
    if "dialog_options" not in ds.schema.names:
        raise DataError(f"{dataset}: no dialogs; --task visdial needs a dataset ingested from a VisDial file")
    offsets = (dataset.split(split) if isinstance(dataset, OpenedDataset) else split_indices(ds, split))[:limit]
    options = ds.take(offsets, columns=["dialog_options"]).column("dialog_options")
    if not (pc.sum(pc.list_value_length(options)).as_py() or 0):
        which = f"the first {limit} images of split '{split}' have" if limit is not None else f"split '{split}' has"
        raise DataError(f"{dataset}: {which} no dialog rounds with answer options")


def trained_history_rounds(source: str | Path) -> int:
    """The ``history_rounds`` of the first visdial task of the run a model directory belongs to, or the default
    when there is no such run config."""
    from vlkit.config.yaml_io import read_yaml

    source = Path(source)
    for folder in (source, source.parent, source.parent.parent):
        path = folder / "config.yaml"
        if not path.is_file():
            continue
        try:
            tasks = read_yaml(path).get("tasks") or []
        except Exception:  # an unreadable config says nothing about the history: use the default
            return DEFAULT_HISTORY_ROUNDS
        for task in tasks:
            if isinstance(task, dict) and task.get("name") == "visdial":
                value = task.get("history_rounds", DEFAULT_HISTORY_ROUNDS)
                return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
                    else DEFAULT_HISTORY_ROUNDS
        return DEFAULT_HISTORY_ROUNDS
    return DEFAULT_HISTORY_ROUNDS


def evaluate_dialog(loaded, dataset: Any, split: str, base: dict, prefix: str, batch_size: int,
                    limit: int | None, progress: bool = False):
    """Rank every option of every round of ``split`` and score the ranking.

    Args:
        loaded: a :class:`~vlkit.inference.loading.LoadedModel` of a fusion model with an ITM head.
        dataset: the dataset (a path or an opened handle).
        split: the split.
        base: the :class:`~vlkit.eval.evaluate.EvalResult` fields every task fills.
        prefix: metric-name prefix ``split/dataset/``.
        batch_size: images per batch (and image-text pairs per forward pass).
        limit: only the first ``limit`` images.
        progress: show a progress bar.

    Returns:
        An :class:`~vlkit.eval.evaluate.EvalResult` with the metrics and, in its details, the counts, the
        history length and ``chance_mrr`` (the MRR of a random ranking, closed form).
    """
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.data.store import open_dataset
    from vlkit.eval.evaluate import EvalResult
    from vlkit.metrics.ranking import chance_mrr, ranking_metrics
    from vlkit.tasks.dialog_inputs import dialog_columns, require_matching_logits
    from vlkit.tasks.visdial import rank_rounds
    from vlkit.train.distributed import DistInfo

    require_matching_logits(loaded.model)
    history = trained_history_rounds(loaded.source)
    ds = LanceImageTextDataset(dataset, split, loaded.model.preprocess.image_transform(train=False), None,
                               captions="none", columns=dialog_columns(dataset), require=["dialog_options"])
    if limit is not None:
        ds.offsets = ds.offsets[:limit]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), desc="visdial", unit="image", dynamic_ncols=True)
    try:
        ranked = rank_rounds(loaded.model, loaded.tokenizer, ds, DistInfo(device=loaded.device),
                             contextlib.nullcontext(), history, batch_size,
                             progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    m = ranking_metrics([r.scores for r in ranked], [r.gt_index for r in ranked],
                        [None if r.relevance is None else torch.tensor(r.relevance) for r in ranked])
    counts = [len(r.scores) for r in ranked if r.gt_index is not None]
    details = {"images": len(ds), "rounds": len(ranked), "rounds_with_answer": m.num_queries,
               "rounds_with_relevance": m.num_relevance, "options": sum(len(r.scores) for r in ranked),
               "history_rounds": history, "chance_mrr": chance_mrr(counts) if counts else None,
               "chance_mean_rank": sum((n + 1) / 2 for n in counts) / len(counts) if counts else None}
    ids = open_dataset(dataset).take([ds.offsets[r.index] for r in ranked], columns=["id"]).column("id").to_pylist()
    samples = [{"id": row_id, "round": r.round + 1, "ranks": option_ranks(r.scores), "gt_index": r.gt_index}
               for row_id, r in zip(ids, ranked)]
    return EvalResult(**base, metrics=m.as_dict(prefix), details=details, embeddings=None, samples=samples)


def option_ranks(scores: torch.Tensor) -> list[int]:
    """The rank of each option (1: best) by descending score, equal scores in option order (as the metrics
    count them)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices.tolist()
    ranks = [0] * len(order)
    for place, option in enumerate(order):
        ranks[option] = place + 1
    return ranks


def print_dialog_table(summary: dict) -> None:
    """The table ``vlkit eval --task visdial`` prints."""
    metrics = {k.rsplit("/", 1)[-1]: v for k, v in summary["metrics"].items()}
    print(f"{summary['images']} images, {summary['rounds']} rounds ({summary['rounds_with_answer']} with a known "
          f"answer, {summary['rounds_with_relevance']} with dense relevance), {summary['options']} options scored, "
          f"history of {summary['history_rounds']} rounds\n")
    rows = [("MRR", "mrr", "chance_mrr"), ("R@1", "r1", None), ("R@5", "r5", None), ("R@10", "r10", None),
            ("mean rank", "mean_rank", "chance_mean_rank"), ("NDCG", "ndcg", None)]
    for label, key, chance in rows:
        if key not in metrics or metrics[key] != metrics[key]:  # absent, or NaN (no round with an answer)
            continue
        line = f"{label:12}{metrics[key]:8.2f}"
        if chance and summary.get(chance) is not None:
            line += f"   (random ranking {summary[chance]:.2f})"
        print(line)
    if "ndcg" not in metrics:
        print("NDCG left out: no evaluated round has dense relevance")
    print("(MRR, R@K and NDCG times 100)")


def dialog_body(result, table) -> str:
    """The HTML report's body for a visdial evaluation (``table(header, rows)`` draws a table)."""
    import html

    d = result.details
    metrics = {k.rsplit("/", 1)[-1]: v for k, v in result.metrics.items()}
    rows = [[label, f"{metrics[key]:.2f}"] for label, key in (("MRR", "mrr"), ("R@1 %", "r1"), ("R@5 %", "r5"),
                                                               ("R@10 %", "r10"), ("mean rank", "mean_rank"),
                                                               ("NDCG", "ndcg"))
            if key in metrics and metrics[key] == metrics[key]]
    if d.get("chance_mrr") is not None:
        rows += [["MRR of a random ranking", f"{d['chance_mrr']:.2f}"],
                 ["mean rank of a random ranking", f"{d['chance_mean_rank']:.2f}"]]
    rows += [[name, html.escape(str(d[key]))] for name, key in (
        ("images", "images"), ("rounds", "rounds"), ("rounds with a known answer", "rounds_with_answer"),
        ("rounds with dense relevance", "rounds_with_relevance"), ("options scored", "options"),
        ("history rounds", "history_rounds"))]
    return "<h2>Visual Dialog: answer options ranked</h2>" + table(["metric", "value"], rows)
