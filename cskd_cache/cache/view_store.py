"""The view-pixel store: each cached view's pixels, JPEG-coded at a fixed short side, beside a feature cache.

Training reads a cached view by decoding the original photo at full size and cutting the view's box from it;
on AVA-sized JPEGs that decode, not the student, bounds a GPU run. A store keeps, per (row, view), the view's box
already cut out and resized so that its short side is ``size`` pixels (never enlarged: a box smaller than ``size``
is kept at its own resolution), unflipped, JPEG-coded at ``quality``. A student rebuilds any crop inside the box
(the cached view itself, or a jitter of it) from those few kilobytes (`data.datasets.CachedViews`).

Layout (docs/cache-format.md, "View-pixel stores"): ``CACHE/view-store-SIZE/`` holds ``manifest.json`` and one
HDF5 shard per feature-cache shard, row-aligned with it, each with a sidecar; every store shard records the
sha256 of the feature shard it was cut for, so a store is never paired with other rows. Opening a store runs the
feature cache's own checks on it (`integrity`: sizes, sidecars, identity attributes, the one-time sha256).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..data.transforms import AUG_SCALE
from .integrity import CorruptCache, check_shard_fast, check_shard_size, ensure_verified
from .manifest import MANIFEST_NAME, CacheError, canonical_json, read_json

__all__ = ["STORE_FORMAT", "STORE_VERSION", "STORE_PREFIX", "store_dir", "store_fingerprint", "list_stores",
           "ViewStore", "open_store", "find_store", "needed_size", "StoreError",
           "store_manifest"]

STORE_FORMAT = "cskd-view-store"
STORE_VERSION = 1
STORE_PREFIX = "view-store-"
_STORE_DIR = re.compile(re.escape(STORE_PREFIX) + r"(\d+)")


class StoreError(CacheError):
    """A view-pixel store that cannot be used (missing, incomplete, made for other rows); the message says the fix."""


def store_dir(cache_dir: str | os.PathLike, size: int) -> Path:
    return Path(cache_dir) / f"{STORE_PREFIX}{int(size)}"


def store_fingerprint(size: int, quality: int, feature_fingerprint: str, inputs_sha256: str) -> str:
    """What makes two stores interchangeable: the pixels' recipe and the feature cache whose rows they show."""
    payload = {"format": STORE_FORMAT, "version": STORE_VERSION, "size": int(size), "quality": int(quality),
               "filter": "lanczos", "feature_fingerprint": feature_fingerprint, "inputs_sha256": inputs_sha256}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def needed_size(input_hw, jitter: bool) -> int:
    """The store size (short side) that gives a student of ``input_hw`` at least one stored pixel per input pixel:
    the input's longer side, divided by the smallest side fraction a jitter keeps (sqrt of `AUG_SCALE`'s lower
    area bound) when the views are jittered. 224 px needs 224 (251 with jitter: a 256 store covers it)."""
    side = max(int(v) for v in input_hw)
    return math.ceil(side / math.sqrt(AUG_SCALE[0])) if jitter else side


def store_manifest(n_views: int, size: int, quality: int, feature_fingerprint: str, inputs_sha256: str,
                   rows: int = 0) -> dict:
    """A store's manifest before any shard is listed (docs/cache-format.md, "View-pixel stores")."""
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "size": int(size), "quality": int(quality),
            "filter": "lanczos",
            "feature_cache": {"fingerprint": feature_fingerprint, "rows": rows, "views": n_views},
            "inputs": {"inputs_sha256": inputs_sha256},
            "fingerprint": store_fingerprint(size, quality, feature_fingerprint, inputs_sha256),
            "arrays": {"key": {"shape": [None], "dtype": "str"}, "source": {"shape": [None], "dtype": "str"},
                       "jpeg": {"shape": [None, n_views], "dtype": "bytes", "bytes_per_row": 40_000 * n_views},
                       "shape": {"shape": [None, n_views, 2], "dtype": "int32"}},
            "shards": [], "rows": 0, "complete": False}


def shard_attrs(manifest: dict, index: int) -> dict:
    """The identity a store shard carries (checked at every open, as a feature shard's)."""
    return {"cskd_fingerprint": manifest["fingerprint"], "cskd_inputs_sha256": manifest["inputs"]["inputs_sha256"],
            "cskd_shard_index": index}


def list_stores(cache_dir: str | os.PathLike) -> list[int]:
    """The sizes of the stores present beside a cache (complete or not), ascending."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(int(m[1]) for p in cache_dir.iterdir() if p.is_dir() and (m := _STORE_DIR.fullmatch(p.name)))


class ViewStore:
    """A complete store of one feature cache, opened for reading; `image(row, view)` is that view's box as a PIL
    image. Picklable: HDF5 handles are opened lazily per process, as `reader.StreamedArrays` does."""

    def __init__(self, cache, size: int, verify: bool = True):
        self.path = store_dir(cache.path, size)
        m = read_json(self.path / MANIFEST_NAME, StoreError,
                      f"make it with `cskd cache add-views {cache.path} --size {size}`")
        if m.get("format") != STORE_FORMAT or m.get("version") != STORE_VERSION:
            raise StoreError(f"{self.path / MANIFEST_NAME}: not a cskd view-store manifest of version {STORE_VERSION}"
                             f"; remake it with `cskd cache add-views {cache.path} --size {size}`")
        fix = f"re-run `cskd cache add-views {cache.path} --size {size}`"
        if not m.get("complete"):
            raise StoreError(f"{self.path}: the view store is incomplete; {fix} to finish it")
        feat = cache.manifest
        want = store_fingerprint(m.get("size", -1), m.get("quality", -1), feat["fingerprint"],
                                 feat["inputs"]["inputs_sha256"])
        if m.get("fingerprint") != want:
            raise StoreError(f"{self.path}: this view store was made for another cache (or edited); {fix}")
        if [s.get("feature_sha256") for s in m["shards"]] != [s["sha256"] for s in feat["shards"]]:
            raise StoreError(f"{self.path}: its shards were cut for other feature shards than {cache.path} holds now; "
                             f"{fix}")
        for entry in m["shards"]:
            if not (self.path / entry["file"]).is_file():
                raise CorruptCache(f"{self.path / entry['file']}: store shard listed in the manifest is missing; {fix}")
            check_shard_size(self.path, entry)
        self.verified = ensure_verified(self.path, m) if verify else None
        for entry in m["shards"]:
            try:
                with h5py.File(self.path / entry["file"], "r") as f:
                    check_shard_fast(self.path, m, entry, f.attrs)
            except OSError as e:
                raise CorruptCache(f"{self.path / entry['file']}: not a readable HDF5 shard ({e}); {fix}") from e
        self.manifest, self.size, self.quality = m, int(m["size"]), int(m["quality"])
        self.shard_files = [str(self.path / s["file"]) for s in m["shards"]]
        self.offsets = cache.offsets
        self.bytes = sum(s["bytes"] for s in m["shards"])
        self._datasets: dict[int, h5py.Dataset] = {}
        self._pid = None

    def describe(self) -> dict:
        return {"path": str(self.path), "size": self.size, "quality": self.quality,
                "fingerprint": self.manifest["fingerprint"][:16], "bytes": self.bytes}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_datasets"], state["_pid"] = {}, None
        return state

    def _jpeg_dataset(self, s: int) -> h5py.Dataset:
        if self._pid != os.getpid():  # a DataLoader worker: never reuse a handle opened before the fork
            self._datasets, self._pid = {}, os.getpid()
        if s not in self._datasets:  # kept open: looking the dataset up by name costs as much as the read
            self._datasets[s] = h5py.File(self.shard_files[s], "r")["jpeg"]
        return self._datasets[s]

    def jpeg(self, row: int, view: int) -> bytes:
        s = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self._jpeg_dataset(s)[row - int(self.offsets[s]), view].tobytes()

    def image(self, row: int, view: int) -> Image.Image:
        im = Image.open(io.BytesIO(self.jpeg(row, view)))
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")  # the store writes RGB: no copy on the hot path


def open_store(cache, size: int, verify: bool = True) -> ViewStore:
    return ViewStore(cache, size, verify=verify)


def find_store(cache, need: int, verify: bool = True) -> tuple[ViewStore | None, str]:
    """The smallest complete store of ``cache`` whose size is at least ``need``, and why none when there is none."""
    sizes = list_stores(cache.path)
    covering = [s for s in sizes if s >= need]
    if not sizes:
        return None, "the cache has no view store"
    if not covering:
        return None, (f"its view stores ({', '.join(map(str, sizes))} px) are smaller than the {need} px this student "
                      "needs")
    reasons = []
    for size in covering:
        try:
            return open_store(cache, size, verify=verify), ""
        except StoreError as e:  # incomplete or stale: say so, and try the next size
            reasons.append(str(e))
    return None, "; ".join(reasons)


def verify_store(cache_dir: str | os.PathLike, size: int, feature_manifest: dict, checksums: bool = True) -> list[str]:
    """`cskd cache verify`'s faults for one store, one line each naming the file (empty: the store is sound)."""
    from .manifest import file_sha256

    path = store_dir(cache_dir, size)
    try:
        m = read_json(path / MANIFEST_NAME, StoreError, f"remake it with `cskd cache add-views {cache_dir} --size {size}`")
    except StoreError as e:
        return [str(e)]
    faults = []
    if m.get("format") != STORE_FORMAT:
        return [f"{path / MANIFEST_NAME}: not a cskd view-store manifest"]
    if not m.get("complete"):
        faults.append(f"{path}: view store is incomplete; re-run `cskd cache add-views {cache_dir} --size {size}`")
    want = store_fingerprint(m.get("size", -1), m.get("quality", -1), feature_manifest.get("fingerprint", ""),
                             feature_manifest.get("inputs", {}).get("inputs_sha256", ""))
    if m.get("fingerprint") != want:
        faults.append(f"{path / MANIFEST_NAME}: fingerprint is not that of this cache's store (edited, or made for "
                      "another cache)")
    feat = {s["index"]: s for s in feature_manifest.get("shards", [])}
    for s in m.get("shards", []):
        p = path / s["file"]
        fs = feat.get(s["index"])
        if fs is None or fs["sha256"] != s.get("feature_sha256"):
            faults.append(f"{p}: cut for another feature shard than {Path(cache_dir) / fs['file'] if fs else 'any'}")
            continue
        if not p.is_file():
            faults.append(f"{p}: missing store shard")
            continue
        if p.stat().st_size != s["bytes"]:
            faults.append(f"{p}: size {p.stat().st_size} bytes, the store manifest says {s['bytes']}")
            continue
        if checksums and file_sha256(p) != s["sha256"]:
            faults.append(f"{p}: sha256 mismatch (file changed or corrupt); remake the store")
            continue
        try:
            with h5py.File(p, "r") as f, h5py.File(Path(cache_dir) / fs["file"], "r") as g:
                if f["jpeg"].shape[0] != fs["rows"] or list(f["key"][:]) != list(g["key"][:]):
                    faults.append(f"{p}: its rows are not those of {Path(cache_dir) / fs['file']}")
        except (OSError, KeyError) as e:
            faults.append(f"{p}: unreadable HDF5 ({e})")
    return faults
