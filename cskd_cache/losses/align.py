"""`AlignLoss`: Stage I's objective, the weighted sum of the alignment terms (each in a file of its own)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .cosine import CosineLoss
from .mse import MSELoss
from .token_smooth_l1 import TokenSmoothL1Loss

__all__ = ["AlignLoss"]


class AlignLoss(nn.Module):
    """Weighted sum of the alignment losses; a loss with weight 0 is not computed at all.

    ``forward(out, batch)`` takes the model's ``{"embed", "tokens"}`` and the batch's ``embed``/``tokens``
    targets and returns ``{"loss": total, "global": ..., "token": ..., "mse": ...}`` (only the active terms,
    unweighted, so they can be logged and compared across weightings).
    """

    def __init__(self, w_global: float = 1.0, w_token: float = 0.0, w_mse: float = 0.0, token_beta: float = 2.0):
        super().__init__()
        for name, w in (("global", w_global), ("token", w_token), ("mse", w_mse)):
            if w < 0:
                raise ConfigError(f"loss weight for {name} must be >= 0, got {w}")
        if w_global == w_token == w_mse == 0:
            raise ConfigError("every loss weight is 0: nothing to train (set --w-global, --w-token or --w-mse)")
        self.weights = {"global": float(w_global), "token": float(w_token), "mse": float(w_mse)}
        self.terms = nn.ModuleDict({"global": CosineLoss(), "token": TokenSmoothL1Loss(token_beta), "mse": MSELoss()})

    @property
    def uses_tokens(self) -> bool:
        return self.weights["token"] > 0

    def forward(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        parts = {}
        if self.weights["global"]:
            parts["global"] = self.terms["global"](out["embed"], batch["embed"])
        if self.weights["token"]:
            parts["token"] = self.terms["token"](out["tokens"], batch["tokens"])
        if self.weights["mse"]:
            parts["mse"] = self.terms["mse"](out["embed"], batch["embed"])
        parts["loss"] = sum(self.weights[k] * v for k, v in parts.items())
        return parts
