"""Earth mover's distance between K-bin score distributions, r = 2 (NIMA; pyiqa's ``EMDLoss``).

Talebi & Milanfar, "NIMA: Neural Image Assessment", IEEE TIP 2018, eq. (1); pyiqa
(chaofengc/IQA-PyTorch, ``pyiqa/losses/iqa_losses.py``): per sample
``(mean_k |cumsum(p)_k - cumsum(q)_k|^r)^(1/r)``, then the batch mean. Bins are ordered, so comparing CDFs
charges a vote moved from 2 to 9 more than one moved from 2 to 3, which a bin-wise loss (KL, CE) does not.
"""

from __future__ import annotations

import torch
from torch import nn


class EMDLoss(nn.Module):
    def __init__(self, r: float = 2.0, eps: float = 1e-12):
        super().__init__()
        self.r, self.eps = float(r), eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: (B, K) probabilities (softmax the head's logits first); returns a scalar."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        diff = torch.cumsum(pred.float(), dim=-1) - torch.cumsum(target.float(), dim=-1)
        m = diff.abs().pow(self.r).mean(dim=-1)
        # x^(1/r) has an infinite slope at 0, so an exact match would give NaN gradients; the clamp
        # blocks that gradient and the where() still returns an exact 0
        per_sample = torch.where(m > 0, m.clamp_min(self.eps).pow(1.0 / self.r), torch.zeros_like(m))
        return per_sample.mean()
