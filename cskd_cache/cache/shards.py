"""Write-once HDF5 shards: written under a temporary name, renamed only when complete.

A crash leaves at most a `*.h5.tmp` file, which the next run deletes; a shard file that exists under its
final name is whole, and its sidecar records its row count and checksum.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from .manifest import CacheError, file_sha256, shard_name, sidecar_name, write_json

STR_DTYPE = h5py.string_dtype("utf-8")
# "bytes": one variable-length uint8 array per element (a view store's JPEG files).
BYTES_DTYPE = h5py.vlen_dtype(np.uint8)
PER_ROW_TEXT = ("key", "source", "digest")


def chunk_shape(row_shape: tuple[int, ...], itemsize: int, max_rows: int = 4096) -> tuple[int, ...]:
    """One image-view per chunk for token arrays (the h5py guidance: 10 KiB-1 MiB, one image's tokens per
    chunk), so that reading one sampled view of one image touches exactly one chunk; many rows per chunk for
    small per-row arrays."""
    if len(row_shape) >= 3:  # (V, T, C): split the view axis
        return (1, 1, *row_shape[1:])
    per_row = max(1, int(np.prod(row_shape)) * itemsize)
    rows = max(1, min(max_rows, (256 << 10) // per_row))
    return (rows, *row_shape)


class ShardWriter:
    def __init__(self, cache_dir: str | os.PathLike, index: int, arrays: dict[str, dict],
                 compression: str | None = None, planned_rows: int = 4096):
        self.dir = Path(cache_dir)
        self.index = index
        self.final = self.dir / shard_name(index)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.compression = compression
        if self.tmp.exists():
            self.tmp.unlink()
        # track_times=False: identical inputs give identical files, which keeps checksums meaningful.
        self.f = h5py.File(self.tmp, "w", track_order=True)
        self.rows = 0
        self.planned_rows = max(1, planned_rows)  # a small shard should not allocate 256 KiB chunks
        # Every dataset exists from the start, so a shard whose images were all skipped is still well-formed.
        for name, spec in arrays.items():
            self._create(name, tuple(spec["shape"][1:]), spec["dtype"])

    def _create(self, name: str, row_shape: tuple[int, ...], dtype: str) -> None:
        if dtype == "str":
            self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=STR_DTYPE,
                                  chunks=(min(1024, self.planned_rows),),
                                  track_times=False)
            return
        if dtype == "bytes":
            self.f.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=BYTES_DTYPE,
                                  chunks=(min(256, self.planned_rows), *row_shape), track_times=False)
            return
        dt = np.dtype(dtype)
        comp = self.compression if len(row_shape) >= 3 else None
        self.f.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dt,
                              chunks=chunk_shape(row_shape, dt.itemsize, self.planned_rows), compression=comp, track_times=False)

    def append(self, batch: dict[str, np.ndarray | list]) -> None:
        n = len(batch["key"])
        if n == 0:
            return
        try:
            for name, value in batch.items():
                arr = value if name in PER_ROW_TEXT else np.asarray(value)
                ds = self.f[name]
                ds.resize(self.rows + n, axis=0)
                ds[self.rows:self.rows + n] = arr
        except (OSError, RuntimeError) as e:
            self.abort()
            raise_if_disk_full(self.dir, e, self.index)
            raise
        self.rows += n

    def finish(self, skipped: list[dict], attrs: dict | None = None, identity: dict | None = None) -> dict:
        """Close, checksum, rename into place, then write the sidecar that makes the shard count as done.
        ``attrs`` go into the HDF5 file (the reader checks them at open), ``identity`` into the sidecar."""
        try:
            for k, v in (attrs or {}).items():
                self.f.attrs[k] = v
            self.f.flush()
            self.f.close()
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except (OSError, RuntimeError) as e:
            self.abort()
            raise_if_disk_full(self.dir, e, self.index)
            raise
        digest = file_sha256(self.tmp)
        os.replace(self.tmp, self.final)
        record = {
            "index": self.index,
            "file": self.final.name,
            "rows": self.rows,
            "bytes": self.final.stat().st_size,
            "sha256": digest,
            "skipped": skipped,
            **(identity or {}),
        }
        write_json(self.dir / sidecar_name(self.index), record)
        return record

    def abort(self) -> None:
        # On a full disk HDF5 still holds unwritten metadata; closing would fail again, and the half-closed file
        # crashes the interpreter when it is collected. Truncating the temporary first gives its space back, so
        # the close can write what it must into a file that is deleted right after.
        try:
            if self.tmp.exists():
                os.truncate(self.tmp, 0)
        except OSError:
            pass
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - a file that failed mid-write may not close cleanly; it is deleted next
            pass
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


class DiskFull(CacheError):
    """The cache's file system ran out of space; complete shards stay in place and a rerun resumes."""


def estimate_shard_bytes(arrays: dict[str, dict], rows: int) -> int:
    """Bytes a shard of ``rows`` rows needs: the fixed-size arrays exactly, ~200 bytes per row of strings, and
    HDF5's chunk, heap and B-tree overhead (10% and 64 KiB are allowed)."""
    per_row = 0
    for spec in arrays.values():
        if spec["dtype"] == "str":
            per_row += 200
        elif spec["dtype"] == "bytes":
            per_row += int(spec.get("bytes_per_row", 64 << 10))
        else:
            per_row += int(np.prod([d for d in spec["shape"][1:]])) * np.dtype(spec["dtype"]).itemsize
    return int(per_row * rows * 1.10) + (64 << 10)


def check_free_space(directory: str | os.PathLike, need: int, index: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < need:
        raise DiskFull(f"{directory}: {free / 1e6:,.1f} MB free, shard {index} needs about {need / 1e6:,.1f} MB; "
                       "free space (or move the cache) and re-run the same command: complete shards are kept")


def raise_if_disk_full(directory: Path, exc: BaseException, index: int) -> None:
    """Turn an ENOSPC (or HDF5's opaque failure on a full disk) into DiskFull naming what the shard needs."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        try:
            full = shutil.disk_usage(directory).free < (1 << 20)
        except OSError:
            full = False
    if full:
        raise DiskFull(f"{directory}: disk full while writing shard {index} (errno ENOSPC); free space (or move the "
                       "cache) and re-run the same command: complete shards are kept, this one is redone") from None
