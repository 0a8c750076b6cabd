"""MSE between the projected student embedding and the cached teacher embedding.

The cached embedding is L2-normalised and the prediction is not, so unlike the cosine loss this also pulls
the prediction's norm to 1. Off by default; useful as a small auxiliary term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MSELoss(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: (B, D)."""
        return F.mse_loss(pred.float(), target.float())
