"""Reading a cache: `open_cache(path)` and the torch Dataset that training stages sample from.

Small per-row arrays (keys, boxes, embeddings) are loaded into RAM once; token arrays stay on disk and are
streamed. HDF5 handles are opened lazily in whichever process first reads (h5py objects do not survive a
fork), and a batch's reads are sorted per shard because h5py fancy indexing needs increasing indices.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .integrity import CorruptCache, check_shard_fast, check_shard_size, ensure_verified
from .manifest import CacheError, read_manifest


@dataclass(frozen=True)
class CacheRow:
    index: int
    source: str
    key: str
    path: str


class FeatureCache:
    """A complete cache on disk. Global row i is row (i - offset[s]) of shard s, shards in index order.

    Opening checks every shard's size, sidecar and stored identity (`integrity`, fast); with ``verify`` (the
    default) it also checks the sha256 of each shard not verified before, once, remembered beside the cache."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise CacheError(f"{self.path}: cache is incomplete ({self.manifest.get('rows')} rows so far); "
                             "re-run the same `cskd extract` command to finish it")
        self.shards = [self.path / s["file"] for s in self.manifest["shards"]]
        for p, entry in zip(self.shards, self.manifest["shards"]):
            if not p.is_file():
                raise CacheError(f"{p}: shard listed in the manifest is missing; run `cskd cache verify {self.path}`")
            check_shard_size(self.path, entry)  # before any byte is hashed or read
        self.verified = ensure_verified(self.path, self.manifest) if verify else None
        counts = [s["rows"] for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.arrays = self.manifest["arrays"]
        self.n_views = int(self.arrays["views"]["shape"][1])
        self.roots = {s["name"]: s["root"] for s in self.manifest["sources"]}
        self.keys, self.sources, self.digests = [], [], []
        boxes, embeds, sizes = [], [], []
        for p, entry in zip(self.shards, self.manifest["shards"]):
            try:
                f = h5py.File(p, "r")
            except OSError as e:
                raise CorruptCache(f"{p}: not a readable HDF5 shard ({e}); run `cskd cache verify {self.path}`") from e
            with f:
                check_shard_fast(self.path, self.manifest, entry, f.attrs)
                self.keys += [k.decode() if isinstance(k, bytes) else k for k in f["key"][:]]
                self.sources += [k.decode() if isinstance(k, bytes) else k for k in f["source"][:]]
                self.digests += [k.decode() if isinstance(k, bytes) else k for k in f["digest"][:]]
                boxes.append(f["views"][:])
                embeds.append(f["embed"][:])
                sizes.append(f["size"][:])
        v, d = self.n_views, self.arrays["embed"]["shape"][2]
        self.boxes = np.concatenate(boxes) if boxes else np.zeros((0, v, 5), np.float32)
        self.embed = np.concatenate(embeds) if embeds else np.zeros((0, v, d), np.float16)
        self.sizes = np.concatenate(sizes) if sizes else np.zeros((0, 2), np.int32)
        self._index = {(s, k): i for i, (s, k) in enumerate(zip(self.sources, self.keys))}

    def __len__(self) -> int:
        return self.n

    def read_all(self, name: str) -> np.ndarray:
        """Every row of a small per-row array (e.g. ``attn_distance``), read now from every shard."""
        if name not in self.arrays:
            raise CacheError(f"{self.path}: the cache has no {name!r} array (it has {', '.join(sorted(self.arrays))})")
        parts = []
        for p in self.shards:
            with h5py.File(p, "r") as f:
                parts.append(f[name][:])
        return np.concatenate(parts)

    @functools.cached_property
    def rows_sha256(self) -> str:
        """sha256 over the ordered ``source \0 key \n`` list: which images the rows are, in order. Computed once
        per opened cache (the fingerprint and the predictions directory both need it)."""
        h = hashlib.sha256()
        for s, k in zip(self.sources, self.keys):
            h.update(f"{s}\0{k}\n".encode())
        return h.hexdigest()

    @property
    def has_tokens(self) -> bool:
        return "tokens" in self.arrays

    @property
    def embed_dim(self) -> int:
        return int(self.arrays["embed"]["shape"][2])

    @property
    def token_shape(self) -> tuple[int, int] | None:
        """(T, C) of the cached token grid, or None when the cache holds no tokens."""
        return tuple(self.arrays["tokens"]["shape"][2:]) if self.has_tokens else None

    @property
    def token_grid(self) -> tuple[int, int]:
        return tuple(self.manifest["storage"]["token_grid"])

    def row(self, i: int, image_root: dict[str, str] | None = None) -> CacheRow:
        root = self.roots[self.sources[i]]
        for old, new in (image_root or {}).items():
            if root == old or root.startswith(old.rstrip("/") + "/"):
                root = new + root[len(old.rstrip("/")):]
        key = self.keys[i]
        path = key if os.path.isabs(key) else os.path.join(root, key)
        return CacheRow(i, self.sources[i], key, path)

    def find(self, source: str, key: str) -> int:
        return self._index[(source, key)]

    def dataset(self, view: str | int = "random", tokens: bool = True, extra: tuple[str, ...] = (),
                rows: np.ndarray | None = None, seed: int = 0) -> CachedFeatures:
        return CachedFeatures(self, view=view, tokens=tokens, extra=extra, rows=rows, seed=seed)

    def streamed(self, names: tuple[str, ...] = ("tokens",)) -> StreamedArrays:
        """A picklable reader of per-row arrays kept on disk (`StreamedArrays`), for `data.datasets.CachedViews`."""
        return StreamedArrays(self, names)


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, view: int) -> np.ndarray:
    """``ds[rows, view]`` for increasing ``rows``, one direct read per row.

    A row-view is one chunk, so each read is one chunk; h5py's fancy indexing over the same rows builds a
    point selection that costs ~20x more (4.5 ms vs 0.2 ms per 75 KB ViT-B-32 row), which made token reads
    the largest part of an align batch's data time."""
    out = np.empty((len(rows), *ds.shape[2:]), dtype=ds.dtype)
    for j, r in enumerate(rows):
        ds.read_direct(out, np.s_[int(r), view], np.s_[j])
    return out


def open_cache(path: str | os.PathLike, allow_incomplete: bool = False, verify: bool = True) -> FeatureCache:
    """Open a cache for reading; ``verify=False`` skips the one-time sha256 check (the fast checks still run)."""
    return FeatureCache(path, allow_incomplete=allow_incomplete, verify=verify)


class StreamedArrays:
    """Per-row arrays too large for RAM (``tokens``, extra layers), read at ``[row, view]`` straight from the shards.

    HDF5 handles are opened lazily in whichever process first reads (h5py objects do not survive a fork, so a
    DataLoader worker opens its own), and one `read` groups a batch's rows per shard and view and issues the
    reads in increasing row order, each row once.
    """

    def __init__(self, cache: FeatureCache, names: tuple[str, ...]):
        for name in names:
            if name not in cache.arrays and name != "tokens":
                raise CacheError(f"{cache.path}: no array {name!r} in this cache (has {', '.join(cache.arrays)})")
        if "tokens" in names and not cache.has_tokens:
            raise CacheError(f"{cache.path}: this cache holds no tokens; re-extract with --tokens or read "
                             "embeddings only (tokens=False)")
        self.names = tuple(names)
        self.shard_files = [str(p) for p in cache.shards]
        self.offsets = cache.offsets
        self._files: dict[int, h5py.File] = {}
        self._pid = None

    def _file(self, s: int) -> h5py.File:
        if self._pid != os.getpid():  # new worker process: never reuse a handle opened before fork
            self._files, self._pid = {}, os.getpid()
        if s not in self._files:
            self._files[s] = h5py.File(self.shard_files[s], "r")
        return self._files[s]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def read(self, rows: np.ndarray, views: np.ndarray) -> dict[str, list[np.ndarray]]:
        """``{name: [array at (rows[j], views[j]) for each j]}``."""
        rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
        out = {name: [None] * len(rows) for name in self.names}
        if not self.names:
            return out
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard):
            f = self._file(int(s))
            for v in np.unique(views[shard == s]):
                sel = np.nonzero((shard == s) & (views == v))[0]
                # np.unique sorts (reads walk the file forwards) and drops repeats (a batch may repeat a row),
                # so each chunk is read once per batch.
                uniq, inv = np.unique(rows[sel] - self.offsets[s], return_inverse=True)
                for name in self.names:
                    block = _read_rows(f[name], uniq, int(v))
                    for j, pos in enumerate(sel):
                        out[name][pos] = block[inv[j]]
        return out


class CachedFeatures(Dataset):
    """Yields dicts: key, source, row, view (index), box (5,), embed (D,), tokens (T, C) and any `extra` arrays
    (e.g. "prefix", "layer_11"): the cached targets alone, without pixels (`data.datasets.CachedViews` adds them).

    `view="random"` draws one of the V cached views per item and epoch: call `set_epoch(epoch)` before each epoch,
    as with DistributedSampler, or every epoch sees the same views; an int fixes the view; anything else is refused.
    Implements `__getitems__`, which DataLoader calls with a whole batch of indices, so streamed reads are
    grouped per shard and view and issued in increasing row order (`StreamedArrays`).
    """

    def __init__(self, cache: FeatureCache, view: str | int = "random", tokens: bool = True,
                 extra: tuple[str, ...] = (), rows: np.ndarray | None = None, seed: int = 0):
        if isinstance(view, bool) or not (view == "random" or isinstance(view, (int, np.integer))):
            raise CacheError(f"view={view!r}: use \"random\" (one of the cached views per item and epoch; call "
                             "set_epoch(epoch) each epoch) or a view index 0..V-1")
        if isinstance(view, (int, np.integer)) and not 0 <= view < cache.n_views:
            raise CacheError(f"{cache.path}: view {view} out of range, the cache has {cache.n_views} views")
        self.path = str(cache.path)
        self.stream = StreamedArrays(cache, (("tokens",) if tokens else ()) + tuple(extra))
        self.keys, self.sources = cache.keys, cache.sources
        self.boxes, self.embed = cache.boxes, cache.embed
        self.n_views = cache.n_views
        self.view, self.seed, self.epoch = view, seed, 0
        self.rows = np.arange(cache.n) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_of(self, row: int) -> int:
        if isinstance(self.view, int):
            return self.view
        if self.n_views == 1:
            return 0
        # A hash of (seed, epoch, row): the same in every worker and rank, no shared RNG state needed.
        h = (row * 0x9E3779B97F4A7C15 + self.epoch * 0xBF58476D1CE4E5B9 + self.seed * 0x94D049BB133111EB)
        return int((h & 0xFFFFFFFFFFFF) % self.n_views)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        views = np.array([self.view_of(int(r)) for r in rows], dtype=np.int64)
        streamed = self.stream.read(rows, views)
        out = []
        for j, (r, v) in enumerate(zip(rows, views)):
            item = {"row": int(r), "key": self.keys[r], "source": self.sources[r], "view": int(v),
                    "box": torch.from_numpy(self.boxes[r, v].copy()),
                    "embed": torch.from_numpy(self.embed[r, v].astype(np.float32))}
            for name in self.stream.names:
                item[name] = torch.from_numpy(streamed[name][j].astype(np.float32))
            out.append(item)
        return out
