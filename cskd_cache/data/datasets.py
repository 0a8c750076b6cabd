"""The images `cskd finetune` and `cskd distill` train and validate on, as torch Datasets, and their sampler.

`ViewImages` serves three kinds of items, one per image path:

- a **cached view** (item linked to feature-cache row ``r``): view ``v`` of ``r`` (crop box + flip from the
  cache) rebuilt from the image file at the model's own input size, as `align_data` does. With V cached views
  one is drawn per item and cycle (a hash of seed, cycle and row), so the targets attached to ``(r, v)`` (the
  cached embedding, the teacher's prediction on that exact view) always belong to the pixels shown. With
  ``jitter`` the shown pixels are instead the mild augmentation below applied inside that view's box (a fresh
  crop and flip per item and cycle) while the targets stay those of ``(r, v)``: a consistency augmentation. The
  targets then describe nearly, not exactly, the pixels shown, and the student cannot memorise V fixed inputs
  per row;
- a **disk image** (no cache row): the eval view below, optionally with a mild augmentation (a random resized
  crop keeping 80-100 % of the eval view's area, then a horizontal flip with p = 0.5);
- per-item **label targets**: ``unit`` (score on 0..1 over the dataset's scale) and ``dist`` (K bins).

The eval view is the shortest-side centre square (`views.eval_box` with ``crop_pct`` 1.0, ``resize_mode``
shortest), resized to the model's input size: the same geometry as a CLIP teacher's view 0 minus its crop
margin, so a whole-image label still describes nearly all the pixels. Validation always uses it.

Randomness never comes from a global RNG: `StepBatches` encodes the pass (cycle) over a stream into each
index (``cycle * n + i``) and every random choice is a hash of (seed, cycle, item). The batches of step s are
a pure function of s, which is what makes ``--resume`` reach the same weights and lets DataLoader workers and
DDP ranks agree without sharing state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .images import DEFAULT_MAX_PIXELS, BadImage, RowImages, load_rgb
from .views import _random_resized_crop, eval_box, render_tensor

__all__ = ["EVAL_VIEW", "AUG_SCALE", "eval_view_box", "eval_tensor", "ViewImages", "StepBatches", "collate",
           "mix_seed", "ImageUnreadable"]

EVAL_VIEW = {"resize_mode": "shortest", "crop_pct": 1.0}
AUG_SCALE = (0.8, 1.0)
AUG_RATIO = (3 / 4, 4 / 3)


class ImageUnreadable(ValueError):
    """A training or validation image that no longer decodes; the message names the file."""


def mix_seed(*parts) -> int:
    """A 64-bit seed from any parts (blake2b: stable across processes, unlike hash())."""
    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def eval_view_box(input_cfg: dict, width: int, height: int) -> np.ndarray:
    """The eval view of a width x height image as a cache-style view ``[x0, y0, x1, y1, flip=0]``."""
    return np.array([*eval_box({"size": input_cfg["size"], **EVAL_VIEW}, width, height), 0.0], dtype=np.float32)


def eval_tensor(img, input_cfg: dict) -> torch.Tensor:
    """The exact (3, H, W) input a trained IAA model is validated on (see the module docstring)."""
    c = input_cfg
    return render_tensor(img, eval_view_box(c, *img.size), c["size"], c["interpolation"], c["mean"], c["std"])


def _augment(box: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    bw, bh = max(1, round((x1 - x0) * width)), max(1, round((y1 - y0) * height))
    left, top, w, h = _random_resized_crop(rng, bw, bh, AUG_SCALE, AUG_RATIO)
    fx, fy = (x1 - x0) / bw, (y1 - y0) / bh
    flip = float(rng.random() < 0.5)
    return np.array([x0 + left * fx, y0 + top * fy, x0 + (left + w) * fx, y0 + (top + h) * fy, flip], np.float32)


class ViewImages(Dataset):
    """Items of one stream (see the module docstring). Each item dict holds ``index``, ``row`` (-1 for a disk
    image), ``view`` (-1 likewise), ``image`` and, when given, the label targets (``unit``, ``dist``), the
    teacher's outputs on the shown view (every key of ``teacher``, arrays indexed ``[row, view]``) and the
    cached embedding ``embed`` with ``has_embed`` (False for disk images, whose ``embed`` is zeros).

    paths: one image path per item. rows: cache row per item (-1 = disk image), or None for all disk images.
    boxes: the cache's (N, V, 5) views; embed: its (N, V, D) embeddings (only when the feature loss needs them).
    digests: the cache's per-row sha256; each linked item's file is checked against its row's once per process.
    """

    def __init__(self, paths: Sequence[str], input_cfg: dict, *, rows: np.ndarray | None = None,
                 boxes: np.ndarray | None = None, embed: np.ndarray | None = None,
                 targets: dict[str, np.ndarray] | None = None, teacher: dict[str, np.ndarray] | None = None,
                 view: str | int = "random", augment: bool = False, jitter: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, digests: Sequence[str] | None = None):
        self.paths = list(paths)
        self.n = len(self.paths)
        self.rows = np.full(self.n, -1, np.int64) if rows is None else np.asarray(rows, np.int64)
        if len(self.rows) != self.n:
            raise ValueError(f"{len(self.rows)} cache rows for {self.n} images")
        if (self.rows >= 0).any() and boxes is None:
            raise ValueError("items linked to cache rows need the cache's boxes")
        self.boxes, self.embed = boxes, embed
        self.row_images = RowImages(digests, max_pixels) if digests is not None else None
        self.n_views = 1 if boxes is None else int(boxes.shape[1])
        self.targets = targets or {}
        self.teacher = teacher or {}
        if self.teacher and (self.rows < 0).any():
            raise ValueError("teacher targets exist only for cached views; every item needs a cache row")
        self.cfg, self.view, self.augment, self.jitter, self.seed = input_cfg, view, augment, jitter, seed
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return self.n

    def view_of(self, row: int, cycle: int) -> int:
        if isinstance(self.view, int):
            return self.view
        if self.n_views == 1:
            return 0
        return mix_seed("view", self.seed, cycle, row) % self.n_views

    def __getitem__(self, index: int) -> dict:
        return self._item(int(index))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self._item(int(i)) for i in indices]

    def _item(self, index: int) -> dict:
        cycle, i = divmod(index, self.n)
        path, row = self.paths[i], int(self.rows[i])
        try:
            if row >= 0 and self.row_images is not None:
                img = self.row_images.load(path, row)
            else:
                img = load_rgb(path, self.max_pixels)
        except (BadImage, OSError) as e:
            raise ImageUnreadable(f"{path}: cannot read this image ({e}); was it replaced or removed since the "
                                  "labels / cache were made?") from None
        c = self.cfg
        it: dict = {"index": i, "row": row, "view": -1}
        if row >= 0:
            v = self.view_of(row, cycle)
            box = self.boxes[row, v]
            it["view"] = v
            if self.jitter:
                box = _augment(box, *img.size, np.random.default_rng(mix_seed("jitter", self.seed, cycle, i)))
        else:
            box = eval_view_box(c, *img.size)
            if self.augment:
                box = _augment(box, *img.size, np.random.default_rng(mix_seed("aug", self.seed, cycle, i)))
        it["image"] = render_tensor(img, box, c["size"], c["interpolation"], c["mean"], c["std"])
        for name, arr in self.targets.items():
            it[name] = torch.as_tensor(np.asarray(arr[i], np.float32))
        for name, arr in self.teacher.items():
            it[name] = torch.as_tensor(np.asarray(arr[row, it["view"]], np.float32))
        if self.embed is not None:
            it["has_embed"] = row >= 0
            it["embed"] = (torch.from_numpy(self.embed[row, it["view"]].astype(np.float32)) if row >= 0
                           else torch.zeros(self.embed.shape[-1]))
        return it


def collate(items: list[dict]) -> dict:
    out = {}
    for name, value in items[0].items():
        if isinstance(value, torch.Tensor):
            out[name] = torch.stack([it[name] for it in items])
        else:
            out[name] = torch.tensor([it[name] for it in items])
    return out


class StepBatches(Sampler):
    """The batches of steps ``start .. total - 1`` of one stream, as lists of ``cycle * n + i`` indices.

    Each pass (cycle) over the n items is a permutation seeded by (seed, cycle); rank r of `world` takes every
    world-th item of it (cut to ``n // world`` so all ranks take equal steps). Step s reads positions
    ``s * batch .. s * batch + batch - 1`` of this rank's endless stream, so batches may span two cycles and a
    stream smaller than the batch simply repeats: a few labels still fill a batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        if n < world:
            raise ValueError(f"{n} items cannot be split over {world} processes")
        self.n, self.batch, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.per_rank = n // world
        self._cycle, self._mine = -1, None

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _cycle_items(self, cycle: int) -> np.ndarray:
        if cycle != self._cycle:
            order = (np.random.default_rng(mix_seed("order", self.seed, cycle)).permutation(self.n) if self.shuffle
                     else np.arange(self.n))
            self._mine = order[self.rank::self.world][:self.per_rank]
            self._cycle = cycle
        return self._mine

    def batch_at(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch, (step + 1) * self.batch):
            cycle, j = divmod(pos, self.per_rank)
            out.append(cycle * self.n + int(self._cycle_items(cycle)[j]))
        return out

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.batch_at(step)
