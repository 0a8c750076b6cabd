"""Checkpoints: RUN_DIR/checkpoints/epoch-NNNN/{model.safetensors, state.safetensors, state.json}.

Written to a temporary folder and renamed, so a folder with the final name is always complete and resume never
sees half a checkpoint. The trainer state (optimizer, scaler, every RNG, step, epoch, extras such as the EMA)
holds no pickle (`state_io`), so resuming a downloaded run cannot run its code; a pickled ``state.pt`` from an
older cskd is refused (`UnsafeCheckpoint`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dist import unwrap
from ..errors import TrainError
from ..models.weights import load_weights

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "UnsafeCheckpoint"]



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


class UnsafeCheckpoint(TrainError):
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

    from .state_io import load_state

    path = Path(path)
    load_weights(unwrap(model), str(path / "model.safetensors"), "checkpoint")
    state = load_state(path)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return state
