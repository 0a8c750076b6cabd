"""An exponential moving average of a model's weights (`finetune` / `distill` ``--ema DECAY``).

A distilled student's val SRCC moves by several hundredths from one epoch to the next; the average of its recent
weights is steadier, and it is what timm's ``ModelEmaV3`` and DeiT's distillation keep. After optimiser step
``t`` (1-based) every floating-point parameter and buffer becomes ``e <- d_t * e + (1 - d_t) * w`` with
``d_t = min(decay, (1 + t) / (10 + t))``: the warm-up keeps the random initial weights from lingering in the
average of a short run. BatchNorm running statistics are averaged like weights; integer buffers (BatchNorm's
``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma", "ema_decay"]


def ema_decay(decay: float, step: int) -> float:
    return min(decay, (1 + step) / (10 + step))


class ModelEma:
    """The averaged copy lives in ``module`` (eval mode, no gradients), on the model's device."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = ema_decay(self.decay, step)
        avg, cur = [], []
        for e, w in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                avg.append(e)
                cur.append(w.detach())
            else:
                e.copy_(w)
        torch._foreach_lerp_(avg, cur, 1.0 - d)

    def state_dict(self) -> dict:
        return {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
