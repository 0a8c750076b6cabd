"""Global cosine loss: 1 - cos(student embedding, teacher embedding), averaged over the batch.

Scale-free, so the student matches the direction of the (L2-normalised) cached embedding, which is all that
cosine retrieval and linear probes on it use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineLoss(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: (B, D)."""
        return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
