"""Statistics over a cache's rows, computed in chunks so a large cache is never copied whole.

`embed_stats` gives the per-dimension mean and std that ``--standardize-global`` aligns to: a teacher's
embeddings share a large common direction (CLIP's cone; a CNN's non-negative pooled features: predicting the mean
embedding alone reaches cosine 0.45 on the proxy cache), so a cosine to the raw target rewards that direction
first; on the standardised target, ``(e - mean) / std``, the mean scores 0 and only what tells images apart
counts.
"""

from __future__ import annotations

import numpy as np

from ..errors import CacheError
from .reader import FeatureCache

__all__ = ["embed_stats"]


def embed_stats(cache: FeatureCache, rows: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float32 (D,) each, over every view of ``rows``; accumulated in float64 chunks so a large
    cache is not copied whole. A constant dimension (a dead ReLU channel) gets std 1: its standardised target
    is 0, not 0/0."""
    d = cache.embed_dim
    total, sq, n = np.zeros(d), np.zeros(d), 0
    rows = np.asarray(rows, np.int64)
    for i in range(0, len(rows), chunk):
        e = cache.embed[rows[i:i + chunk]].reshape(-1, d).astype(np.float64)
        total += e.sum(0)
        sq += (e * e).sum(0)
        n += len(e)
    if n == 0:
        raise CacheError("no rows to compute embedding statistics on")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0))
    std[std < 1e-6 * max(float(std.max()), 1e-12)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
