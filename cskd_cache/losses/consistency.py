"""Consistency regularisation on unlabelled views (`cskd distill --consistency WEIGHT`).

Each unlabelled item is shown twice, as two independent mild jitters of the same cached view (`data.transforms`).
The first is the view the distillation loss also sees; its prediction is the target, with its gradient stopped
(the weak -> strong pattern of UDA / FixMatch); the second view's prediction is pulled towards it. A distribution
head compares the two softmaxed distributions with EMD (ordered bins, as every other Stage II loss); a scalar head
uses the squared difference of the 0..1 scores.

Why a stop-gradient target and not the symmetric EMD: with both sides trainable, the cheapest way to agree is to
predict the same distribution for every image; anchoring on the view the teacher's target also shapes leaves
only the second view free to move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .emd import EMDLoss

__all__ = ["ConsistencyLoss"]


class ConsistencyLoss(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.emd = EMDLoss()

    def forward(self, strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
        """strong, weak: (B, K) logits or (B,) scores of the same items' second and first views."""
        target = weak.detach().float()
        if self.kind == "distribution":
            return self.emd(strong.float().softmax(-1), target.softmax(-1))
        return F.mse_loss(strong.float(), target)
