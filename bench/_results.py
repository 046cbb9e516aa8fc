"""Benchmark results as table rows: one adapter per benchmark maps its JSON line to rows of
``figure | vlkit | reference | ratio | machine``, and the rows become a markdown table.

Not a benchmark itself (``run_all.py`` skips files whose name starts with ``_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Value = float | int | str | None


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        bench: the benchmark that measured it.
        figure: what is measured, naming the reference it is compared with.
        vlkit: vlkit's value (a number, or a word such as ``skipped: no CUDA``).
        reference: the reference's value, or None when there is none.
        ratio: vlkit / reference, or None.
        machine: where it was measured.
    """

    bench: str
    figure: str
    vlkit: Value
    reference: Value = None
    ratio: float | None = None
    machine: str = ""


def _number(value: Value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row(bench: str, figure: str, vlkit: Value, reference: Value = None, machine: str = "",
        ratio: float | None = None) -> Row:
    """A row whose ratio is ``vlkit / reference`` when both are numbers (and the reference is not 0), unless
    ``ratio`` gives the benchmark's own (e.g. a median of paired passes)."""
    if ratio is None and _number(vlkit) and _number(reference) and reference:
        ratio = vlkit / reference
    return Row(bench, figure, vlkit, reference, None if ratio is None else round(ratio, 3), machine)


# ------------------------------------------------------------------------------------------------ adapters


def data_loading_rows(result: dict[str, Any]) -> list[Row]:
    """Lance loader vs a folder of JPEG files, per size / decode mode / workers; the ratio is the benchmark's
    median of paired passes. Plus ingest rows/s."""
    b, m = "data_loading", result.get("machine", "")
    rows = [row(b, "ingest rows/s (Flickr8k-1k)", result.get("ingest_rows_per_s"), machine=m)]
    for r in result.get("loader", []):
        mode = "draft" if r.get("draft") else "full"
        rows.append(row(b, f"loader images/s, {r['size']} px, {mode} decode, {r['workers']} workers "
                           "(vs folder of JPEG; ratio: median of paired passes)",
                        r.get("lance_ips"), r.get("folder_ips"), m, ratio=r.get("ratio")))
    return rows


def train_step_rows(result: dict[str, Any]) -> list[Row]:
    """vlkit CLIP vs transformers CLIPModel on the CPU: train samples/s, embed images/s, peak RSS."""
    b, m = "train_step", result.get("machine", "")
    results = result.get("results", [])
    rows = []
    settings = sorted({(r["precision"], r["text"]) for r in results}, key=lambda s: (s[0], s[1]))
    for precision, text in settings:
        pick = {r["impl"]: r for r in results if r["precision"] == precision and r["text"] == text}
        ours, ref = pick.get("vlkit", {}), pick.get("transformers", {})
        for key, label in (("train_samples_per_s", "train samples/s"), ("embed_images_per_s", "embed images/s"),
                           ("peak_rss_mib", "peak RSS MiB (lower is better)")):
            rows.append(row(b, f"CLIP ViT-B/32 {label}, {precision}, {text} text (vs transformers)",
                            ours.get(key), ref.get(key), m))
    return rows


def search_rows(result: dict[str, Any]) -> list[Row]:
    """Each approximate index against exact search at the same table size: recall@10 and p50 latency."""
    b, m = "search", result.get("machine", "")
    rows = [row(b, "embedding images/s (quickstart model)", result.get("embed_images_per_s"), machine=m)]
    results = result.get("results", [])
    exact = {r["rows"]: r for r in results if r.get("method") == "exact"}
    for r in results:
        base = exact.get(r["rows"])
        if r.get("method") == "exact":
            rows.append(row(b, f"exact search p50 ms, {r['rows']:,} vectors", r.get("p50_ms"), machine=m))
            continue
        rows.append(row(b, f"{r['method']} recall@10, {r['rows']:,} vectors (vs exact search)",
                        r.get("recall_at_10"), 1.0 if base else None, m))
        rows.append(row(b, f"{r['method']} p50 ms, {r['rows']:,} vectors (vs exact search; lower is better)",
                        r.get("p50_ms"), base.get("p50_ms") if base else None, m))
    return rows


QUALITY_KEYS = (("t2i_r1", "text->image R@1"), ("i2t_r1", "image->text R@1"))


def quality_rows(result: dict[str, Any]) -> list[Row]:
    """The quickstart recipe vs the frozen-feature baseline on Flickr8k-1k: R@1 both ways."""
    b, m = "quality_flickr8k", result.get("machine", "")
    ours, base = result.get("quickstart", {}), result.get("baseline", {})
    epochs = result.get("epochs")
    return [row(b, f"Flickr8k-1k {label}, quickstart {epochs} epochs (vs frozen-feature baseline)",
                ours.get(key), base.get(key), m) for key, label in QUALITY_KEYS]


def gpu_train_rows(result: dict[str, Any]) -> list[Row]:
    """vlkit CLIP vs open_clip on one GPU: samples/s, MFU, peak memory, max batch."""
    b, m = "gpu_train", result.get("machine", "")
    ours = result.get("vlkit") or result
    ref = result.get("reference") or {}
    have = bool(ref.get("available"))
    tag = f"{result.get('model')}, batch {result.get('batch')}, bf16"
    vs = " (vs open_clip)" if have else (" (open_clip: not available)" if result.get("reference") else "")

    def pct(x: Value) -> Value:
        return round(100 * x, 2) if _number(x) else x

    rows = [row(b, f"train samples/s, {tag}{vs}", ours.get("samples_per_s"),
                ref.get("samples_per_s") if have else None, m),
            row(b, f"MFU %, {tag}{vs}", pct(ours.get("mfu")), pct(ref.get("mfu")) if have else None, m),
            row(b, f"peak memory GiB, {tag}{vs}; lower is better", ours.get("peak_mem_gib"),
                ref.get("peak_mem_gib") if have else None, m)]
    if ours.get("max_batch") is not None:
        rows.append(row(b, f"max batch, {result.get('model')}, bf16{vs}", ours.get("max_batch"),
                        ref.get("max_batch") if have else None, m))
    return rows


def gpu_input_rows(result: dict[str, Any]) -> list[Row]:
    """CPU loader images/s per worker count; GPU (nvJPEG) decoding against the fastest CPU setting."""
    b, m = "gpu_input", result.get("machine", "")
    cpu = result.get("cpu", [])
    rows = [row(b, f"CPU loader images/s, {r['workers']} workers", r.get("images_per_s"), machine=m) for r in cpu]
    best = max((r["images_per_s"] for r in cpu if _number(r.get("images_per_s"))), default=None)
    gpu = result.get("gpu")
    if gpu:
        rows.append(row(b, "GPU decode pipeline images/s (Lance bytes + nvJPEG + resize; vs best CPU loader)",
                        gpu.get("pipeline_images_per_s"), best, m))
        rows.append(row(b, "GPU decode-only images/s (bytes in memory; vs best CPU loader)",
                        gpu.get("decode_only_images_per_s"), best, m))
        if gpu.get("gpu_util_pct") is not None:
            rows.append(row(b, "GPU utilisation % during the GPU decode pipeline", gpu["gpu_util_pct"], machine=m))
    elif result.get("gpu_note"):
        rows.append(row(b, "GPU decode (nvJPEG)", result["gpu_note"], machine=m))
    return rows


def generic_rows(result: dict[str, Any]) -> list[Row]:
    """A benchmark without an adapter: one row per top-level number."""
    b, m = str(result.get("bench", "?")), result.get("machine", "")
    return [row(b, key, value, machine=m) for key, value in result.items() if _number(value)]


ADAPTERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "data_loading": data_loading_rows,
    "train_step": train_step_rows,
    "search": search_rows,
    "quality_flickr8k": quality_rows,
    "gpu_train": gpu_train_rows,
    "gpu_input": gpu_input_rows,
}


def rows_for(result: dict[str, Any]) -> list[Row]:
    """The rows of one benchmark's JSON line (by its ``bench`` key; unknown benchmarks get generic rows)."""
    return ADAPTERS.get(str(result.get("bench")), generic_rows)(result)


# ------------------------------------------------------------------------------------------------ the table


def format_value(value: Value) -> str:
    """Numbers to at most four significant figures with thousands separators; None to ``-``."""
    if value is None:
        return "-"
    if not _number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}"


def markdown_table(rows: list[Row]) -> str:
    """``figure | vlkit | reference | ratio | machine``, one line per row, figures prefixed by the benchmark."""
    lines = ["| figure | vlkit | reference | ratio | machine |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        cells = [f"{r.bench}: {r.figure}", format_value(r.vlkit), format_value(r.reference), ratio, r.machine]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
