"""Alignment heads: map a student's features into the teacher's cached feature spaces.

Created from the widths alone (as timm's distillation task adds a projection when student and teacher widths
differ), so any student can be aligned to any cache. The heads are training scaffolding: only the encoder
is saved for the later stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resample_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size). Shrinking average-pools, as the extractor pooled the cached tokens;
    anything else is bilinear."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class AlignHeads(nn.Module):
    """``proj``: Linear(pooled_dim -> embed_dim). ``token``: 1x1 conv (a per-position linear map)
    grid_dim -> token_dim after resampling the student grid to ``token_grid``; None when no token loss is used
    (an unused head would have no gradient, which DDP rejects)."""

    def __init__(self, pooled_dim: int, grid_dim: int, embed_dim: int, token_dim: int | None = None,
                 token_grid: tuple[int, int] | None = None):
        super().__init__()
        self.proj = nn.Linear(pooled_dim, embed_dim)
        self.token_grid = tuple(token_grid) if token_grid else None
        self.token = nn.Conv2d(grid_dim, token_dim, 1) if token_dim else None

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor) -> dict:
        out = {"embed": self.proj(pooled), "tokens": None}
        if self.token is not None:
            # Resample first: the 1x1 conv then runs at the (usually smaller) cached grid, and the two commute.
            t = self.token(resample_grid(grid, self.token_grid))
            out["tokens"] = t.flatten(2).transpose(1, 2)  # (B, G*G, C), row-major as the cache stores it
        return out


class AlignModel(nn.Module):
    """Student + heads: the whole trainable part, so DDP wraps exactly this module."""

    def __init__(self, student: nn.Module, heads: AlignHeads):
        super().__init__()
        self.student = student
        self.heads = heads

    def forward(self, x: torch.Tensor) -> dict:
        pooled, grid = self.student(x)
        return self.heads(pooled, grid)
