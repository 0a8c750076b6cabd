"""How well a student reproduces the teacher, measured on a held-out slice of the cache.

The slice is chosen by hashing each row's ``source/key`` (``(sha256 % 100) / 100 < eval_fraction``), so it is the same
on every run, machine and rank, survives re-extraction and never depends on row order.

Metrics, all on the eval view (view 0) of the held-out rows:
- ``global_cos``: mean cosine between the projected student embedding and the cached embedding (the
  standardised one when the run trains on it: then predicting the mean scores 0).
- ``token_cos``: mean per-token cosine between the token head and the LayerNorm-whitened cached tokens (what
  the token loss regresses to); only when the model has a token head.
- ``knn_agreement``: for each held-out row, the overlap of its top-k neighbours (cosine, self excluded) among
  the held-out rows in the student's embedding and in the teacher's, averaged: 1.0 = same neighbourhoods.
  faiss does the search when installed (imported lazily), torch otherwise (`knn_index`); both give the same
  neighbours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["heldout_mask", "split_rows", "knn_indices", "knn_agreement", "evaluate"]


def heldout_mask(sources: Sequence[str], keys: Sequence[str], eval_fraction: float) -> np.ndarray:
    def bucket(s: str, k: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{s}/{k}".encode()).digest()[:8], "little") % 100

    # bucket / 100 (not bucket < fraction * 100, where 0.07 * 100 = 7.000000000000001 would take bucket 7 too)
    return np.array([bucket(s, k) / 100 < eval_fraction for s, k in zip(sources, keys)], dtype=bool)


def split_rows(cache, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a FeatureCache."""
    mask = heldout_mask(cache.sources, cache.keys, eval_fraction)
    return np.nonzero(~mask)[0], np.nonzero(mask)[0]


def knn_indices(x: torch.Tensor, k: int, backend: str = "auto") -> np.ndarray:
    """(N, k) indices of each row's k nearest rows by cosine, itself excluded. backend: auto, faiss, torch."""
    from ..evaluate.knn_index import build_index, neighbours_excluding_self

    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"unknown kNN backend {backend!r} (auto, faiss or torch)")
    # Always exact (never IVF): the agreement metric compares two spaces and must not carry search error.
    index = build_index(x.float().cpu().numpy(), backend=backend, ivf_threshold=np.iinfo(np.int64).max, gpu=False)
    return neighbours_excluding_self(index, k)[1]


def knn_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10, backend: str = "auto") -> float | None:
    """Mean overlap |N_s(i) & N_t(i)| / k of the two spaces' top-k neighbour sets; None (n/a) unless there are
    more than k + 1 rows: with k or fewer other rows every row's neighbours are all the others in both spaces,
    and the agreement would be 1.0 whatever the spaces."""
    n = student.shape[0]
    if k < 1 or n <= k + 1:
        return None
    a, b = knn_indices(student, k, backend), knn_indices(teacher, k, backend)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, knn_k: int = 10, knn_backend: str = "auto",
             autocast=None) -> dict:
    """Metrics of `model` (an AlignModel, unwrapped) over `loader` (held-out rows, fixed view)."""
    was_training = model.training
    model.eval()
    preds, targets, tok_sum, tok_n = [], [], 0.0, 0
    try:
        for batch in loader:
            with autocast or nullcontext():
                out = model(batch["image"].to(device, non_blocking=True))
            preds.append(out["embed"].float().cpu())
            targets.append(batch["embed"].float())
            if out["tokens"] is not None and "tokens" in batch:
                target = F.layer_norm(batch["tokens"].float(), (batch["tokens"].shape[-1],))
                cos = F.cosine_similarity(out["tokens"].float().cpu(), target, dim=-1)
                tok_sum += float(cos.sum())
                tok_n += cos.numel()
    finally:
        model.train(was_training)
    if not preds:
        return {"eval_rows": 0}
    pred, target = torch.cat(preds), torch.cat(targets)
    return {
        "eval_rows": int(pred.shape[0]),
        "global_cos": float(F.cosine_similarity(pred, target, dim=-1).mean()),
        "token_cos": tok_sum / tok_n if tok_n else None,
        "knn_agreement": knn_agreement(pred, target, knn_k, knn_backend),
    }
