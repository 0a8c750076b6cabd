"""Score heads on top of a student's pooled features.

DistributionHead predicts a K-bin score distribution (NIMA-style) and reads the mean score off it, so one
head serves the EMD/KL losses and the SRCC/PLCC metrics; ScalarHead regresses the score directly for
datasets without vote histograms (TAD66K, SPAQ, AADB).
"""

from __future__ import annotations

import torch
from torch import nn


class DistributionHead(nn.Module):
    def __init__(self, in_dim: int, bins: int = 10, dropout: float = 0.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.bins = bins
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, bins)
        # bin values 1..K as a buffer so they follow .to(device); not saved, they are implied by bins
        self.register_buffer("values", torch.arange(1, bins + 1, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) -> logits (B, K)."""
        return self.fc(self.drop(x))

    @staticmethod
    def probs(logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=-1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected score over bin values 1..K: (B,), always within [1, K]."""
        return self.probs(logits) @ self.values


class ScalarHead(nn.Module):
    def __init__(self, in_dim: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) -> scores (B,)."""
        return self.fc(self.drop(x)).squeeze(-1)
