"""The images and targets `cskd align` trains on: each cache row's cached view, rebuilt at the student's size.

A row's targets were computed on one exact view (crop box + flip) of its image; the student sees that same
view, re-rendered from the original file with `views.render_tensor` at its own input size and normalisation
(consistent teaching). With V cached views, each epoch draws one per image (`CachedFeatures`, view="random",
a hash of seed, epoch and row, so every DataLoader worker and DDP rank agrees without shared state).

Decoding the image is the cost here, so it happens in DataLoader workers; the targets ride along from the
cache reader, which batches its HDF5 reads.

With ``embed_stats`` (`embed_stats`: per-dimension mean and std of the training rows' embeddings) the global
target is standardised, ``(e - mean) / std``. A teacher's embeddings share a large common direction (CLIP's
cone; a CNN's non-negative pooled features: predicting the mean embedding alone reaches cosine 0.45 on the
proxy cache), so a cosine to the raw target rewards that direction first; on the standardised target the mean
scores 0 and only what tells images apart counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import DEFAULT_MAX_PIXELS, BadImage, RowImages, file_digest, image_changed
from .manifest import CacheError
from .reader import FeatureCache
from ..data.views import render_tensor

__all__ = ["AlignDataset", "ImagesMissing", "parse_image_root", "resolve_paths", "check_images", "collate",
           "embed_stats"]


class ImagesMissing(CacheError):
    """Cache rows whose image file is not where the cache says; the message lists them and the fix."""


def parse_image_root(pairs: Sequence[str] | dict | None) -> dict[str, str]:
    """["OLD=NEW", ...] -> {OLD: NEW}; OLD is a source root (or any prefix of one) recorded in the manifest."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        return {str(k): str(v) for k, v in pairs.items()}
    out = {}
    for p in pairs:
        old, sep, new = str(p).partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--image-root {p!r}: expected OLD=NEW, e.g. /data/AVA=/mnt/ssd/AVA")
        out[old] = new
    return out


def _remap(path: str, image_root: dict[str, str]) -> str:
    for old, new in image_root.items():
        o = old.rstrip("/")
        if path == o or path.startswith(o + "/"):
            return new.rstrip("/") + path[len(o):]
    return path


def resolve_paths(cache: FeatureCache, image_root: dict[str, str] | None = None) -> list[str]:
    """Every row's image path after remapping (relative keys through their source root, absolute keys as is)."""
    image_root = image_root or {}
    out = []
    for i in range(len(cache)):
        row = cache.row(i, image_root)
        out.append(_remap(row.path, image_root) if os.path.isabs(row.key) else row.path)
    return out


def check_images(cache: FeatureCache, paths: list[str], rows: Sequence[int], show: int = 5,
                 sample: int = 16) -> None:
    """Fail before training starts, not an hour in, when images have moved, or when a remapped root holds other
    images under the same names: every file must exist, and ``sample`` of them (spread over the rows) must have
    the content digest the cache stored. The loader then checks every file as it reads it (`images.load_rgb`)."""
    missing = [paths[r] for r in rows if not os.path.isfile(paths[r])]
    if not missing:
        rows = list(rows)
        for r in (rows[int(i)] for i in np.unique(np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(int))):
            got = file_digest(paths[r])
            if got != cache.digests[r]:
                raise image_changed(paths[r], r, got, cache.digests[r])
        return
    roots = "; ".join(f"{name}: {root}" for name, root in cache.roots.items())
    listed = "\n  ".join(missing[:show]) + (f"\n  ... and {len(missing) - show} more" if len(missing) > show else "")
    raise ImagesMissing(
        f"{len(missing)} of {len(rows)} images of cache {cache.path} are missing, e.g.\n  {listed}\n"
        f"The cache recorded these source roots: {roots}. If the images moved, pass --image-root OLD=NEW "
        "(repeatable), e.g. --image-root /old/root=/new/root")


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
        raise ValueError("no rows to compute embedding statistics on")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0))
    std[std < 1e-6 * max(float(std.max()), 1e-12)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


class AlignDataset(Dataset):
    """Yields dicts: row, view, key, image (3, H, W) at the student's input_cfg, embed (D,), tokens (T, C).

    ``image_rows`` maps a row to the row whose image is shown instead (None = itself): the shuffled-target
    control permutes it, so the targets stop belonging to the image while everything else stays equal.
    ``embed_stats`` (mean, std) standardises ``embed`` (module docstring).
    """

    def __init__(self, cache: FeatureCache, rows: np.ndarray, input_cfg: dict, paths: list[str],
                 tokens: bool = True, view: str | int = "random", seed: int = 0,
                 image_rows: np.ndarray | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 embed_stats: tuple[np.ndarray, np.ndarray] | None = None):
        self.features = cache.dataset(view=view, tokens=tokens, rows=rows, seed=seed)
        self.boxes = cache.boxes
        self.images = RowImages(cache.digests, max_pixels)
        self.paths = paths
        self.cfg = input_cfg
        self.image_rows = image_rows
        self.embed_stats = None if embed_stats is None else tuple(torch.from_numpy(np.asarray(a, np.float32))
                                                                  for a in embed_stats)

    def __len__(self) -> int:
        return len(self.features)

    def set_epoch(self, epoch: int) -> None:
        self.features.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        items = self.features.__getitems__(indices)
        c = self.cfg
        for it in items:
            src = int(self.image_rows[it["row"]]) if self.image_rows is not None else it["row"]
            path = self.paths[src]
            try:
                img = self.images.load(path, src)
            except (BadImage, OSError) as e:
                raise CacheError(f"{path}: cannot read the image of cache row {src} ({e}); it decoded when the "
                                 "cache was extracted - was the file replaced or removed?") from None
            it["image"] = render_tensor(img, self.boxes[src, it["view"]], c["size"], c["interpolation"],
                                        c["mean"], c["std"])
            if self.embed_stats is not None:
                it["embed"] = (it["embed"] - self.embed_stats[0]) / self.embed_stats[1]
        return items


def collate(items: list[dict]) -> dict:
    out = {"row": torch.tensor([it["row"] for it in items]), "view": torch.tensor([it["view"] for it in items]),
           "key": [it["key"] for it in items]}
    for name in ("image", "embed", "tokens"):
        if name in items[0]:
            out[name] = torch.stack([it[name] for it in items])
    return out
