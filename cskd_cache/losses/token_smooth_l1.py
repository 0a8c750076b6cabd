"""Token loss of Feature Distillation (Wei et al. 2022): smooth-L1 to LayerNorm-whitened teacher tokens.

Whitening each target token over its channels (``F.layer_norm(target, (C,))``, no affine) removes the
teacher's per-token scale and the few huge channels CLIP-like ViTs carry, which would otherwise dominate the
regression; smooth-L1 keeps the remaining outliers from doing the same. ``beta`` (default 2.0, the value in FD's
reference code) is where smooth-L1 switches from quadratic to linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenSmoothL1Loss(nn.Module):
    def __init__(self, beta: float = 2.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: (B, T, C)."""
        target = F.layer_norm(target.float(), (target.shape[-1],))
        return F.smooth_l1_loss(pred.float(), target, beta=self.beta)
