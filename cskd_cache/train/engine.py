"""The one training loop: align, finetune and distill each plug a `Task` into `fit`.

As in timm's ``task/``: a task owns its model (exactly the trainable module DDP wraps), turns a batch into a dict
of losses (``loss`` is the one optimised, the others are logged unweighted) and says how to evaluate; the engine
owns everything else: the per-step learning-rate schedule (precomputed, dinov2's CosineScheduler), AdamW, AMP
(bf16, else fp16 with a scaler, CUDA only), gradient clipping, the NaN guard (checked before the update, so every
checkpoint holds finite weights), the weight EMA, metrics.jsonl and config.yaml, epoch checkpoints, resume and
DDP.

Resume identity: a resumed run reaches the same weights, byte for byte, as an uninterrupted one. The learning
rate at step s is ``schedule[s]``; the checkpoint holds every RNG; a task's batches are a pure function of the
step (`data.datasets.StepBatches`, DataLoaders with their own generator, so creating an iterator draws nothing
from the global RNG); and evaluation and checkpointing happen at the same points of the run whether it was
interrupted or not.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import dist
from ..dist import all_reduce_mean, unwrap, wrap_ddp
from ..errors import ConfigError, CskdError
from ..files import json_safe
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import ModelEma
from .run_log import MetricsWriter, plot_losses, read_metrics, write_config

__all__ = ["Task", "Plan", "plan_steps", "fit", "train_step", "cosine_schedule", "seed_everything",
           "resolve_device", "autocast_for", "param_groups", "NonFiniteLoss", "check_finite",
           "CONFIG_NAME", "METRICS_NAME", "CURVE_NAME", "CKPT_DIR"]

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss_curve.png"
CKPT_DIR = "checkpoints"


def cosine_schedule(total_iters: int, warmup_iters: int = 0, final: float = 0.0) -> np.ndarray:
    """Per-iteration multiplier: linear warm-up 0 -> 1 over ``warmup_iters``, then cosine 1 -> ``final``.

    Precomputed once (dinov2's CosineScheduler), so the learning rate at step s is ``schedule[s]`` whatever the
    restarts, which is what makes a resumed run follow the uninterrupted one exactly.
    """
    warmup_iters = min(max(0, int(warmup_iters)), total_iters)
    warm = np.linspace(0.0, 1.0, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    rest = total_iters - warmup_iters
    t = np.arange(rest) / max(1, rest)
    cos = final + 0.5 * (1 - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warm, cos]).astype(np.float64)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r}: {e}; use auto, cpu, cuda or cuda:N") from None


def autocast_for(device: torch.device, enabled: bool = True):
    """(autocast context, GradScaler or None): bf16 where the GPU has it (no scaler needed), else fp16 with a
    scaler; plain fp32 on CPU, where autocast buys little and costs exactness."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def param_groups(named: list[tuple[str, nn.Module]], lrs: list[float], weight_decay: float) -> list[dict]:
    """AdamW groups per (module, lr): biases and norm/scale vectors (ndim <= 1) get no weight decay."""
    groups = []
    for (name, module), lr in zip(named, lrs):
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        for params, wd, tag in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd,
                               "name": f"{name}/{tag}"})
    return groups


class NonFiniteLoss(CskdError, RuntimeError):
    """Training produced NaN/inf; raised so a run stops with a message instead of writing NaN weights."""


def check_finite(values: dict[str, float], step: int, epoch: int, lr_flags: str = "--lr (or --lr-encoder)") -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (epoch {epoch}): {shown}. Training stopped before applying this "
            f"update, so the newest checkpoint (if any) holds finite weights. Lower {lr_flags}, keep "
            "--clip-grad on, and check the cache with `cskd cache verify`")




@dataclass(frozen=True)
class Plan:
    """How many optimiser steps, in how many epochs, with which learning-rate multiplier at each step. An "epoch"
    here is the interval between evaluations and checkpoints: one pass over the main stream, or ``eval_every``
    steps when the config sets it."""

    steps_per_epoch: int
    total: int
    epochs: int
    warmup: int
    schedule: np.ndarray

    def describe(self) -> dict:
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total, "epochs": self.epochs,
                "warmup_steps": self.warmup}


def plan_steps(cfg, steps_per_epoch: int) -> Plan:
    """``cfg.max_steps`` steps if set, else ``cfg.epochs`` epochs; warm-up and decay as fractions of all steps.
    ``cfg.eval_every`` (steps) replaces the pass over the data as the interval between evaluations, so that a
    step budget validates as often at 5% of the labels as at 100% (a pass over 5% is a handful of steps)."""
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    interval = min(cfg.eval_every or steps_per_epoch, total)
    warmup = round(total * cfg.warmup_fraction)
    return Plan(interval, total, math.ceil(total / interval), warmup,
                cosine_schedule(total, warmup, final=cfg.min_lr_fraction))


class Task:
    """What a training stage plugs into `fit`. Set ``model`` (the trainable module, on its device) before fitting.

    ``forward(model, batch, autocast)`` -> (loss parts with ``loss``, images in the batch); ``batches(start, plan)``
    -> an iterator over the batches of steps ``start ..`` (a pure function of the step); ``evaluate(model,
    autocast)`` -> metrics or None (rank 0 only). The hooks are optional.
    """

    model: nn.Module
    lr_flags = "--lr (or --lr-encoder)"
    eval_tags: dict = {}
    curve: dict = {}  # keyword arguments of `plot_losses`: which eval metric the PNG shows

    def param_groups(self, cfg) -> list[dict]:
        raise NotImplementedError

    def resolved(self) -> dict:
        """Facts of this run for config.yaml's ``resolved`` part (beside the engine's schedule)."""
        return {}

    def batches(self, start: int, plan: Plan) -> Iterator:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch, autocast) -> tuple[dict[str, torch.Tensor], int]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, autocast) -> dict | None:
        return None

    def eval_message(self, metrics: dict) -> str:
        return ""

    def on_resume(self, records: list[dict]) -> None:
        """The metrics of the run so far (records past the checkpoint already dropped)."""

    def on_eval(self, record: dict | None, epoch: int, step: int, model: nn.Module) -> None:
        """After each evaluation (rank 0): at the start (epoch 0), then after each epoch before its checkpoint;
        e.g. keep the best weights."""

    def finish(self, model: nn.Module, records: list[dict], step: int) -> dict:
        """After the last epoch (rank 0): write the run's product, return what the result adds."""
        return {}


def train_step(model: nn.Module, forward: Callable, batch, optimizer: torch.optim.Optimizer, device: torch.device,
               params: list[torch.nn.Parameter] | None = None, clip_grad: float = 1.0, autocast=None, scaler=None,
               step: int = 0, epoch: int = 0, lr_flags: str = "--lr (or --lr-encoder)") -> tuple[dict, int]:
    """One optimiser step: ``forward(model, batch, autocast)`` -> (parts, images), backward, gradient clipping, the
    NaN guard and the update, at the learning rates already set on the optimizer. Returns the logged values
    (unweighted loss terms, ``loss``, ``grad_norm`` when clipping; averaged over DDP ranks) and the image count.
    ``step``/``epoch`` only label a NonFiniteLoss message."""
    parts, n = forward(model, batch, autocast or nullcontext())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(parts["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        parts["loss"].backward()
    values = {k: float(v.detach()) for k, v in parts.items()}
    if clip_grad > 0:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip_grad))
    values = all_reduce_mean(values, device)
    # An inf grad norm is routine under an fp16 scaler (it skips that step), so only the loss counts there.
    check_finite({k: v for k, v in values.items() if scaler is None or k != "grad_norm"}, step, epoch, lr_flags)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return values, n


class _Run:
    """The state of one `fit`: optimizer, scaler, EMA, metrics, step."""

    def __init__(self, task: Task, cfg, run_dir: Path, device: torch.device, plan: Plan, status):
        self.task, self.cfg, self.run_dir, self.device, self.plan, self.status = task, cfg, run_dir, device, plan, status
        self.main, self.world = dist.rank() == 0, dist.world_size()
        self.model = task.model
        self.ema = ModelEma(self.model, cfg.ema) if cfg.ema else None
        self.optimizer = torch.optim.AdamW(task.param_groups(cfg))
        self.autocast, self.scaler = autocast_for(device, cfg.amp)
        self.metrics = MetricsWriter(run_dir / METRICS_NAME, enabled=self.main)
        self.step, self.start_epoch, self.images_per_step = 0, 0, 0

    def scored(self) -> nn.Module:
        """The weights that are validated and saved: the EMA when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def start(self, ckpt: Path | None) -> None:
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scaler)
            self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.metrics.truncate_after(self.step)
            self.task.on_resume(read_metrics(self.run_dir / METRICS_NAME))
            self.status(f"resuming {self.run_dir} from {ckpt.name} (step {self.step} of {self.plan.total})")
            return
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / METRICS_NAME).unlink(missing_ok=True)
            resolved = {"command": self.cfg.command, **self.plan.describe(), "world_size": self.world,
                        **self.task.resolved()}
            write_config(self.run_dir / CONFIG_NAME, {**self.cfg.to_dict(), "resolved": json_safe(resolved)})
        record = self.evaluate(0)
        if self.main:
            self.task.on_eval(record, 0, 0, self.scored())

    def evaluate(self, epoch: int) -> dict | None:
        if not self.main:
            return None
        t0 = time.perf_counter()
        m = self.task.evaluate(self.scored(), self.autocast)
        if m is None:
            return None
        record = {"type": "eval", **self.task.eval_tags, "step": self.step, "epoch": epoch, **m,
                  "eval_s": time.perf_counter() - t0}
        self.metrics.write(record)
        self.status(f"epoch {epoch} step {self.step}: {self.task.eval_message(m)}")
        return record

    def checkpoint(self, epoch: int) -> None:
        extra = {"config": self.cfg.to_dict(), **({"ema": self.ema.state_dict()} if self.ema is not None else {})}
        save_checkpoint(self.run_dir / CKPT_DIR, epoch, self.model, self.optimizer, self.scaler, self.step,
                        extra=extra, keep=self.cfg.keep_checkpoints)

    def train(self, on_progress) -> None:
        plan, cfg = self.plan, self.cfg
        self.model = wrap_ddp(self.model, self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        batches = self.task.batches(self.step, plan)
        t_log, n_log, last = time.perf_counter(), 0, {}
        for epoch in range(self.start_epoch, plan.epochs):
            self.model.train()
            while self.step < min(plan.total, (epoch + 1) * plan.steps_per_epoch):
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * plan.schedule[self.step]
                values, n = train_step(self.model, self.task.forward, next(batches), self.optimizer, self.device,
                                       params, cfg.clip_grad, self.autocast, self.scaler, self.step, epoch,
                                       self.task.lr_flags)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(unwrap(self.model), self.step)
                n_log += n * self.world
                self.images_per_step = n * self.world
                if self.main and (self.step % cfg.log_every == 0 or self.step == plan.total):
                    elapsed = time.perf_counter() - t_log
                    last = {"type": "train", "step": self.step, "epoch": epoch,
                            "lr": self.optimizer.param_groups[-1]["lr"], **values,
                            "img_s": n_log / elapsed if elapsed > 0 else None}
                    self.metrics.write(last)
                    t_log, n_log = time.perf_counter(), 0
                if self.main and on_progress:
                    on_progress({"step": self.step, "total": plan.total, "epoch": epoch, "loss": values["loss"],
                                 "img_s": last.get("img_s")})
            record = self.evaluate(epoch + 1)
            if self.main:
                self.task.on_eval(record, epoch + 1, self.step, self.scored())
                self.checkpoint(epoch + 1)
            dist.barrier()


def fit(task: Task, cfg, *, run_dir: Path, ckpt: Path | None, device: torch.device, plan: Plan,
        on_progress: Callable[[dict], None] | None = None, on_status: Callable[[str], None] | None = None) -> dict:
    """Train (or resume from ``ckpt``) ``task.model`` for ``plan``; returns the run summary: ``run_dir``, ``step``,
    ``epochs``, ``steps_per_epoch`` and what ``task.finish`` adds (rank 0)."""
    run = _Run(task, cfg, Path(run_dir), device, plan, on_status or (lambda m: None))
    t0 = time.perf_counter()
    run.start(ckpt)
    first_step = run.step
    run.train(on_progress)
    result = {"run_dir": str(run_dir), "step": run.step, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch}
    if run.main:
        # What a report shows as the run's time and speed: this process's wall time and its training images/s.
        seconds = time.perf_counter() - t0
        images = (run.step - first_step) * run.images_per_step
        run.metrics.write({"type": "end", "step": run.step, "seconds": seconds,
                           "img_s": images / seconds if seconds > 0 else None})
        records = read_metrics(Path(run_dir) / METRICS_NAME)
        result.update(task.finish(run.scored(), records, run.step))
        plot_losses(Path(run_dir) / METRICS_NAME, Path(run_dir) / CURVE_NAME, **task.curve)
    dist.barrier()
    return result
