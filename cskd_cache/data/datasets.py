"""The one training Dataset (`CachedViews`) and its sampler (`StepBatches`): what align, finetune and distill read.

`CachedViews` serves one stream of items, one image path per item; each item is

- a **cached view** (item linked to feature-cache row ``r``): view ``v`` of ``r`` (crop box + flip from the
  cache) rebuilt from the image file at the model's own input size (`views.render`), so the targets attached to
  ``(r, v)`` (the cached embedding and tokens, the teacher's prediction on that exact view) belong to the pixels
  shown. With V cached views one is drawn per item and pass (a hash of seed, pass and row). With ``jitter`` the
  shown pixels are the mild augmentation of `transforms` applied inside that view's box (a fresh crop and flip
  per item and pass) while the targets stay those of ``(r, v)``: a consistency augmentation;
- a **disk image** (no cache row): the eval view (`transforms.eval_view_box`), optionally with the mild
  augmentation (``augment``);

plus per-item **label targets** (``unit``: score on 0..1 over the dataset's scale, ``dist``: K bins). Arrays
too large for RAM (patch tokens) come from a ``streamed`` reader (`cache.reader.StreamedArrays`), read once per
batch in file order; this module never opens a cache itself, so it sits below the cache layer.

Randomness never comes from a global RNG: `StepBatches` encodes the pass (cycle) over a stream into each
index (``cycle * n + i``) and every random choice is a hash of (seed, cycle, item). The batches of step s are
a pure function of s, which is what makes ``--resume`` reach the same weights and lets DataLoader workers and
DDP ranks agree without sharing state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DataError
from .images import DEFAULT_MAX_PIXELS, BadImage, RowImages, load_rgb
from .transforms import AUG_SCALE, augment_box, eval_view_box
from .views import draft_target, render

__all__ = ["CachedViews", "StepBatches", "collate", "mix_seed", "ImageUnreadable"]


class ImageUnreadable(DataError):
    """A training or validation image that no longer decodes; the message names the file."""


def mix_seed(*parts) -> int:
    """A 64-bit seed from any parts (blake2b: stable across processes, unlike hash())."""
    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


class CachedViews(Dataset):
    """Items of one stream (module docstring). Each item dict holds ``index``, ``row`` (-1 for a disk image),
    ``view`` (-1 likewise), ``image`` and, when given, the label targets (every key of ``targets``, arrays indexed
    by item), the teacher's outputs on the shown view (every key of ``teacher``, arrays indexed ``[row, view]``),
    the cached embedding ``embed`` with ``has_embed`` (False for disk images, whose ``embed`` is zeros) and every
    array of ``streamed`` at ``[row, view]``.

    paths: one image path per item. rows: cache row per item (-1 = disk image), or None for all disk images.
    image_rows: the cache row whose pixels each item shows (default: its own row; the shuffled-target control
    of `cskd align` shows another row's image against this row's targets). boxes: the cache's (N, V, 5) views;
    embed: its (N, V, D) embeddings, standardised per dimension with ``embed_stats`` = (mean, std) when given.
    digests: the cache's per-row sha256; each linked item's file is checked against its row's once per process.
    """

    def __init__(self, paths: Sequence[str], input_cfg: dict, *, rows: np.ndarray | None = None,
                 image_rows: np.ndarray | None = None, boxes: np.ndarray | None = None,
                 embed: np.ndarray | None = None, embed_stats: tuple[np.ndarray, np.ndarray] | None = None,
                 streamed=None, targets: dict[str, np.ndarray] | None = None,
                 teacher: dict[str, np.ndarray] | None = None, view: str | int = "random", augment: bool = False,
                 jitter: bool = False, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 digests: Sequence[str] | None = None, pair: bool = False, store=None, sizes: np.ndarray | None = None,
                 draft: bool = True):
        self.paths = list(paths)
        self.n = len(self.paths)
        self.rows = np.full(self.n, -1, np.int64) if rows is None else np.asarray(rows, np.int64)
        self.image_rows = self.rows if image_rows is None else np.asarray(image_rows, np.int64)
        if len(self.rows) != self.n or len(self.image_rows) != self.n:
            raise ValueError(f"{len(self.rows)} cache rows for {self.n} images")
        if (self.rows >= 0).any() and boxes is None:
            raise ValueError("items linked to cache rows need the cache's boxes")
        self.boxes, self.embed, self.streamed = boxes, embed, streamed
        self.embed_stats = None if embed_stats is None else tuple(torch.from_numpy(np.asarray(a, np.float32))
                                                                  for a in embed_stats)
        self.row_images = RowImages(digests, max_pixels) if digests is not None else None
        self.n_views = 1 if boxes is None else int(boxes.shape[1])
        self.targets = targets or {}
        self.teacher = teacher or {}
        if (self.teacher or streamed is not None) and (self.rows < 0).any():
            raise ValueError("teacher and streamed targets exist only for cached views; every item needs a cache row")
        self.cfg, self.view, self.augment, self.jitter, self.seed = input_cfg, view, augment, jitter, seed
        self.pair = pair  # a second, independent jitter of each cached view as ``image2`` (consistency)
        self.max_pixels = max_pixels
        # A view store (`cache.view_store.ViewStore`: ``image(row, view)`` -> that view's box as stored) serves
        # the pixels of every cached view; ``sizes`` (the cache's (N, 2) image sizes) keep the jitter boxes those
        # of the original path. Without one, originals are decoded, in JPEG draft mode when ``draft``.
        if store is not None and sizes is None:
            raise ValueError("a view store needs the cache's image sizes")
        self.store, self.sizes, self.draft = store, sizes, draft

    def __len__(self) -> int:
        return self.n

    def view_of(self, row: int, cycle: int) -> int:
        if isinstance(self.view, int):
            return self.view
        if self.n_views == 1:
            return 0
        return mix_seed("view", self.seed, cycle, row) % self.n_views

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([int(index)])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        items = [self._item(int(i)) for i in indices]
        if self.streamed is not None and items:
            rows = np.array([it["row"] for it in items], np.int64)
            views = np.array([it["view"] for it in items], np.int64)
            for name, arrays in self.streamed.read(rows, views).items():
                for it, a in zip(items, arrays):
                    it[name] = torch.from_numpy(np.asarray(a, np.float32))
        return items

    def _need(self, box) -> Callable[[int, int], tuple[float, float]]:
        """For draft decoding: the decoded size at which ``box`` (and any jitter inside it) still has one source
        pixel per input pixel."""
        return draft_target(self.cfg, [box], _JITTER_SIDE if (self.jitter or self.pair or self.augment) else 1.0)

    def _load(self, i: int, src: int, box=None):
        """The image to cut from, the normalised region of the whole image it holds, and the whole image's size."""
        if src >= 0 and self.store is not None and box is not None:
            return self.store.image(src, box[1]), box[0][:4], tuple(int(v) for v in self.sizes[src])
        path = self.paths[i]
        draft = None
        if self.draft:
            draft = self._need(box[0]) if box is not None else self._need_eval
        try:
            if src >= 0 and self.row_images is not None:
                img = self.row_images.load(path, src, draft=draft)
            else:
                img = load_rgb(path, self.max_pixels, draft=draft)
        except (BadImage, OSError) as e:
            raise ImageUnreadable(f"{path}: cannot read this image ({e}); was it replaced or removed since the "
                                  "labels / cache were made?") from None
        return img, _WHOLE, img.info.get("original_size", img.size)

    def _need_eval(self, W: int, H: int) -> tuple[float, float]:
        return self._need(eval_view_box(self.cfg, W, H))(W, H)

    def _render(self, img, frame, box) -> torch.Tensor:
        if frame is not _WHOLE:  # box is of the whole image; the store holds only ``frame`` of it
            box = _within(box, frame)
        return render(img, box, self.cfg)

    def _item(self, index: int) -> dict:
        cycle, i = divmod(index, self.n)
        row, src = int(self.rows[i]), int(self.image_rows[i])
        it: dict = {"index": i, "row": row, "view": -1}
        if row >= 0:
            v = self.view_of(row, cycle)
            box = self.boxes[src, v]
            img, frame, (W, H) = self._load(i, src, (box, v))
            it["view"] = v
            if self.pair:
                second = augment_box(box, W, H, np.random.default_rng(mix_seed("jitter2", self.seed, cycle, i)))
                it["image2"] = self._render(img, frame, second)
            if self.jitter:
                box = augment_box(box, W, H, np.random.default_rng(mix_seed("jitter", self.seed, cycle, i)))
        else:
            img, frame, (W, H) = self._load(i, src)
            box = eval_view_box(self.cfg, W, H)
            if self.augment:
                box = augment_box(box, W, H, np.random.default_rng(mix_seed("aug", self.seed, cycle, i)))
        it["image"] = self._render(img, frame, box)
        for name, arr in self.targets.items():
            it[name] = torch.as_tensor(np.asarray(arr[i], np.float32))
        for name, arr in self.teacher.items():
            it[name] = torch.as_tensor(np.asarray(arr[row, it["view"]], np.float32))
        if self.embed is not None:
            it["has_embed"] = row >= 0
            it["embed"] = (torch.from_numpy(self.embed[row, it["view"]].astype(np.float32)) if row >= 0
                           else torch.zeros(self.embed.shape[-1]))
            if self.embed_stats is not None and row >= 0:
                it["embed"] = (it["embed"] - self.embed_stats[0]) / self.embed_stats[1]
        return it


_WHOLE = (0.0, 0.0, 1.0, 1.0)
_JITTER_SIDE = math.sqrt(AUG_SCALE[0])  # the smallest side fraction of a box that a jitter keeps


def _within(box, frame) -> np.ndarray:
    """``box`` (normalised to the whole image, + flip) in the coordinates of ``frame``, a region of that image."""
    fx0, fy0, fx1, fy1 = (float(v) for v in frame[:4])
    fw, fh = fx1 - fx0, fy1 - fy0
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    out = [(x0 - fx0) / fw, (y0 - fy0) / fh, (x1 - fx0) / fw, (y1 - fy0) / fh]
    return np.array([*np.clip(out, 0.0, 1.0), float(box[4])], np.float32)


def collate(items: list[dict]) -> dict:
    """Stack tensors, make tensors of numbers and flags, keep strings as lists."""
    out = {}
    for name, value in items[0].items():
        if isinstance(value, torch.Tensor):
            out[name] = torch.stack([it[name] for it in items])
        elif isinstance(value, str):
            out[name] = [it[name] for it in items]
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
            raise DataError(f"{n} items cannot be split over {world} processes")
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
