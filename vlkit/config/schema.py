"""The schema of a training config. Every YAML recipe in ``configs/`` is checked against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class LockConfig:
    """LiT: lock one tower of the model (see :func:`vlkit.models.lit.lock_tower`)."""

    tower: str = "image"  # image | text
    unlocked_blocks: int = 0
    unlock_projection: bool = False


@dataclass
class ModelConfig:
    """Which model to train."""

    name: str = "clip-tiny"  # a name from `vlkit.list_models()`
    pretrained: Optional[str] = None  # a vlkit model directory or a foreign checkpoint
    args: dict[str, Any] = field(default_factory=dict)  # builder overrides, e.g. {vision_layers: 6}
    lock: Optional[LockConfig] = None
    tokenizer: Optional[str] = None  # tokenizer.json / HF dir; default: the model's own, else trained on captions


@dataclass
class DatasetConfig:
    """A Lance dataset made by `vlkit ingest`, with its splits."""

    path: str = "???"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    num_workers: int = 0


@dataclass
class TaskConfig:
    """A task: what it reads from which dataset, its loss and its weight in the total loss."""

    name: str = "retrieval"  # retrieval
    dataset: str = "???"  # a key of `datasets`
    loss: str = "contrastive"  # contrastive | siglip | momentum
    weight: float = 1.0
    local_loss: bool = False  # distributed contrastive loss over local rows only
    prompt: Optional[str] = None  # classification: the text paired with every image (default: its first caption)


@dataclass
class SamplingConfig:
    """How the training steps are shared between the tasks of a multi-task config."""

    strategy: str = "all"  # all (every task every step, losses summed) | round_robin | proportional | fixed | temperature
    weights: Optional[list[float]] = None  # fixed: one sampling weight per task
    temperature: float = 2.0  # temperature: a task's probability grows as (dataset size) ** (1 / temperature)


@dataclass
class OptimConfig:
    """AdamW with parameter groups, warmup then cosine decay, gradient clipping."""

    lr_image: float = 1e-4
    lr_text: float = 1e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    fused: bool = False


@dataclass
class TrainConfig:
    """Everything a run needs. ``???`` marks a required value."""

    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    tasks: list[TaskConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output_dir: str = "runs/run"
    seed: int = 0
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 32  # global batch per optimizer step (over all ranks and micro-batches)
    grad_accum: int = 1  # micro-batches per step; contrastive negatives are kept across them
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on GPU with a gradient scaler)
    grad_checkpointing: bool = False
    compile: bool = False
    ema: Optional[float] = None  # e.g. 0.999: keep EMA weights, evaluated and saved beside the model
    augment: bool = True  # random resized crops and flips for training images
    log_every: int = 10
    eval_every: Optional[int] = None  # steps between evaluations (None: at the end of every epoch)
    save_every: Optional[int] = None  # steps between checkpoints (None: at the end of every epoch)
    keep_last: int = 2
    best_metric: Optional[str] = None  # e.g. "val/data/t2i_r1"; the best checkpoint is kept
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True
    # peak FLOP/s of one device for train/mfu, e.g. 989.4e12; overrides the table of GPUs in vlkit.utils.flops
    # (None: that table; a CPU or an unlisted GPU then logs no MFU)
    peak_flops: Optional[float] = None
