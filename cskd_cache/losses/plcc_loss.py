"""1 - PLCC over a batch, for scalar score heads.

Pearson correlation is invariant to the prediction's offset and scale, so this loss trains the ranking and
linearity that SRCC/PLCC reward without forcing the head onto the label scale; pair it with an L1/MSE term
when absolute scores matter. pyiqa's ``PLCCLoss`` (chaofengc/IQA-PyTorch, ``pyiqa/losses/iqa_losses.py``) is
the same quantity halved, (1 - r) / 2; Li et al., "Norm-in-Norm Loss" (ACM MM 2020) motivate it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PLCCLoss(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: (B,) or (B, 1); returns 1 - r in [0, 2]."""
        pred, target = pred.float().reshape(-1), target.float().reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
        if pred.numel() < 2:
            # one sample has no correlation: contribute nothing rather than NaN (keeps the graph connected)
            return pred.sum() * 0.0
        # normalize() clamps the norm, so a constant batch gives r = 0 instead of 0/0
        vp = F.normalize(pred - pred.mean(), dim=0)
        vt = F.normalize(target - target.mean(), dim=0)
        return 1.0 - (vp * vt).sum()
