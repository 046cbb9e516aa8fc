"""The model card (``README.md``) written into every export folder.

A card says what the model was trained on (the datasets, splits and tasks of its run's ``config.yaml``), how well
it did (the last evaluation in the run's ``metrics.jsonl`` and the ``metrics.json`` of any ``vlkit eval`` report
kept inside the run), what it is (architecture, sizes, preprocessing) and how to load the exported files.
:func:`read_training` reads and checks everything before the export writes anything; :func:`model_card` only
formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.errors import DataError

CARD_FILE = "README.md"
#: metrics shown from the run's last evaluation (the rest stay in metrics.jsonl)
MAX_METRICS = 24


@dataclass
class TrainingRecord:
    """What a run recorded about how its model was made.

    Attributes:
        run_dir: the run directory, or None when the model came without one (a bare model folder).
        model_name: the registry name the run built (``model.name``).
        pretrained: the weights the run started from (``model.pretrained``), if any.
        lock: the locked tower (LiT) settings, if any.
        datasets: per dataset of the run: ``name``, ``path``, ``train_split``, ``val_split``.
        tasks: per task: ``name`` (retrieval, captioning, ...) and ``dataset``.
        schedule: ``epochs``, ``max_steps``, ``batch_size``, ``seed``.
        metrics: the last value of each evaluation metric (``split/dataset/metric``) in ``metrics.jsonl``.
        metrics_step: the step of the last evaluation.
        reports: per ``vlkit eval`` report found in the run: ``folder``, ``task``, ``dataset``, ``split``, ``metrics``.
    """

    run_dir: Path | None = None
    model_name: str | None = None
    pretrained: str | None = None
    lock: dict[str, Any] | None = None
    datasets: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_step: int | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


def find_run_dir(source: str | Path) -> Path | None:
    """The run a loaded model came from: ``RUN/model`` -> ``RUN``, ``RUN/checkpoints/NAME`` -> ``RUN``; None for
    a model folder outside a run."""
    source = Path(source)
    candidates = [source]
    if source.name in ("model", "model_ema"):
        candidates.append(source.parent)
    if source.parent.name == "checkpoints":
        candidates.append(source.parent.parent)
    for candidate in candidates:
        if (candidate / "config.yaml").is_file() and (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a mapping, found {type(value).__name__}")
    return value


def _read_config(path: Path) -> dict[str, Any]:
    from vlkit.config.yaml_io import read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a run config (expected a mapping at the top)")
    return data


def _last_evaluation(run_dir: Path) -> tuple[dict[str, float], int | None]:
    from vlkit.train.runlog import read_metrics

    try:
        rows = read_metrics(run_dir)
    except OSError as exc:
        raise DataError(f"{run_dir / 'metrics.jsonl'}: cannot read ({exc.strerror or exc})") from None
    metrics: dict[str, float] = {}
    step = None
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k != "step" and not k.startswith("train/")
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            metrics.update(values)
            step = int(row["step"])
    return metrics, step


def _reports(run_dir: Path) -> list[dict[str, Any]]:
    """The ``metrics.json`` of each ``vlkit eval`` report folder directly inside the run."""
    from vlkit.utils.fs import output_kind

    found = []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        if output_kind(folder) != "report" or not (folder / "metrics.json").is_file():
            continue
        path = folder / "metrics.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not readable JSON ({exc})") from None
        data = _mapping(data, str(path))
        metrics = {k: v for k, v in _mapping(data.get("metrics"), f"{path}: metrics").items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        found.append({"folder": folder.name, "task": data.get("task"), "dataset": data.get("dataset"),
                      "split": data.get("split"), "metrics": metrics})
    return found


def read_training(source: str | Path) -> TrainingRecord:
    """Read what the run of ``source`` (a run, model folder or checkpoint) recorded.

    Raises:
        DataError: the run's ``config.yaml``, ``metrics.jsonl`` or a report's ``metrics.json`` is unreadable
            (naming the file).
    """
    run_dir = find_run_dir(source)
    if run_dir is None:
        return TrainingRecord()
    where = run_dir / "config.yaml"
    cfg = _read_config(where)
    model = _mapping(cfg.get("model"), f"{where}: model")
    datasets = []
    for name, spec in _mapping(cfg.get("datasets"), f"{where}: datasets").items():
        spec = _mapping(spec, f"{where}: datasets.{name}")
        datasets.append({"name": str(name), "path": spec.get("path"), "train_split": spec.get("train_split", "train"),
                         "val_split": spec.get("val_split", "val")})
    tasks = []
    for i, task in enumerate(cfg.get("tasks") or []):
        task = _mapping(task, f"{where}: tasks[{i}]")
        tasks.append({"name": task.get("name"), "dataset": task.get("dataset")})
    metrics, step = _last_evaluation(run_dir)
    return TrainingRecord(
        run_dir=run_dir, model_name=model.get("name"), pretrained=model.get("pretrained"),
        lock=model.get("lock") or None, datasets=datasets, tasks=tasks,
        schedule={k: cfg.get(k) for k in ("epochs", "max_steps", "batch_size", "seed")},
        metrics=metrics, metrics_step=step, reports=_reports(run_dir))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _training_section(record: TrainingRecord) -> list[str]:
    if record.run_dir is None:
        return ["## Training", "", "Exported from a model folder without its training run: the datasets and "
                "metrics it was trained with are not recorded here.", ""]
    lines = ["## Training", "", f"Run: `{record.run_dir}`; model `{_fmt(record.model_name)}`"
             + (f", started from `{record.pretrained}`" if record.pretrained else "")
             + (f", {record.lock.get('tower', 'image')} tower locked (LiT)" if record.lock else "") + ".", ""]
    s = record.schedule
    lines += [f"Schedule: epochs {_fmt(s.get('epochs'))}, max_steps {_fmt(s.get('max_steps'))}, batch size "
              f"{_fmt(s.get('batch_size'))}, seed {_fmt(s.get('seed'))}.", ""]
    if record.datasets:
        lines += ["| dataset | path | train split | validation split | tasks |", "|---|---|---|---|---|"]
        for d in record.datasets:
            used = ", ".join(sorted({str(t["name"]) for t in record.tasks if t["dataset"] == d["name"]})) or "-"
            lines.append(f"| {d['name']} | `{_fmt(d['path'])}` | {_fmt(d['train_split'])} | "
                         f"{_fmt(d['val_split'])} | {used} |")
        lines.append("")
    return lines


def _metrics_section(record: TrainingRecord) -> list[str]:
    lines = ["## Metrics", ""]
    if not record.metrics and not record.reports:
        return lines + ["No evaluation recorded in the run.", ""]
    if record.metrics:
        shown = list(record.metrics.items())[:MAX_METRICS]
        lines += [f"Last evaluation during training (step {record.metrics_step}, from `metrics.jsonl`):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in shown]
        if len(record.metrics) > len(shown):
            lines.append(f"| ... {len(record.metrics) - len(shown)} more in metrics.jsonl | |")
        lines.append("")
    for report in record.reports:
        lines += [f"`vlkit eval` report `{report['folder']}` ({_fmt(report['task'])} on {_fmt(report['dataset'])}, "
                  f"split {_fmt(report['split'])}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in list(report["metrics"].items())[:MAX_METRICS]]
        lines.append("")
    return lines


def _architecture_section(loaded: Any) -> list[str]:
    model = loaded.model
    pre = model.preprocess
    params = sum(p.numel() for p in model.parameters())
    return ["## Architecture", "",
            f"- family: `{getattr(model, 'architecture', type(model).__name__)}` ({type(model).__name__}), "
            f"{params:,} parameters",
            f"- embeddings: {int(model.config.embed_dim)}-d, L2-normalised; image and text compared by cosine",
            f"- images: {pre.image_size}x{pre.image_size} RGB; shorter side resized to {pre.image_size} "
            f"(bicubic), centre crop, scaled to [0, 1], then (x - mean) / std with mean {list(pre.mean)}, "
            f"std {list(pre.std)}",
            f"- texts: at most {pre.context_length} tokens (special tokens included), `tokenizer.json`",
            f"- fingerprint: `{loaded.tag}` (the first 12 hex digits of the weights' SHA-256, as `vlkit embed` "
            "tags embeddings)", ""]


def _usage(fmt: str, pre: Any) -> list[str]:
    size, context = pre.image_size, pre.context_length
    tokenize = ["from tokenizers import Tokenizer", "",
                'tok = Tokenizer.from_file("tokenizer.json")',
                f"tok.enable_truncation({context})  # special tokens survive truncation",
                'enc = tok.encode("a photo of a dog")']
    if fmt == "onnx":
        code = ["import numpy as np", "import onnxruntime as ort", *tokenize,
                "ids = np.array([enc.ids], dtype=np.int64)",
                'text = ort.InferenceSession("text_encoder.onnx")',
                'text_embeds = text.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]',
                'image = ort.InferenceSession("image_encoder.onnx")',
                f"pixels = np.zeros((1, 3, {size}, {size}), np.float32)  # preprocessed as above",
                'image_embeds = image.run(None, {"pixels": pixels})[0]',
                "similarity = image_embeds @ text_embeds.T"]
        extra = ["With vlkit, `vlkit serve INDEX --model THIS_FOLDER --runtime onnx` embeds queries with these "
                 "files (no PyTorch weights needed)."]
    elif fmt == "torchscript":
        code = ["import torch", *tokenize,
                "ids = torch.tensor([enc.ids])",
                'text = torch.jit.load("text_encoder.pt")',
                "text_embeds = text(ids, torch.ones_like(ids))",
                'image = torch.jit.load("image_encoder.pt")',
                f"image_embeds = image(torch.zeros(1, 3, {size}, {size}))  # preprocessed as above",
                "similarity = image_embeds @ text_embeds.T"]
        extra = ["The files need PyTorch only (no vlkit)."]
    else:
        code = ["import torch", "import transformers", *tokenize,
                'model = transformers.CLIPModel.from_pretrained(".")',
                "ids = torch.tensor([enc.ids])",
                "with torch.no_grad():",
                "    text = model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))",
                f"    image = model.get_image_features(pixel_values=torch.zeros(1, 3, {size}, {size}))",
                "text = getattr(text, 'pooler_output', text)  # transformers 5 may return an output object",
                "image = getattr(image, 'pooler_output', image)",
                "text_embeds = torch.nn.functional.normalize(text, dim=-1)",
                "image_embeds = torch.nn.functional.normalize(image, dim=-1)"]
        extra = ["`preprocessor_config.json` describes the same image preprocessing for `CLIPImageProcessor`."]
    return ["## How to load", "", "```python", *code, "```", "", *extra, ""]


def model_card(loaded: Any, fmt: str, record: TrainingRecord, files: dict[str, str],
               max_abs_diff: dict[str, float]) -> str:
    """The card's Markdown text.

    Args:
        loaded: the exported :class:`~vlkit.inference.loading.LoadedModel`.
        fmt: ``onnx``, ``torchscript`` or ``hf``.
        record: what the run recorded (:func:`read_training`).
        files: file name -> what it holds, for the card's list of files.
        max_abs_diff: largest absolute difference to PyTorch measured at export, per encoder.

    Returns:
        The text of ``README.md``.
    """
    name = getattr(loaded.model, "architecture", type(loaded.model).__name__)
    title = {"onnx": "ONNX", "torchscript": "TorchScript", "hf": "Hugging Face transformers"}[fmt]
    front = ["---", "library_name: transformers", f"tags: [vlkit, {name}]", "---", ""] if fmt == "hf" else []
    lines = [*front, f"# {name} `{loaded.tag}` ({title})", "",
             f"A vlkit {name} model exported with `vlkit export --format {fmt}` from `{loaded.source}`.", "",
             "## Files", ""]
    lines += [f"- `{file}`: {what}" for file, what in files.items()]
    checks = ", ".join(f"{k} {v:.2g}" for k, v in max_abs_diff.items())
    lines += ["", f"Checked at export against the PyTorch model on random inputs: largest absolute difference of "
              f"the embeddings {checks}.", ""]
    lines += _training_section(record) + _metrics_section(record) + _architecture_section(loaded)
    lines += _usage(fmt, loaded.model.preprocess)
    return "\n".join(lines)
