"""The schema of a training config. Every shipped recipe (``vlkit/configs/``) is checked against it.

Every numeric key declares the values that make sense with :func:`ranged` (a :class:`Range` in the field's
metadata); the validation in :mod:`vlkit.config.validate` checks them with the types, and reports every value
out of its range at once. A list or tuple of numbers has the range checked on each item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts: ``lo`` and ``hi`` bounds (None: unbounded), each inclusive
    unless ``lo_open`` / ``hi_open``; non-finite values are never accepted.

    Args:
        lo: the lower bound.
        hi: the upper bound.
        lo_open: ``lo`` itself is excluded.
        hi_open: ``hi`` itself is excluded.
        note: shown in the error message, e.g. ``"e.g. 0.999"``.
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def contains(self, value: float) -> bool:
        """True when ``value`` is finite and within the bounds."""
        try:
            if not math.isfinite(value):
                return False
        except OverflowError:  # an integer too large for a float: outside every range vlkit declares
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    @staticmethod
    def _number(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"

    def describe(self, name: str) -> str:
        """How the range reads in an error message for key ``name``: ``positive``, ``between 0 and 1 (...)``."""
        note = f" ({self.note})" if self.note else ""
        if self.hi is None:
            if (self.lo == 0 and self.lo_open) or (self.lo == 1 and not self.lo_open):
                return f"positive{note}"
            if self.lo == 0:
                return f"non-negative{note}"
            return f"{'>' if self.lo_open else '>='} {self._number(self.lo)}{note}"
        low = f"{self._number(self.lo)} {'<' if self.lo_open else '<='} " if self.lo is not None else ""
        high = f"{'<' if self.hi_open else '<='} {self._number(self.hi)}"
        inside = f"{low}{name} {high}" + (f", {self.note}" if self.note else "")
        if self.lo is None:
            return f"at most {self._number(self.hi)} ({inside})"
        return f"between {self._number(self.lo)} and {self._number(self.hi)} ({inside})"


def ranged(default: Any = None, *, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False, note: str = "") -> Any:
    """A dataclass field whose numeric value (or each item of its list) must lie in a :class:`Range`.

    Example:
        >>> @dataclass
        ... class C:
        ...     ema: Optional[float] = ranged(None, lo=0, hi=1, lo_open=True, hi_open=True)
    """
    return field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open, note)})


POSITIVE_INT = {"lo": 1}
POSITIVE = {"lo": 0, "lo_open": True}
NON_NEGATIVE = {"lo": 0}


@dataclass
class LockConfig:
    """LiT: lock one tower of the model (see :func:`vlkit.models.lit.lock_tower`)."""

    tower: str = "image"  # image | text
    unlocked_blocks: int = ranged(0, **NON_NEGATIVE)
    unlock_projection: bool = False


@dataclass
class ModelConfig:
    """Which model to train."""

    name: str = "clip-tiny"  # a name from `vlkit.list_models()`
    pretrained: Optional[str] = None  # a vlkit model directory or a foreign checkpoint
    args: dict[str, Any] = field(default_factory=dict)  # builder overrides, e.g. {vision_layers: 6}
    lock: Optional[LockConfig] = None
    tokenizer: Optional[str] = None  # tokenizer.json / HF dir; default: the model's own, else trained on captions
    # an MAE run or model directory whose encoder initialises the ViT image tower (`visual`) before training
    pretrained_image: Optional[str] = None


@dataclass
class DatasetConfig:
    """A Lance dataset made by `vlkit ingest`, with its splits."""

    path: str = "???"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    num_workers: int = ranged(0, **NON_NEGATIVE)


@dataclass
class TaskConfig:
    """A task: what it reads from which dataset, its loss and its weight in the total loss."""

    name: str = "retrieval"  # retrieval | captioning | vqa | itm | classification | visdial
    dataset: str = "???"  # a key of `datasets`
    # retrieval: contrastive (default) | siglip | momentum; captioning: caption (default) | coca (contrastive +
    # captioning in one forward); null: the task's default
    loss: Optional[str] = None
    # > 0: a negative weight would ascend the loss; a task that should not train belongs out of `tasks`
    weight: float = ranged(1.0, **POSITIVE)
    local_loss: bool = False  # distributed contrastive loss over local rows only
    # classification: the text paired with every image (default: its first caption); captioning: a prefix the
    # decoder is given before every caption, e.g. "a picture of"
    prompt: Optional[str] = None
    # captioning (and generative vqa) only:
    label_smoothing: float = ranged(0.0, lo=0, hi=1, hi_open=True, note="e.g. 0.1")
    num_beams: int = ranged(3, **POSITIVE_INT)  # beam search width of the validation captions
    max_new_tokens: int = ranged(30, **POSITIVE_INT)  # most tokens of a validation caption
    min_new_tokens: int = ranged(1, **NON_NEGATIVE)  # the end token is not allowed before this many tokens
    no_repeat_ngram_size: int = ranged(0, **NON_NEGATIVE)  # > 0: no n-gram of this size twice in a caption
    eval_images: Optional[int] = ranged(None, **POSITIVE_INT)  # caption only the first N validation images
    # retrieval, itm and captioning: the caption each training image is paired with: random (a new draw every epoch),
    # first, or longest (the caption with the most characters)
    captions: str = "random"
    # registered metrics added to the task's evaluation (vlkit.metrics.registry), e.g. [my_metric]
    metrics: list[str] = field(default_factory=list)
    # visdial only: wrong answer options scored beside the right one per training round, and the previous rounds
    # kept in the dialog history given with each question
    negatives: int = ranged(7, **POSITIVE_INT)
    history_rounds: int = ranged(3, **NON_NEGATIVE)
    # beit only (required): the run or model folder of a trained VQ-VAE whose token ids are the targets
    tokenizer_run: Optional[str] = None
    # video_classification only: clips read per validation video (evenly spaced), their scores averaged
    clips: int = ranged(1, **POSITIVE_INT)
    # video_retrieval only: frames per clip, one from each of as many equal segments of the video
    frames: int = ranged(8, **POSITIVE_INT)


@dataclass
class SamplingConfig:
    """How the training steps are shared between the tasks of a multi-task config."""

    strategy: str = "all"  # all (every task every step, losses summed) | round_robin | proportional | fixed | temperature
    weights: Optional[list[float]] = ranged(None, **NON_NEGATIVE)  # fixed: one weight per task, sum > 0
    # temperature: a task's probability grows as (dataset size) ** (1 / temperature)
    temperature: float = ranged(2.0, **POSITIVE)


@dataclass
class OptimConfig:
    """The optimizer over parameter groups, the learning-rate schedule after a warmup, gradient clipping."""

    name: str = "adamw"  # adamw | sgd | adafactor | lamb, or one a plug-in registers (vlkit.train.optimizers)
    # rates > 0: a tower that should not train is locked (model.lock), which also spares its gradients
    lr_image: float = ranged(1e-4, **POSITIVE, note="e.g. 1e-4; model.lock freezes a tower")
    lr_text: float = ranged(1e-5, **POSITIVE, note="e.g. 1e-5; model.lock freezes a tower")
    lr_head: float = ranged(1e-3, **POSITIVE, note="e.g. 1e-3")
    weight_decay: float = ranged(0.1, **NON_NEGATIVE)
    betas: tuple[float, float] = ranged((0.9, 0.98), lo=0, hi=1, hi_open=True)  # adamw, lamb
    eps: float = ranged(1e-6, **POSITIVE)  # adamw, lamb
    momentum: float = ranged(0.9, lo=0, hi=1, hi_open=True)  # sgd
    nesterov: bool = False  # sgd (needs momentum > 0)
    # adafactor: the second-moment decay at step t is 1 - t ** beta2_decay
    beta2_decay: float = ranged(-0.8, lo=-1, hi=0, hi_open=True, note="e.g. -0.8")
    # cosine | linear | polynomial | constant | step | inverse_sqrt, or one a plug-in registers
    # (vlkit.train.schedules); every schedule starts with warmup_steps of linear warmup
    schedule: str = "cosine"
    warmup_steps: int = ranged(100, **NON_NEGATIVE)
    # cosine, linear, polynomial: the final rate as a fraction of the peak
    min_lr_ratio: float = ranged(0.0, lo=0, hi=1)
    power: float = ranged(1.0, **POSITIVE)  # polynomial: the exponent of the decay
    step_every: Optional[int] = ranged(None, **POSITIVE_INT)  # step: steps between two decays (required)
    gamma: float = ranged(0.1, lo=0, hi=1, lo_open=True)  # step: the factor of each decay
    timescale: Optional[int] = ranged(None, **POSITIVE_INT)  # inverse_sqrt: null means warmup_steps
    grad_clip: Optional[float] = ranged(1.0, **POSITIVE)  # null: no clipping
    fused: bool = False  # adamw, sgd: one fused kernel (GPU)


@dataclass
class EarlyStopConfig:
    """Stop the run when a validation metric has not improved for ``patience`` evaluations in a row."""

    metric: str = "???"  # e.g. val/synth/rsum (the task's dataset key after val/)
    patience: int = ranged(3, **POSITIVE_INT)  # evaluations without improvement before the run stops
    mode: str = "max"  # max: higher is better | min
    min_delta: float = ranged(0.0, **NON_NEGATIVE)  # an improvement is a change by more than this


@dataclass
class TrainConfig:
    """Everything a run needs. ``???`` marks a required value."""

    # modules imported before the config is validated (plug-ins that register tasks, losses, metrics, models,
    # optimizers, schedules); found on sys.path, then in the config file's folder
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    tasks: list[TaskConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output_dir: str = "runs/run"
    seed: int = ranged(0, lo=0, hi=2**32 - 1)
    epochs: int = ranged(1, **POSITIVE_INT)
    max_steps: Optional[int] = ranged(None, **POSITIVE_INT)  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = ranged(32, **POSITIVE_INT)  # global batch per optimizer step (over all ranks and micro-batches)
    grad_accum: int = ranged(1, **POSITIVE_INT)  # micro-batches per step; contrastive negatives are kept across them
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on GPU with a gradient scaler)
    grad_checkpointing: bool = False
    compile: bool = False
    # e.g. 0.999: keep EMA weights, evaluated and saved beside the model
    ema: Optional[float] = ranged(None, lo=0, hi=1, lo_open=True, hi_open=True, note="e.g. 0.999")
    augment: bool = True  # random resized crops and flips for training images
    log_every: int = ranged(10, **POSITIVE_INT)
    eval_every: Optional[int] = ranged(None, **POSITIVE_INT)  # steps between evaluations (None: every epoch's end)
    save_every: Optional[int] = ranged(None, **POSITIVE_INT)  # steps between checkpoints (None: every epoch's end)
    keep_last: int = ranged(2, **POSITIVE_INT)  # step checkpoints kept (the best one besides)
    best_metric: Optional[str] = None  # e.g. "val/data/t2i_r1"; the best checkpoint is kept
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    early_stop: Optional[EarlyStopConfig] = None  # e.g. {metric: val/data/rsum, patience: 3}
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True
    # peak FLOP/s of one device for train/mfu, e.g. 989.4e12; overrides the table of GPUs in vlkit.utils.flops
    # (None: that table; a CPU or an unlisted GPU then logs no MFU)
    peak_flops: Optional[float] = ranged(None, **POSITIVE, note="FLOP/s of one device, e.g. 989.4e12")
    # a non-finite training loss: stop (an error naming the step, the task and the last good checkpoint) or
    # skip (that step's update is dropped and counted in train/skipped_steps)
    nonfinite: str = "stop"
