"""Deployable scorers: an image encoder and a score head as one ``nn.Module`` (image batch in, scores out).

`IAAModel(encoder, head)` is what gets exported (ONNX) or timed: the same wrapper serves a student
(`StudentEncoder`, whose forward gives ``(pooled, grid)``; only ``pooled`` feeds the head) and a CLIP teacher's
image tower (open_clip ``model.visual``, whose forward gives the projected embedding). ``normalize=True``
L2-normalises the features first, as the feature cache stores teacher embeddings, so a head fitted on cached
embeddings sees the same inputs at deployment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IAAModel", "count_params"]


class IAAModel(nn.Module):
    """``encoder`` + ``head``: ``(B, 3, H, W)`` -> the head's output.

    encoder: a module returning a ``(B, C)`` tensor, or a tuple/list whose first item is ``(B, C)`` pooled
        features (a `StudentEncoder`'s ``(pooled, grid)``).
    head: a module taking ``(B, C)``; e.g. `DistributionHead` (``(B, K)`` logits) or `ScalarHead` (``(B,)``).
    normalize: L2-normalise the features before the head.
    scores: return the expected score ``(B,)`` instead of the raw head output, through ``head.scores(logits)``
        when the head has that method (a distribution head); a head without it already returns scores.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, normalize: bool = False, scores: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.normalize = normalize
        self.scores = scores

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        if f.ndim != 2:
            raise ValueError(f"{type(self.encoder).__name__} gave features of shape {tuple(f.shape)}; "
                             "IAAModel needs pooled (B, C) features (or a tuple starting with them)")
        return F.normalize(f, dim=-1) if self.normalize else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        if self.scores and callable(getattr(self.head, "scores", None)):
            out = self.head.scores(out)
        return out


def count_params(module: nn.Module) -> int:
    """Parameters that take part in inference (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
