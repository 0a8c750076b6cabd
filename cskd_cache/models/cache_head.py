"""The `cache-head` teacher of `cskd distill`: a score head fitted on cached CLIP embeddings, in seconds.

The LAION aesthetic-predictor recipe: a linear layer (or a small MLP, ``hidden`` > 0) on L2-normalised CLIP
image embeddings. Training samples are every cached view of every labelled *train* image linked to the cache,
each with its image's label (a whole-image score is the best target a crop has); a distribution head (K bins)
is fitted with EMD, a scalar head (score on 0..1 over the dataset's scale) with MSE. Full-batch-ish AdamW with
a seeded sampler and its own RNG, so the fit is the same every time and never disturbs the training RNG.

Its predictions for every cached view come straight from the cache (`predict_embeddings`), with no image
decoded and no encoder run. On disk (a directory, written by `save_cache_head`):

    cache_head.json          {"format": "cskd-cache-head", "version", "in_dim", "kind", "bins", "hidden",
                              "labels": {name, scale, bins, threshold}, "fit": {...}}
    cache_head.safetensors   the head's weights
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingFile, ModelError
from ..files import write_json
from ..losses.emd import EMDLoss
from .scorer import build_head
from .weights import load_weights

__all__ = ["CacheHead", "fit_cache_head", "predict_embeddings", "save_cache_head", "load_cache_head",
           "HEAD_JSON", "HEAD_WEIGHTS"]

HEAD_JSON = "cache_head.json"
HEAD_WEIGHTS = "cache_head.safetensors"
FORMAT = "cskd-cache-head"
VERSION = 1


class CacheHead(nn.Module):
    """L2-normalise, optional MLP (Linear, GELU, Dropout), then a distribution or scalar head."""

    def __init__(self, in_dim: int, kind: str, bins: int | None, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.kind, self.bins, self.hidden = in_dim, kind, bins, hidden
        self.mlp = (nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout)) if hidden
                    else nn.Identity())
        self.head = build_head(kind, hidden or in_dim, bins)

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(F.normalize(embed.float(), dim=-1)))


def fit_cache_head(embed: np.ndarray, targets: dict[str, np.ndarray], kind: str, bins: int | None,
                   hidden: int = 0, steps: int = 1000, lr: float = 3e-3, weight_decay: float = 1e-4,
                   batch_size: int = 1024, seed: int = 0) -> tuple[CacheHead, dict]:
    """Fit on embed (n, V, D) with per-image targets ``dist`` (n, K) or ``unit`` (n,); returns (head, info)."""
    n, v, d = embed.shape
    if n == 0:
        raise ModelError("no labelled train image is linked to the feature cache, so the cache-head teacher has "
                         "nothing to fit; extract the labelled images into the cache or use --teacher run:DIR")
    x = torch.from_numpy(embed.reshape(n * v, d).astype(np.float32))
    key = "dist" if kind == "distribution" else "unit"
    y = torch.from_numpy(np.repeat(np.asarray(targets[key], np.float32), v, axis=0))
    emd = EMDLoss()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = CacheHead(d, kind, bins, hidden, dropout=0.1 if hidden else 0.0)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        b = min(batch_size, len(x))
        head.train()
        for _ in range(steps):
            idx = torch.randperm(len(x), generator=gen)[:b]
            out = head(x[idx])
            loss = emd(out.softmax(-1), y[idx]) if kind == "distribution" else F.mse_loss(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    return head, {"samples": int(len(x)), "images": int(n), "steps": steps, "lr": lr, "final_loss": float(loss.detach())}


@torch.inference_mode()
def predict_embeddings(head: CacheHead, embed: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
    """Head outputs for embed (N, V, D): logits (N, V, K) or unit scores (N, V), float32."""
    head.eval()
    outs = []
    for s in range(0, len(embed), batch_rows):
        e = torch.from_numpy(embed[s:s + batch_rows].astype(np.float32))
        outs.append(head(e).numpy().astype(np.float32))
    if not outs:
        shape = (0, embed.shape[1]) + ((head.bins,) if head.kind == "distribution" else ())
        return np.zeros(shape, np.float32)
    return np.concatenate(outs)


def save_cache_head(dir: str | os.PathLike, head: CacheHead, labels_meta: dict, fit: dict) -> None:
    from safetensors.torch import save_model

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tmp = dir / (HEAD_WEIGHTS + ".tmp")
    save_model(head, str(tmp))
    os.replace(tmp, dir / HEAD_WEIGHTS)
    write_json(dir / HEAD_JSON, {"format": FORMAT, "version": VERSION, "in_dim": head.in_dim, "kind": head.kind,
                                 "bins": head.bins, "hidden": head.hidden, "labels": labels_meta, "fit": fit})


def load_cache_head(dir: str | os.PathLike) -> tuple[CacheHead, dict]:

    dir = Path(dir)
    meta_path = dir / HEAD_JSON
    if not meta_path.is_file() or not (dir / HEAD_WEIGHTS).is_file():
        raise MissingFile(f"{dir}: no {HEAD_JSON} + {HEAD_WEIGHTS} here")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelError(f"{meta_path}: not a cskd cache head (format {meta.get('format')!r})")
    head = CacheHead(int(meta["in_dim"]), meta["kind"], meta.get("bins"), int(meta.get("hidden") or 0),
                     dropout=0.1 if meta.get("hidden") else 0.0)
    load_weights(head, str(dir / HEAD_WEIGHTS), "cache-head")
    return head.eval(), meta
