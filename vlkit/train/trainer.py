"""The training loop: tasks over datasets, the chosen optimizer and schedule over parameter groups, mixed
precision, gradient accumulation, EMA, evaluation, early stopping, checkpoints with exact resume, DDP or FSDP2
under torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vlkit.config.schema import TrainConfig
from vlkit.errors import VlkitError
from vlkit.models.io import save_model
from vlkit.tasks import build_task
from vlkit.tasks.preflight import check_datasets
from vlkit.train.distributed import unwrap
from vlkit.train import distributed as D
from vlkit.train.checkpoint import (check_resume_target, open_resume_checkpoint, remove_partial_checkpoints,
                                    rng_states, save_checkpoint, set_rng_states)
from vlkit.train.early_stop import EarlyStopping
from vlkit.train.mfu import measure_step_flops, step_mfu
from vlkit.train.model_setup import build_model_and_tokenizer
from vlkit.train.nonfinite import non_finite, nonfinite_error
from vlkit.train.optim import build_optimizer, build_scheduler, group_lrs
from vlkit.train.runlog import RunLog, check_new_run_dir, environment
from vlkit.utils.flops import peak_flops
from vlkit.utils.fs import write_marker


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients of ``params`` together (what gradient clipping measures), unchanged grads."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


def check_task_losses(cfg: TrainConfig, model: nn.Module) -> None:
    """Every task's loss can train the built model (the momentum loss needs the model's feature queues);
    checked before any work or writing.

    Raises:
        VlkitError: naming the task's ``loss`` key, the model and what it lacks.
    """
    from vlkit.modules.losses.registry import check_model, get_loss

    for i, task in enumerate(cfg.tasks):
        try:
            spec = get_loss(task.name, task.loss) if task.loss is not None else None
        except KeyError:
            continue
        why = check_model(spec, unwrap(model), cfg.model.name) if spec is not None else None
        if why:
            raise VlkitError(f"tasks.{i}.loss: task {task.name}: {why}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must share with the config that resumes it."""
    return {"name": cfg.model.name, "args": cfg.model.args,
            "lock": dataclasses.asdict(cfg.model.lock) if cfg.model.lock else None}


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise VlkitError("precision=fp16 needs a GPU (it uses a gradient scaler); use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class _Autocast:
    """A re-enterable autocast context (a fresh one per ``with``)."""

    def __init__(self, precision: str, device: torch.device):
        self.precision, self.device = precision, device
        autocast_for(precision, device)  # validate now
        self._stack: list = []

    def __enter__(self):
        ctx = autocast_for(self.precision, self.device)
        self._stack.append(ctx)
        return ctx.__enter__()

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)


def wrap_distributed(model: nn.Module, cfg: TrainConfig, dist: D.DistInfo) -> nn.Module:
    if not dist.enabled:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = []
        for tower in ("image", "text"):
            blocks.extend(model.tower_blocks(tower))
        for block in blocks:
            fully_shard(block)
        # scalars (the logit scale) cannot be sharded: they stay replicated, their gradients averaged by
        # the trainer (see Trainer._average_replicated_grads)
        scalars = {p for p in model.parameters() if p.ndim == 0}
        fully_shard(model, ignored_params=scalars or None)
        from torch.distributed.fsdp import register_fsdp_forward_method

        for method in ("encode_image", "encode_text"):  # evaluation calls these instead of forward
            register_fsdp_forward_method(model, method)
        return model
    # fusion models and sampled tasks leave some parameters without gradients on a step (another task's head)
    unused = hasattr(model, "fuse") or cfg.sampling.strategy != "all" or any(t.name != "retrieval" for t in cfg.tasks)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, find_unused_parameters=unused)


def full_state_dicts(model: nn.Module, optimizer, cfg: TrainConfig, dist: D.DistInfo):
    """Model and optimizer state as full (unsharded) dicts on every rank's CPU."""
    if cfg.distributed == "fsdp" and dist.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_full_state_dicts(model: nn.Module, optimizer, model_state, optim_state, cfg: TrainConfig,
                          dist: D.DistInfo) -> None:
    if cfg.distributed == "fsdp" and dist.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


class Trainer:
    """Runs a :class:`TrainConfig`. ``run()`` returns the last evaluation's metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = D.setup(cfg.device)
        if cfg.batch_size % (self.dist.world_size * cfg.grad_accum):
            raise VlkitError(f"batch_size {cfg.batch_size} must divide by world size {self.dist.world_size} "
                             f"x grad_accum {cfg.grad_accum}")
        self.per_rank_batch = cfg.batch_size // self.dist.world_size
        self.run_dir = Path(cfg.output_dir)
        # before any work: a new run never writes into an old one, and a resumed run continues only its own
        if cfg.resume:
            check_resume_target(cfg.resume, self.run_dir)
        elif self.dist.is_main:
            check_new_run_dir(self.run_dir)
        check_datasets(cfg)  # every dataset, split and column the tasks read, before any work or writing
        seed_everything(cfg.seed)
        self.model, self.tokenizer = build_model_and_tokenizer(cfg, self.dist)
        self.model.to(self.dist.device)
        check_task_losses(cfg, self.model)
        # FLOPs of a step per sample, counted once on the bare model (before checkpointing and wrappers)
        self.flops_per_sample = measure_step_flops(self.model, cfg, self.dist.device)
        self.peak_flops = peak_flops(self.dist.device, cfg.peak_flops)
        self.tasks = [build_task(t.name, t.dataset, t, cfg.datasets[t.dataset], self.tokenizer,
                                 unwrap(self.model).preprocess, self.dist, seed=cfg.seed, augment=cfg.augment,
                                 **({"model": self.model}
                                    if t.name in ("classification", "nlvr2", "video_classification") else {}))
                      for t in cfg.tasks]
        for task in self.tasks:
            task.to(self.dist.device)
        self.loaders = [task.train_loader(self.per_rank_batch) for task in self.tasks]
        task_steps = [t.sampler.samples_per_rank // self.per_rank_batch for t in self.tasks]
        self.task_sampler = None
        if cfg.sampling.strategy == "all":  # every task every step: an epoch ends with the smallest dataset
            self.steps_per_epoch = min(task_steps)
        else:  # one task per step, chosen by the sampler: an epoch is one pass over every dataset's batches
            from vlkit.train.task_sampler import TaskSampler

            try:
                self.task_sampler = TaskSampler([len(t.train_set) for t in self.tasks], cfg.sampling.strategy,
                                                cfg.sampling.weights, cfg.sampling.temperature, seed=cfg.seed)
            except ValueError as exc:
                raise VlkitError(f"sampling: {exc}") from None
            self.steps_per_epoch = sum(task_steps)
        self.task_steps = task_steps
        # where each task is in its own data (sampled strategies): epoch and batches taken in it
        self.task_epoch = [0] * len(self.tasks)
        self.task_batch = [0] * len(self.tasks)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if cfg.grad_checkpointing:
            unwrap(self.model).set_grad_checkpointing(True)
        if cfg.distributed == "fsdp" and self.dist.enabled:
            import copy

            self._template = copy.deepcopy(self.model).cpu()  # unsharded shell for the final saved model
        self.model = wrap_distributed(self.model, cfg, self.dist)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(unwrap(self.model), cfg.optim, heads=self.tasks)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(unwrap(self.model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema),
                                     use_buffers=True)
        self.autocast = _Autocast(cfg.precision, self.dist.device)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self._task_iters: dict[int, Any] = {}
        self.best: float | None = None
        self.early_stop = EarlyStopping(cfg.early_stop) if cfg.early_stop is not None else None
        self.skipped_steps = 0  # steps dropped for a non-finite loss or gradient norm (nonfinite=skip)
        self.last_eval: dict[str, float] = {}
        self.log = RunLog(self.run_dir, cfg.tensorboard) if self.dist.is_main else None
        if cfg.resume:
            if self.dist.is_main:
                remove_partial_checkpoints(self.run_dir)  # what an interrupted save left behind
            self._resume(*open_resume_checkpoint(cfg.resume, self.run_dir))
        elif self.dist.is_main:
            self._start_run_dir()

    # ------------------------------------------------------------------ run directory
    def _start_run_dir(self) -> None:
        """Start a new run in ``output_dir`` (``__init__`` checked that it holds no run)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(self.run_dir, "run")
        (self.run_dir / "metrics.jsonl").write_text("")
        from vlkit.config.load import dump_yaml

        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        (self.run_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save(self.run_dir / "tokenizer.json")

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        model_state, optim_state = full_state_dicts(self.model, self.optimizer, self.cfg, self.dist)
        return {
            "model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "tasks": [t.state_dict() for t in self.tasks], "rng": rng_states(),
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "task_epoch": list(self.task_epoch), "task_batch": list(self.task_batch)},
            "task_sampler": self.task_sampler.state_dict() if self.task_sampler is not None else None,
            "best": self.best, "skipped_steps": self.skipped_steps, "fingerprint": model_fingerprint(self.cfg),
            "optimizer_name": self.cfg.optim.name,
            "early_stop": self.early_stop.state_dict() if self.early_stop is not None else None,
            "world_size": self.dist.world_size, "batch_size": self.cfg.batch_size,
        }

    def save(self, best: bool = False) -> None:
        state = self._state()  # a collective under FSDP: every rank takes part
        if self.dist.is_main:
            save_checkpoint(self.run_dir, self.global_step, state, self.cfg.keep_last, best=best)
        D.barrier()

    def _resume(self, path: Path, state: dict[str, Any]) -> None:
        mine = model_fingerprint(self.cfg)
        if state.get("fingerprint") != mine:
            raise VlkitError(f"{path}: checkpoint of another model ({state.get('fingerprint')}), "
                             f"not {mine}; start a new output_dir or fix the config")
        if state["batch_size"] != self.cfg.batch_size:
            raise VlkitError(f"{path}: checkpoint was trained with batch_size {state['batch_size']}, "
                             f"config has {self.cfg.batch_size}; resuming would not continue the same run")
        saved_optimizer = state.get("optimizer_name", "adamw")
        if saved_optimizer != self.cfg.optim.name:
            raise VlkitError(f"{path}: checkpoint was trained with optimizer {saved_optimizer}, config has "
                             f"optim.name={self.cfg.optim.name}; resuming would not continue the same run")
        try:
            load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"], self.cfg, self.dist)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise VlkitError(f"{path}: checkpoint does not fit this model/config ({str(exc).splitlines()[0]})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        for task, task_state in zip(self.tasks, state["tasks"]):
            task.load_state_dict(task_state)
        pos = state["position"]
        self.epoch, self.step_in_epoch, self.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        self.task_epoch = list(pos.get("task_epoch", self.task_epoch))
        self.task_batch = list(pos.get("task_batch", self.task_batch))
        if self.task_sampler is not None and state.get("task_sampler") is not None:
            self.task_sampler.load_state_dict(state["task_sampler"])
        self.best = state["best"]
        if self.early_stop is not None:
            self.early_stop.load_state_dict(state.get("early_stop"))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        set_rng_states(state["rng"])
        if self.log is not None:
            self.log.truncate_after(self.global_step)

    # ------------------------------------------------------------------ steps
    def _clamp_scales(self) -> None:
        inner = unwrap(self.model)
        with torch.no_grad():
            for module in (inner, *self.tasks):
                for name, p in module.named_parameters():
                    if name.endswith("logit_scale"):
                        p.clamp_(0, math.log(100.0))

    def train_step(self, batches: list[dict[str, Any]], tasks: list[nn.Module] | None = None) -> dict[str, float]:
        """One optimizer step over one batch of each of ``tasks`` (default: every task)."""
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        total = 0.0
        for task, batch in zip(tasks or self.tasks, batches):
            out = task.forward_backward(self.model, batch, self.cfg.grad_accum, self.autocast, scaler=self.scaler)
            for name, value in out.items():
                logs[f"{self._log_prefix(task)}{name}"] = value
        if self.dist.enabled:  # log what the whole batch gave, not rank 0's share of it
            keys = list(logs)
            logs = dict(zip(keys, D.mean_across_ranks([logs[k] for k in keys])))
        for task in tasks or self.tasks:
            total += task.cfg.weight * logs[f"{self._log_prefix(task)}loss"]
        self._average_replicated_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.optim.grad_clip:
            logs["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip))
        elif self.scaler is None:  # not clipped: the norm is still what tells a non-finite gradient
            logs["train/grad_norm"] = float(total_grad_norm(params))
        rates = group_lrs(self.optimizer)  # the rates this step applies, one per tower group
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        # a dropped step (nonfinite=skip) has no update, EMA or momentum step; the schedule moves on with the count
        skip = self._skip_nonfinite(tasks or self.tasks, logs)
        if self.scaler is not None:
            if not skip:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not skip:
            self.optimizer.step()
        self.scheduler.step()
        if not skip:
            self._clamp_scales()
            inner = unwrap(self.model)
            if hasattr(inner, "momentum_step"):
                inner.momentum_step()
            if self.ema is not None:
                self.ema.update_parameters(inner)
        logs["train/loss"] = total
        for group, lr in rates.items():
            logs[f"train/lr_{group}"] = lr
        # train/lr: the heads' rate (a model without head parameters: lr_head under the same schedule)
        logs["train/lr"] = rates.get("head", self.cfg.optim.lr_head * factor)
        return logs

    def _skip_nonfinite(self, tasks: list[nn.Module], logs: dict[str, float]) -> bool:
        """Whether this step must be dropped: a task's loss (or, without a gradient scaler, which skips
        overflowing steps itself, the gradient norm) is not finite. ``nonfinite=stop`` raises instead.

        Raises:
            VlkitError: under ``nonfinite=stop``, naming the step, each task whose loss is not finite and the
                last good checkpoint.
        """
        named = {f"the loss of task {t.cfg.name} on dataset {t.key}": logs[f"{self._log_prefix(t)}loss"]
                 for t in tasks}
        if self.scaler is None and "train/grad_norm" in logs:
            named["the gradient norm"] = logs["train/grad_norm"]
        problems = non_finite(named)
        if problems and self.cfg.nonfinite == "stop":
            raise nonfinite_error(self.global_step + 1, problems, self.run_dir)
        if problems:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        if self.cfg.nonfinite == "skip":
            logs["train/skipped_steps"] = self.skipped_steps
        return bool(problems)

    def _average_replicated_grads(self) -> None:
        """Under FSDP, average the gradients of the parameters it does not manage (scalars), as DDP would."""
        if not (self.dist.enabled and self.cfg.distributed == "fsdp"):
            return
        import torch.distributed as tdist

        for p in unwrap(self.model).parameters():
            if p.ndim == 0 and p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad /= self.dist.world_size

    def evaluate(self) -> dict[str, float]:
        model = self.ema.module if self.ema is not None else self.model
        metrics: dict[str, float] = {}
        for task in self.tasks:
            metrics.update(task.evaluate(model, self.autocast))
        self.last_eval = metrics
        return metrics

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended the run."""
        return self.early_stop is not None and self.early_stop.stopped

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Log evaluation metrics and count them for early stopping; True when the chosen metric improved."""
        if self.log is not None and metrics:
            self.log.log(self.global_step, metrics)
        if self.early_stop is not None and self.early_stop.update(metrics, self.global_step) and self.dist.is_main:
            print(f"vlkit: {self.early_stop.message(self.global_step)}", file=sys.stderr)
        key = self.cfg.best_metric
        if key is None or key not in metrics:
            return False
        if self.best is None or metrics[key] > self.best:
            self.best = metrics[key]
            return True
        return False

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        cfg = self.cfg
        show = cfg.progress and self.dist.is_main
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", disable=not show,
                   dynamic_ncols=True, unit="step")
        seen, started = 0, time.perf_counter()
        while self.global_step < self.total_steps and not self.stopped_early:
            if self.task_sampler is None:
                for task in self.tasks:
                    task.set_epoch(self.epoch, self.step_in_epoch * self.per_rank_batch)
            iterators = [iter(loader) for loader in self.loaders] if self.task_sampler is None else None
            while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                if iterators is not None:
                    logs = self.train_step([next(it) for it in iterators])
                else:
                    chosen = self.task_sampler.next()
                    logs = self.train_step([self._next_task_batch(chosen)], [self.tasks[chosen]])
                    logs["train/task"] = chosen
                self.global_step += 1
                self.step_in_epoch += 1
                seen += cfg.batch_size
                logs["train/samples_per_s"] = seen / max(1e-9, time.perf_counter() - started)
                logs["train/epoch"] = self.epoch + self.step_in_epoch / self.steps_per_epoch
                self._add_flops_logs(logs)
                if self.log is not None and (self.global_step % cfg.log_every == 0 or self.global_step == 1):
                    self.log.log(self.global_step, logs)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}",
                                sps=f"{logs['train/samples_per_s']:.1f}",
                                **({"mfu": f"{logs['train/mfu']:.1%}"} if "train/mfu" in logs else {}))
                is_best = False
                if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                    is_best = self._after_eval(self.evaluate())
                if (cfg.save_every and self.global_step % cfg.save_every == 0) or is_best or self.stopped_early:
                    self.save(best=is_best)
                if self.stopped_early:
                    break
            if self.stopped_early:  # saved at its step above
                break
            if self.step_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
                is_best = False
                if not cfg.eval_every:
                    is_best = self._after_eval(self.evaluate())
                if not cfg.save_every or is_best or self.stopped_early:
                    self.save(best=is_best)
        bar.close()
        if not self.last_eval:
            self._after_eval(self.evaluate())
        self.finish()
        return self.last_eval

    def _add_flops_logs(self, logs: dict[str, float]) -> None:
        """``train/flops_per_sample`` at step 1 and ``train/mfu`` when the FLOPs and a peak are known."""
        if self.flops_per_sample is None:
            return
        if self.global_step == 1:
            logs["train/flops_per_sample"] = self.flops_per_sample
        tasks_per_step = len(self.tasks) if self.task_sampler is None else 1
        value = step_mfu(self.flops_per_sample, logs["train/samples_per_s"], self.peak_flops,
                         self.dist.world_size, tasks_per_step)
        if value is not None:
            logs["train/mfu"] = value

    def _log_prefix(self, task: nn.Module) -> str:
        """``train/<dataset>/``, or ``train/<dataset>/<task>/`` when several tasks train on that dataset."""
        shared = sum(1 for t in self.cfg.tasks if t.dataset == task.key) > 1
        return f"train/{task.key}/{task.cfg.name}/" if shared else f"train/{task.key}/"

    def _next_task_batch(self, i: int) -> dict[str, Any]:
        """The next training batch of task ``i`` (sampled strategies): each task walks through its own epochs."""
        if self.task_batch[i] >= self.task_steps[i]:
            self.task_epoch[i] += 1
            self.task_batch[i] = 0
            self._task_iters.pop(i, None)
        if i not in self._task_iters:
            self.tasks[i].set_epoch(self.task_epoch[i], self.task_batch[i] * self.per_rank_batch)
            self._task_iters[i] = iter(self.loaders[i])
        self.task_batch[i] += 1
        return next(self._task_iters[i])

    def finish(self) -> None:
        sharded = self.cfg.distributed == "fsdp" and self.dist.enabled
        final = self._gathered_model() if sharded else unwrap(self.model)  # a collective under FSDP
        if self.dist.is_main:
            from vlkit.inference.defaults import GENERATION_NAME, defaults_from_tasks

            writes = defaults_from_tasks(self.cfg.tasks)  # the prompt and decoding the validation used
            extra = {GENERATION_NAME: writes.to_json()} if writes is not None else None
            # the first classification head trained is saved with the model (for eval and predict)
            head = next((t.saved_classifier() for t in self.tasks if hasattr(t, "saved_classifier")), None)
            save_model(final, self.run_dir / "model", self.tokenizer, extra, classifier=head)
            if self.ema is not None:
                save_model(self.ema.module, self.run_dir / "model_ema", self.tokenizer, extra, classifier=head)
            for task in self.tasks:  # heads a task writes beside the model itself (nlvr2)
                if hasattr(task, "save_beside"):
                    task.save_beside(self.run_dir / "model")
                    if self.ema is not None:
                        task.save_beside(self.run_dir / "model_ema")
            if self.log is not None:
                self.log.close()
        D.teardown()

    def _gathered_model(self) -> nn.Module | None:
        import copy

        model_state, _ = full_state_dicts(self.model, self.optimizer, self.cfg, self.dist)
        if not self.dist.is_main:
            return None  # the full state is gathered on rank 0 only
        clone = copy.deepcopy(self._template)
        clone.load_state_dict(model_state)
        return clone


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train ``cfg`` and return the final evaluation metrics."""
    return Trainer(cfg).run()
