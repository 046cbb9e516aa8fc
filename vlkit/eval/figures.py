"""The figures of an evaluation report, drawn with matplotlib's Agg backend (no display needed).

* :func:`similarity_matrix`: image x caption cosine similarities of a sample, thumbnails above the columns,
  captions beside the rows, every cell annotated, the true pairs outlined.
* :func:`retrieval_examples`: for a few captions, the five images retrieved first, the correct one framed.
* :func:`per_class_bars`: each class's recall, sorted, with the overall accuracy and chance marked.
* :func:`confusion_figure`: the row-normalised confusion matrix, class names on both axes.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

DPI = 150
CORRECT = "#2a9d3f"
MISSED = "#d1495b"
FRAME = "#c8c8c8"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _wrap(text: str, width: int, lines: int) -> str:
    wrapped = textwrap.wrap(text, width=width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return "\n".join(wrapped)


def _text_color(value: float) -> str:
    """Black on light cells, white on dark ones (``value`` is the cell's position on the colour scale)."""
    return "white" if value > 0.6 else "#222222"


def similarity_matrix(sims: np.ndarray, thumbs: Sequence[np.ndarray], captions: Sequence[str],
                      correct: Sequence[int], out: str | Path, title: str) -> Path:
    """Draw a caption x image similarity matrix with image thumbnails above its columns.

    Args:
        sims: ``[captions, images]`` cosine similarities.
        thumbs: one ``[H, W, 3]`` thumbnail per image (column).
        captions: one text per row.
        correct: for each row, the column of the caption's own image (outlined).
        out: the PNG to write.
        title: the figure's title.
    """
    from matplotlib.patches import Rectangle

    n_rows, n_cols = sims.shape
    cell = 1.0
    fig = _figure(3.6 + n_cols * cell + 1.0, 1.2 + (n_rows + 1.1) * cell)
    ax = fig.add_axes((3.5 / fig.get_figwidth(), 0.35 / fig.get_figheight(),
                       n_cols * cell / fig.get_figwidth(), (n_rows + 1.1) * cell / fig.get_figheight()))
    lo, hi = float(sims.min()), float(sims.max())
    hi = hi if hi > lo else lo + 1e-6
    heat = ax.imshow(sims, cmap="YlGnBu", vmin=lo, vmax=hi, extent=(-0.5, n_cols - 0.5, n_rows - 0.5, -0.5),
                     interpolation="nearest")
    for j, thumb in enumerate(thumbs):  # one row of thumbnails above the matrix, in the same coordinates
        ax.imshow(thumb, extent=(j - 0.46, j + 0.46, -0.6, -1.52), interpolation="antialiased")
    row_best = sims.argmax(axis=1)
    for i in range(n_rows):
        for j in range(n_cols):
            scale = (sims[i, j] - lo) / (hi - lo)
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color=_text_color(scale), fontweight="bold" if j == row_best[i] else "normal")
        ax.add_patch(Rectangle((correct[i] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e4572e", linewidth=2.4))
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -1.6)
    ax.set_yticks(range(n_rows), [_wrap(c, 38, 3) for c in captions], fontsize=8)
    ax.set_xticks(range(n_cols), [f"image {j + 1}" for j in range(n_cols)], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cax = fig.add_axes(((3.6 + n_cols * cell) / fig.get_figwidth(), 0.35 / fig.get_figheight(),
                        0.18 / fig.get_figwidth(), n_rows * cell / fig.get_figheight()))
    bar = fig.colorbar(heat, cax=cax)
    bar.set_label("cosine similarity", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.text(0.01, 1 - 0.28 / fig.get_figheight(), title, fontsize=12, fontweight="bold", va="top")
    fig.text(0.01, 1 - 0.62 / fig.get_figheight(),
             "outlined: the caption's own image   ·   bold: the highest score in the row", fontsize=8.5,
             color="#555555", va="top")
    return _save(fig, Path(out))


def retrieval_examples(queries: Sequence[str], hits: Sequence[Sequence[tuple[np.ndarray, float, bool]]],
                       ranks: Sequence[int], answers: Sequence[tuple[np.ndarray, float]], out: str | Path,
                       title: str) -> Path:
    """Draw, for each caption, its top retrieved images; the correct image is framed in green.

    Args:
        queries: the caption texts.
        hits: per caption, the retrieved ``(thumbnail, score, is_correct)`` in rank order.
        ranks: per caption, the 1-based rank of its correct image.
        answers: per caption, the correct image's ``(thumbnail, score)``; drawn at the end of the row when it
            is not among the hits.
        out: the PNG to write.
        title: the figure's title.
    """
    k = max(len(h) for h in hits)
    n = len(queries)
    missed_any = any(r > k for r in ranks)
    ratios = [2.6] + [1.0] * k + ([0.25, 1.0] if missed_any else [])
    height = 1.55 * n + 0.75
    fig = _figure(1.3 * sum(ratios) + 0.3, height)
    grid = fig.add_gridspec(n, len(ratios), width_ratios=ratios, left=0.01, right=0.99, top=1 - 0.72 / height,
                            bottom=0.01, wspace=0.1, hspace=0.3)
    for row, (query, row_hits, rank, answer) in enumerate(zip(queries, hits, ranks, answers)):
        text_ax = fig.add_subplot(grid[row, 0])
        text_ax.axis("off")
        text_ax.text(0.0, 0.62, f"\u201c{_wrap(query, 34, 3)}\u201d", fontsize=9.5, va="center", ha="left",
                     style="italic", transform=text_ax.transAxes)
        found = rank <= k
        text_ax.text(0.0, 0.08, f"correct image: rank {rank}", fontsize=8.5, ha="left", va="center",
                     color=CORRECT if found else MISSED, fontweight="bold", transform=text_ax.transAxes)
        for col, (thumb, score, is_correct) in enumerate(row_hits):
            _thumb_axes(fig.add_subplot(grid[row, 1 + col]), thumb, f"#{col + 1}  {score:.2f}", is_correct)
        if missed_any:
            ax = fig.add_subplot(grid[row, -1])
            if found:
                ax.axis("off")
            else:
                _thumb_axes(ax, answer[0], f"correct #{rank}  {answer[1]:.2f}", True)
    fig.text(0.01, 1 - 0.22 / fig.get_figheight(), title, fontsize=12, fontweight="bold", va="top")
    fig.text(0.01, 1 - 0.48 / fig.get_figheight(), "framed in green: the image the caption was written for",
             fontsize=8.5, color="#555555", va="top")
    return _save(fig, Path(out))


def _thumb_axes(ax, thumb: np.ndarray, label: str, correct: bool) -> None:
    ax.imshow(thumb, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(CORRECT if correct else FRAME)
        spine.set_linewidth(4.0 if correct else 0.8)
    ax.set_title(label, fontsize=8, color=CORRECT if correct else "#333333",
                 fontweight="bold" if correct else "normal", pad=3)


def per_class_bars(names: Sequence[str], recall: np.ndarray, support: np.ndarray, overall: float,
                   out: str | Path, title: str, max_rows: int = 60) -> Path:
    """Horizontal bars of each class's recall (percent), best first, with overall accuracy and chance marked.

    Args:
        names: class names by label.
        recall: ``[classes]`` recall in percent, NaN for classes without samples (left out).
        support: ``[classes]`` samples per class.
        overall: the overall top-1 accuracy in percent.
        out: the PNG to write.
        title: the figure's title.
        max_rows: with more classes than this, only the best and the worst ``max_rows // 2`` are drawn.
    """
    from matplotlib import colormaps

    present = [i for i in range(len(names)) if not np.isnan(recall[i])]
    order = sorted(present, key=lambda i: (-recall[i], names[i]))
    hidden = 0
    if len(order) > max_rows:
        hidden = len(order) - max_rows
        order = order[: max_rows // 2] + order[len(order) - (max_rows - max_rows // 2):]
    half = max_rows // 2
    positions = np.array([p + (1 if hidden and p >= half else 0) for p in range(len(order))])  # a gap row
    rows = len(order) + (1 if hidden else 0)
    labels = [_wrap(names[i], 32, 1) for i in order]
    label_width = 0.3 + 0.068 * max(len(label) for label in labels)  # inches, at 8 pt
    width = label_width + 5.6
    fig = _figure(width, 1.15 + 0.27 * rows)
    h = fig.get_figheight()
    ax = fig.add_axes((label_width / width, 0.55 / h, 5.3 / width, 1 - 1.1 / h))
    cmap = colormaps["RdYlGn"]
    values = np.array([recall[i] for i in order])
    ax.barh(positions, values, height=0.72, color=[cmap(0.12 + 0.76 * v / 100) for v in values],
            edgecolor="white", linewidth=0.5)
    for y, i in zip(positions, order):
        hits = int(round(recall[i] * support[i] / 100))
        ax.text(min(recall[i], 100) + 1.2, y, f"{recall[i]:.0f}%  ({hits}/{int(support[i])})", va="center",
                fontsize=7.5, color="#333333", zorder=4,
                bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85))
    chance = 100.0 / len(names)
    ax.axvline(overall, color="#1d3557", linestyle="--", linewidth=1.2, label=f"top-1 accuracy {overall:.1f}%")
    ax.axvline(chance, color="#888888", linestyle=":", linewidth=1.2, label=f"chance {chance:.1f}%")
    if hidden:
        ax.text(50, half, f"… {hidden} classes between these not shown …", ha="center", va="center", fontsize=8,
                style="italic", color="#666666", bbox=dict(facecolor="white", edgecolor="none", pad=1.5))
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_ylim(rows - 0.4, -0.6)
    ax.set_xlim(0, 118)
    ax.set_xticks(range(0, 101, 20), [f"{v}%" for v in range(0, 101, 20)], fontsize=8)
    ax.set_xlabel("recall (images of the class classified correctly)", fontsize=8.5)
    ax.grid(True, axis="x", alpha=0.25, linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    ax.legend(fontsize=8, loc="lower right", frameon=True, framealpha=0.9, edgecolor="0.85")
    fig.text(0.01, 1 - 0.22 / fig.get_figheight(), title, fontsize=12, fontweight="bold", va="top")
    return _save(fig, Path(out))


def confusion_figure(confusion: np.ndarray, names: Sequence[str], out: str | Path, title: str) -> Path:
    """The confusion matrix, each row normalised to the true class's images; counts written in the cells.

    Args:
        confusion: ``[classes, classes]`` counts, row = true class, column = predicted class.
        names: class names by label.
        out: the PNG to write.
        title: the figure's title.
    """
    n = len(names)
    support = confusion.sum(axis=1, keepdims=True)
    share = np.divide(100.0 * confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    from matplotlib.patches import Rectangle

    side = float(np.clip(0.42 * n, 4.0, 16.0))
    left, bottom = (2.2, 1.6) if n <= 80 else (0.6, 0.6)
    fig = _figure(side + left + 1.3, side + bottom + 0.85)
    w, h = fig.get_figwidth(), fig.get_figheight()
    ax = fig.add_axes((left / w, bottom / h, side / w, side / h))
    top = float(min(100.0, max(10.0, np.ceil(share.max() / 10) * 10)))  # the scale ends near the largest share
    heat = ax.imshow(share, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
    for i in np.flatnonzero(support[:, 0] == 0):  # classes without images: a grey row, not a white one
        ax.add_patch(Rectangle((-0.5, i - 0.5), n, 1, facecolor="#eeeeee", edgecolor="none", zorder=2))
    if n <= 40:  # the diagonal (correct predictions) outlined
        for i in range(n):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#1d3557", linewidth=0.8,
                                   zorder=3))
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center",
                            fontsize=8 if n <= 20 else 6, color=_text_color(share[i, j] / top),
                            fontweight="bold" if i == j else "normal")
    if n <= 80:
        labels = [_wrap(name, 24, 1) for name in names]
        size = 8 if n <= 30 else 6
        ax.set_xticks(range(n), labels, rotation=50, ha="right", rotation_mode="anchor", fontsize=size)
        ax.set_yticks(range(n), labels, fontsize=size)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted class", fontsize=9)
    ax.set_ylabel("true class", fontsize=9)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6 if n <= 40 else 0)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cax = fig.add_axes(((left + side + 0.25) / w, bottom / h, 0.18 / w, side / h))
    bar = fig.colorbar(heat, cax=cax)
    bar.set_label("% of the true class's images", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.text(0.01, 1 - 0.22 / h, title, fontsize=12, fontweight="bold", va="top")
    legend = ["colour: share of the row (true class)"]
    legend += ["numbers: image counts"] if n <= 30 else []
    legend += ["outlined: correct"] if n <= 40 else []
    legend += ["grey: no images of the class"] if (support == 0).any() else []
    fig.text(0.01, 1 - 0.5 / h, "; ".join(legend), fontsize=8.5, color="#555555", va="top")
    return _save(fig, Path(out))
