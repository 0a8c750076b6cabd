"""torch.distributed, only as much as cskd needs: torchrun sets the environment, we read it."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as td
from torch import nn


def init_if_needed() -> None:
    """Join the process group torchrun describes; a plain `python` run stays single-process."""
    if td.is_available() and not td.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        td.init_process_group(backend=backend)


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_dist():
        td.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around exactly the trainable module when torchrun started several processes; else the model."""
    if not is_dist():
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
    if not is_dist() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    td.all_reduce(t)
    t /= world_size()
    return dict(zip(values.keys(), t.tolist()))
