"""Training plumbing shared by the training stages (`align` now, `distill`/`finetune` next).

Kept free of any one stage's model or loss: schedules, seeding, checkpoints, the NaN guard, run-directory
files (config.yaml, metrics.jsonl, loss-curve PNG) and DDP wrapping. Patterns follow dinov2 (per-iteration
schedules precomputed, NaN check in the loop, metrics as JSON lines) and timm (args.yaml in the run dir).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import dist

__all__ = [
    "cosine_schedule", "seed_everything", "resolve_device", "autocast_for", "param_groups", "NonFiniteLoss",
    "check_finite", "MetricsWriter", "read_metrics", "write_config", "plot_losses", "save_checkpoint",
    "latest_checkpoint", "load_checkpoint", "wrap_ddp", "unwrap", "all_reduce_mean", "json_safe",
]


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
    return torch.device(device)


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


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; raised so a run stops with a message instead of writing NaN weights."""


def check_finite(values: dict[str, float], step: int, epoch: int, lr_flags: str = "--lr (or --lr-student)") -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (epoch {epoch}): {shown}. Training stopped before applying this "
            f"update, so the newest checkpoint (if any) holds finite weights. Lower {lr_flags}, keep "
            "--clip-grad on, and check the cache with `cskd cache verify`")


class MetricsWriter:
    """Appends one JSON object per line (rank 0 only); flushed per record so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run re-does them, and must not log them twice."""
        if self.enabled and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_config(path: str | os.PathLike, config: dict) -> None:
    import yaml

    from ..cache.manifest import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, default_flow_style=None))


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike, metric: str = "global_cos",
                label: str = "held-out global cosine") -> None:
    """Training loss per step and one eval metric per epoch (align: held-out global cosine; finetune/distill:
    val SRCC), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:orange", label=label)
        ax2.set_ylabel(label, color="tab:orange")
    ax.set_title(Path(png_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# Checkpoints: RUN_DIR/checkpoints/epoch-NNNN/{model.safetensors, state.safetensors, state.json}. Written to a
# temporary folder and renamed, so a folder with the final name is always complete and resume never sees half a
# checkpoint. The trainer state holds no pickle (state_io), so resuming a downloaded run cannot run its code.

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: str | os.PathLike, epoch: int, model: nn.Module, optimizer, scaler, step: int,
                    extra: dict | None = None, keep: int = 0) -> Path:
    """Save model weights and trainer state (safetensors + JSON); keep the newest ``keep`` (0 = all)."""
    from safetensors.torch import save_model

    from .state_io import save_state

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = ckpt_dir / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(unwrap(model), str(tmp / "model.safetensors"))
    save_state(tmp, {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state(),
                     **(extra or {})})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        for old in sorted(ckpt_dir.glob("epoch-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose trainer state is a pickle (older cskd): loading it could run code, so it is refused."""


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    from .state_io import STATE_JSON, STATE_TENSORS

    ckpt_dir = Path(ckpt_dir)
    found = sorted(p for p in ckpt_dir.glob("epoch-*")
                   if (p / "model.safetensors").is_file() and (p / STATE_JSON).is_file()
                   and (p / STATE_TENSORS).is_file())
    if found:
        return found[-1]
    pickled = sorted(ckpt_dir.glob("epoch-*/state.pt"))
    if pickled:
        raise UnsafeCheckpoint(f"{pickled[-1]}: trainer state in pickle format (an older cskd, or planted), which "
                               "cskd does not load because unpickling can run code; start a new --out, or resume "
                               "with the release that wrote it")
    return None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer=None, scaler=None,
                    restore_rng: bool = True) -> dict:
    """Load a `save_checkpoint` folder into model (and optimizer/scaler); returns the state dict
    (epoch, step, extra keys)."""
    from safetensors.torch import load_model

    from .state_io import load_state

    path = Path(path)
    load_model(unwrap(model), str(path / "model.safetensors"), strict=True)
    state = load_state(path)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return state


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around exactly the trainable module when torchrun started several processes; else the model."""
    if not dist.is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (one collective); NaN anywhere makes the mean NaN, so every rank stops."""
    if not dist.is_dist() or not values:
        return values
    import torch.distributed as td

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    td.all_reduce(t)
    t /= dist.world_size()
    return dict(zip(values.keys(), t.tolist()))


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj
