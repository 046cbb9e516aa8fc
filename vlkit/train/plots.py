"""Training curves from a run's ``metrics.jsonl``, drawn for a person to look at.

``metrics.jsonl`` holds one JSON object per line. Each line has an integer ``"step"`` and any number of
numeric metrics named ``group/name`` (``train/loss``, ``train/lr``, ``val/coco/t2i_r1`` ...); lines may
carry different keys, so dense training series and sparse validation series live side by side.

The figure has one panel per metric group (the key up to its last ``/``; a key without ``/`` is its own
group) and one line per metric, against the step. Metrics of one group whose typical magnitudes differ
several-fold (a loss near 3 and a learning rate near 1e-4, recalls near 50 and their sum near 300) get
panels of their own, so that no line is squashed flat against the axis; the learning rates of a group
(``lr``, ``lr_image``, ``lr_text``, ``lr_head``: one per parameter group) always share one panel, on a log axis
when their sizes are apart, and ``lr`` (the heads' rate, kept for older runs) is left out where
``lr_head`` is drawn. Noisy dense series (the training loss) are drawn faintly with
a smoothed (exponential moving average) line on top; sparse series (validation) get markers; a loss (or
a retrieval rank) that spans more than a decade gets a log-scale axis. The legend shows each metric's latest value.
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlkit.errors import VlkitError
from vlkit.utils.fs import atomic_write, check_output_file

METRICS_FILE = "metrics.jsonl"
DPI = 150
# Metrics of one group share a panel only if their typical (median) magnitudes are within this factor.
_SHARE_PANEL_RATIO = 10**0.8
# A dense series whose total variation exceeds this multiple of its range is "noisy" and gets smoothed.
_NOISY_VARIATION = 3.0


@dataclass
class Series:
    """One metric: its values at increasing steps (the last line wins where a step repeats)."""

    key: str
    steps: np.ndarray
    values: np.ndarray

    @property
    def group(self) -> str:
        return metric_group(self.key)

    @property
    def name(self) -> str:
        group = self.group
        return self.key[len(group) + 1 :] if self.key != group else self.key


@dataclass
class _Panel:
    title: str
    series: list[Series] = field(default_factory=list)


def metric_group(key: str) -> str:
    """The group of a metric key: everything before its last ``/`` (``val/coco/t2i_r1`` -> ``val/coco``).

    A key without ``/`` is its own group.
    """
    return key.rsplit("/", 1)[0] if "/" in key else key


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_path(run_dir: str | Path) -> Path:
    """``RUN_DIR/metrics.jsonl``, or ``run_dir`` itself when it names a ``.jsonl`` file."""
    path = Path(run_dir)
    if path.suffix == ".jsonl" and not path.is_dir():
        return path
    return path / METRICS_FILE


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Read a ``metrics.jsonl`` file into one :class:`Series` per numeric metric, in order of first appearance.

    Lines without a numeric ``"step"`` are skipped, as are values that are not finite numbers. A final line
    that is not valid JSON is ignored (the run may be writing it right now); any other invalid line is an
    error. Where a step occurs more than once (a resumed run), the later value wins.

    Args:
        path: The ``metrics.jsonl`` file.

    Returns:
        ``{key: Series}``; empty when the file holds no numeric metrics.

    Raises:
        VlkitError: If the file is missing or unreadable, or a line other than the last is not a JSON object.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VlkitError(f"no metrics file {path}: is this a run directory?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlkitError(f"cannot read metrics file {path}: {exc}") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    points: dict[str, dict[float, float]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                break
            raise VlkitError(f"{path} line {i + 1} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            if i == last:
                break
            raise VlkitError(f"{path} line {i + 1} is not a JSON object")
        step = record.get("step")
        if not _is_number(step):
            continue
        for key, value in record.items():
            if key != "step" and _is_number(value):
                points.setdefault(key, {})[step] = float(value)
    series = {}
    for key, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.float64)
        series[key] = Series(key, steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return series


def _select(series: dict[str, Series], patterns: Sequence[str] | None, path: Path) -> dict[str, Series]:
    if not patterns:
        return series

    def wanted(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) or key.startswith(p.rstrip("/") + "/") for p in patterns)

    chosen = {k: s for k, s in series.items() if wanted(k)}
    if not chosen:
        shown = ", ".join(list(series)[:20]) + (" ..." if len(series) > 20 else "")
        raise VlkitError(f"{path}: no metric matches {' '.join(patterns)}; the metrics are: {shown}")
    return chosen


def _magnitude(s: Series) -> float | None:
    """log10 of the series' typical size: the median magnitude, robust to a large first evaluation."""
    size = np.abs(s.values)
    typical = float(np.median(size)) or float(size.max())
    return math.log10(typical) if typical > 0 else None


def _is_rate(s: Series) -> bool:
    """A learning rate: ``lr`` or the rate of one parameter group, ``lr_<group>``."""
    return s.name == "lr" or s.name.startswith("lr_")


def _drop_duplicate_rates(series: dict[str, Series]) -> dict[str, Series]:
    """Without ``<group>/lr`` where ``<group>/lr_head`` is there: both are the heads' rate."""
    return {k: s for k, s in series.items()
            if not (s.name == "lr" and f"{s.group}/lr_head" in series)}


def _panels(series: dict[str, Series]) -> list[_Panel]:
    """One panel per group, split where magnitudes within a group are too far apart to share an axis.

    The learning rates of a group share one panel whatever their magnitudes.
    """
    series = _drop_duplicate_rates(series)
    groups: dict[str, list[Series]] = {}
    # Grouped metrics first, in order of appearance; bare top-level keys (epoch, time ...) last.
    for s in sorted(series.values(), key=lambda s: "/" not in s.key):
        groups.setdefault(s.group, []).append(s)
    panels = []
    limit = math.log10(_SHARE_PANEL_RATIO)
    for group, members in groups.items():
        ordered = sorted(members, key=lambda s: (_magnitude(s) is not None, _magnitude(s) or 0.0))
        rates = [s for s in ordered if _is_rate(s)]
        clusters: list[list[Series]] = [rates] if rates else []
        floor = None
        for s in (s for s in ordered if not _is_rate(s)):
            mag = _magnitude(s)
            if clusters and clusters[-1] is not rates and (mag is None or floor is None or mag - floor <= limit):
                clusters[-1].append(s)
                floor = mag if floor is None else floor
            else:
                clusters.append([s])
                floor = mag
        position = {s.key: i for i, s in enumerate(members)}
        clusters.sort(key=lambda c: min(position[s.key] for s in c))
        for cluster in clusters:
            cluster.sort(key=lambda s: position[s.key])
            title = group
            if len(clusters) > 1:
                label = ("lr" if cluster is rates else cluster[0].name if len(cluster) == 1
                         else _common_affix([s.name for s in cluster]))
                title = f"{group} · {label}" if label else group
            panels.append(_Panel(title, cluster))
    return panels


def _common_affix(names: list[str]) -> str:
    """The longest run of whole ``_``-separated words that all ``names`` start or end with, else ``""``.

    ``["t2i_mean_rank", "i2t_median_rank"]`` -> ``"rank"``; ``["loss", "loss_itc"]`` -> ``"loss"``.
    """
    words = [n.split("_") for n in names]
    prefix = os.path.commonprefix(words)
    suffix = os.path.commonprefix([w[::-1] for w in words])[::-1]
    best = "_".join(max(prefix, suffix, key=len))
    return best if len(best) >= 3 else ""


def _is_sparse(s: Series, densest: int) -> bool:
    return len(s.values) <= 30 or len(s.values) < 0.25 * densest


def _is_noisy(s: Series) -> bool:
    v = s.values
    if len(v) < 20:
        return False
    spread = float(v.max() - v.min())
    return spread > 0 and float(np.abs(np.diff(v)).sum()) > _NOISY_VARIATION * spread


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Bias-corrected exponential moving average with smoothing ``alpha = 2 / (span + 1)``.

    Bias correction keeps the start of the curve at the data instead of pulling it towards zero.
    """
    beta = 1.0 - 2.0 / (span + 1.0)
    out = np.empty_like(values, dtype=np.float64)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1.0 - beta) * v
        weight = beta * weight + (1.0 - beta)
        out[i] = acc / weight
    return out


def _wants_log_scale(s: Series) -> bool:
    """Losses and ranks: positive quantities whose interesting changes are relative."""
    name = s.name.lower()
    return "loss" in name or "rank" in name


def _format_value(v: float) -> str:
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4g}"


def _format_step(x: float, _pos: object = None) -> str:
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def _draw_panel(ax, panel: _Panel, densest: int, colors: Sequence) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for i, s in enumerate(panel.series):
        color = colors[i % len(colors)]
        sparse = _is_sparse(s, densest)
        if not sparse and _is_noisy(s):
            smooth = ema(s.values, span=max(4.0, len(s.values) / 15))
            ax.plot(s.steps, s.values, color=color, alpha=0.22, linewidth=0.8, zorder=1)
            ax.plot(s.steps, smooth, color=color, linewidth=1.8, zorder=2,
                    label=f"{s.name}  {_format_value(smooth[-1])} (smoothed)")
        elif sparse:
            ax.plot(s.steps, s.values, color=color, linewidth=1.4, marker="o", markersize=4,
                    markeredgecolor="white", markeredgewidth=0.6, zorder=2,
                    label=f"{s.name}  {_format_value(s.values[-1])}")
        else:
            ax.plot(s.steps, s.values, color=color, linewidth=1.5, zorder=2,
                    label=f"{s.name}  {_format_value(s.values[-1])}")
    values = np.concatenate([s.values for s in panel.series])
    # rates of several groups (1e-5 beside 1e-3) would squash the smaller ones flat on a linear axis
    mags = [m for m in map(_magnitude, panel.series) if m is not None]
    rates_apart = (all(_is_rate(s) for s in panel.series) and len(mags) > 1
                   and max(mags) - min(mags) > math.log10(_SHARE_PANEL_RATIO))
    if ((rates_apart or all(_wants_log_scale(s) for s in panel.series))
            and values.min() > 0 and values.max() / values.min() > 10):
        ax.set_yscale("log")
        decades = math.log10(values.max() / values.min())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(panel.title, fontsize=11, loc="left", fontweight="bold")
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    ax.grid(True, which="minor", axis="y", alpha=0.12, linewidth=0.4)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=True, framealpha=0.85, edgecolor="0.85",
              ncol=2 if len(panel.series) > 5 else 1, loc="best")


def plot_run(run_dir: str | Path, out: str | Path | None = None, metrics: Sequence[str] | None = None) -> Path:
    """Draw a run's training curves into an image file.

    Args:
        run_dir: The run directory holding ``metrics.jsonl`` (or the ``.jsonl`` file itself).
        out: Image to write; the format follows the suffix (``.png``, ``.pdf``, ``.svg`` ...). Default:
            ``RUN_DIR/curves.png``. Written to a temporary file beside it, then renamed into place.
        metrics: Optional ``fnmatch`` patterns (``train/*``, ``val/*/t2i_r*``); only matching keys are drawn.
            A pattern without wildcards also selects the group it names (``train`` -> ``train/...``).

    Returns:
        The path of the written image.

    Raises:
        VlkitError: If ``metrics.jsonl`` is missing or holds no numeric metrics, no metric matches
            ``metrics``, the output format is unknown, or matplotlib is not installed.
    """
    path = metrics_path(run_dir)
    out = Path(out) if out is not None else path.parent / "curves.png"
    check_output_file(out, inputs=[path], what="--out")  # before anything is drawn
    series = read_metrics(path)
    if not series:
        raise VlkitError(f"{path} holds no numeric metrics (each line needs a \"step\" and at least one number)")
    series = _select(series, metrics, path)

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise VlkitError("plotting needs matplotlib: pip install matplotlib") from None

    panels = _panels(series)
    n = len(panels)
    cols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.6 * cols, 3.5 * rows + 0.5), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    fmt = (out.suffix.lstrip(".") or "png").lower()
    if fmt not in canvas.get_supported_filetypes():
        raise VlkitError(f"cannot write {out}: unknown image format .{fmt} (use .png, .pdf or .svg)")

    densest = max(len(s.values) for s in series.values())
    lo = min(float(s.steps.min()) for s in series.values())
    hi = max(float(s.steps.max()) for s in series.values())
    pad = 0.02 * (hi - lo) if hi > lo else 1.0
    colors = [f"C{i}" for i in range(10)]
    axes = fig.subplots(rows, cols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= n:
            ax.set_visible(False)
            continue
        _draw_panel(ax, panels[index], densest, colors)
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_formatter(FuncFormatter(_format_step))
        if index + cols >= n:  # nothing drawn below this panel
            ax.set_xlabel("step", fontsize=9)
    name = path.parent.name or str(path.parent)
    last_step = f"{int(hi):,}" if hi == int(hi) else f"{hi:g}"
    fig.suptitle(f"{name}  ·  step {last_step}", fontsize=12, x=0.01, ha="left")
    fig.tight_layout()

    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, facecolor="white")
    return atomic_write(out, buf.getvalue())
