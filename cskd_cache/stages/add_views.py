"""`cskd cache add-views` (and `cskd extract --store-views`): cut every cached view's pixels into a view store.

One pass over the original images, one shard per feature-cache shard (`cache.view_store` has the format): each
image is read once, checked against the digest its row recorded (a remapped root that shows other photos is
refused), and each of its V views is cut and JPEG-coded (`data.view_cuts`, the recipe extract uses too). Resumable like extract: a shard
counts once its file and sidecar both exist and the sidecar names this store's fingerprint and the feature shard's
sha256; a rerun of the same command does only the rest, and a killed run leaves only temporaries the rerun
removes. Under torchrun rank r writes shards ``s % world == r`` and rank 0 writes the manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from .. import dist
from ..cache.lock import DirLock, remove_dead_temporaries
from ..cache.manifest import MANIFEST_NAME, read_json, shard_name, sidecar_name, write_json
from ..cache.paths import check_images, parse_image_root, resolve_paths
from ..cache.reader import open_cache
from ..cache.shards import ShardWriter
from ..cache.view_store import STORE_FORMAT, StoreError, shard_attrs, store_dir, store_manifest
from ..data.images import DEFAULT_MAX_PIXELS, RowImages
from ..data.view_cuts import cut_views, jpeg_rows

__all__ = ["AddViewsResult", "run_add_views", "check_store_options", "check_existing_store", "DEFAULT_QUALITY"]

DEFAULT_QUALITY = 90


@dataclass
class AddViewsResult:
    store: str
    size: int
    quality: int
    rows: int
    views: int
    bytes: int
    bytes_per_view: float
    seconds: float
    views_per_s: float
    resumed_shards: int


class _Cut(Dataset):
    """Row i of one shard -> its V views as JPEG bytes, and their stored (w, h)."""

    def __init__(self, paths, rows, boxes, images: RowImages, size: int, quality: int):
        self.paths, self.rows, self.boxes, self.images = paths, rows, boxes, images
        self.size, self.quality = size, quality

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        img = self.images.load(self.paths[row], row)
        return cut_views(img, self.boxes[row], self.size, self.quality)


def _store_manifest(cache, size: int, quality: int) -> dict:
    feat = cache.manifest
    return store_manifest(cache.n_views, size, quality, feat["fingerprint"], feat["inputs"]["inputs_sha256"],
                          rows=len(cache))


def _done(path: Path, cache, fp: str) -> dict[int, dict]:
    """Store shards that are whole and were cut, by this recipe, for the feature shard the cache holds now."""
    done = {}
    for i, feat in enumerate(cache.manifest["shards"]):
        side, shard = path / sidecar_name(i), path / shard_name(i)
        if side.is_file() and shard.is_file():
            try:
                rec = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("bytes") == shard.stat().st_size and rec.get("fingerprint") == fp \
                    and rec.get("feature_sha256") == feat["sha256"]:
                done[i] = rec
    return done


def _refresh(path: Path, manifest: dict, cache) -> dict:
    done = _done(path, cache, manifest["fingerprint"])
    manifest = dict(manifest)
    manifest["shards"] = [{k: rec[k] for k in ("index", "file", "rows", "bytes", "sha256", "feature_sha256")}
                          for _, rec in sorted(done.items())]
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    manifest["complete"] = len(done) == len(cache.manifest["shards"])
    total = sum(s["bytes"] for s in manifest["shards"])
    manifest["bytes_per_view"] = round(total / max(1, manifest["rows"] * cache.n_views), 1)
    write_json(path / MANIFEST_NAME, manifest)
    return manifest


def check_existing_store(path: Path, manifest: dict) -> None:
    """Refuse to write into a store of another recipe (a store of this size at another JPEG quality)."""
    mpath = path / MANIFEST_NAME
    if not mpath.exists():
        return
    old = read_json(mpath, StoreError, f"remove {path} (a view store cskd made) and run add-views again")
    if old.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: holds a manifest that is not a cskd view store's; refusing to write there")
    if old.get("quality") != manifest["quality"]:
        raise StoreError(f"{path}: this store was made at JPEG quality {old.get('quality')}; resume it with "
                         f"--quality {old.get('quality')}, or remove {path} to remake it at {manifest['quality']}")


def check_store_options(size: int, quality: int) -> None:
    if not 16 <= int(size) <= 4096:
        raise StoreError(f"view store size {size}: the short side must be 16..4096 px (256 covers 224 px students)")
    if not 1 <= int(quality) <= 100:
        raise StoreError(f"view store quality {quality}: JPEG quality is 1..100 (90 by default)")


def run_add_views(cache_path, size: int, quality: int = DEFAULT_QUALITY, cache_image_root=None, batch_size: int = 16,
                  num_workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True,
                  on_progress: Callable[[int, int], None] | None = None,
                  on_status: Callable[[str], None] | None = None) -> AddViewsResult:
    """Make (or finish) the store ``CACHE/view-store-SIZE`` from the cache's original images."""
    status = on_status or (lambda m: None)
    check_store_options(size, quality)
    t0 = time.perf_counter()
    dist.init_if_needed()
    rank, world = dist.rank(), dist.world_size()
    cache = open_cache(cache_path, verify=verify)
    path = store_dir(cache.path, size)
    manifest = _store_manifest(cache, int(size), int(quality))
    paths = resolve_paths(cache, parse_image_root(cache_image_root))
    lock = DirLock(path, "cskd cache add-views")
    if rank == 0:
        check_existing_store(path, manifest)
        path.mkdir(exist_ok=True)
        lock.acquire()
    try:
        if rank == 0:
            if remove_dead_temporaries(path, locked=True):
                status("removed the temporary files of an interrupted run")
            done = _done(path, cache, manifest["fingerprint"])
            todo_rows = [r for i, s in enumerate(cache.manifest["shards"]) if i not in done
                         for r in range(int(cache.offsets[i]), int(cache.offsets[i + 1]))]
            if todo_rows:
                check_images(cache, paths, todo_rows)
            _refresh(path, manifest, cache)
        dist.barrier()
        done = _done(path, cache, manifest["fingerprint"])
        if done:
            status(f"resuming: {len(done)} of {len(cache.manifest['shards'])} store shards already complete")
        n_views = len(cache) * cache.n_views
        count = sum(rec["rows"] for rec in done.values()) * cache.n_views
        if on_progress:
            on_progress(count, n_views)
        images = RowImages(cache.digests, max_pixels)
        for i, feat in enumerate(cache.manifest["shards"]):
            if i in done or i % world != rank:
                continue
            rows = np.arange(cache.offsets[i], cache.offsets[i + 1])
            writer = ShardWriter(path, i, manifest["arrays"], planned_rows=max(1, len(rows)))
            try:
                loader = DataLoader(_Cut(paths, rows, cache.boxes, images, int(size), int(quality)),
                                    batch_size=batch_size, num_workers=num_workers, collate_fn=list)
                start = 0
                for batch in loader:
                    sel = rows[start:start + len(batch)]
                    writer.append({"key": [cache.keys[r] for r in sel], "source": [cache.sources[r] for r in sel],
                                   "jpeg": jpeg_rows([codes for codes, _ in batch]),
                                   "shape": np.stack([s for _, s in batch])})
                    start += len(batch)
                    count += len(batch) * cache.n_views
                    if on_progress:
                        on_progress(count, n_views)
                writer.finish([], shard_attrs(manifest, i),
                              {"fingerprint": manifest["fingerprint"], "feature_sha256": feat["sha256"]})
            except BaseException:
                writer.abort()
                raise
            if world == 1:
                _refresh(path, manifest, cache)
        dist.barrier()
        if rank == 0:
            manifest = _refresh(path, manifest, cache)
        dist.barrier()
        manifest = read_json(path / MANIFEST_NAME, StoreError, "re-run the same command")
    finally:
        if rank == 0:
            lock.release()
    seconds = time.perf_counter() - t0
    total = sum(s["bytes"] for s in manifest["shards"])
    made = (len(cache) - sum(rec["rows"] for rec in done.values())) * cache.n_views
    return AddViewsResult(store=str(path), size=int(size), quality=int(quality), rows=manifest["rows"],
                          views=cache.n_views, bytes=total,
                          bytes_per_view=total / max(1, manifest["rows"] * cache.n_views), seconds=seconds,
                          views_per_s=made / seconds if seconds else 0.0, resumed_shards=len(done))
