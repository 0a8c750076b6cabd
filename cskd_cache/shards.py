"""Write-once HDF5 shards: written under a temporary name, renamed only when complete.

A crash leaves at most a `*.h5.tmp` file, which the next run deletes; a shard file that exists under its
final name is whole, and its sidecar records its row count and checksum.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .manifest import file_sha256, shard_name, sidecar_name, write_json

STR_DTYPE = h5py.string_dtype("utf-8")
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
        dt = np.dtype(dtype)
        comp = self.compression if len(row_shape) >= 3 else None
        self.f.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dt,
                              chunks=chunk_shape(row_shape, dt.itemsize, self.planned_rows), compression=comp, track_times=False)

    def append(self, batch: dict[str, np.ndarray | list]) -> None:
        n = len(batch["key"])
        if n == 0:
            return
        for name, value in batch.items():
            arr = value if name in PER_ROW_TEXT else np.asarray(value)
            ds = self.f[name]
            ds.resize(self.rows + n, axis=0)
            ds[self.rows:self.rows + n] = arr
        self.rows += n

    def finish(self, skipped: list[dict], attrs: dict | None = None) -> dict:
        """Close, checksum, rename into place, then write the sidecar that makes the shard count as done."""
        for k, v in (attrs or {}).items():
            self.f.attrs[k] = v
        self.f.flush()
        self.f.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = file_sha256(self.tmp)
        os.replace(self.tmp, self.final)
        record = {
            "index": self.index,
            "file": self.final.name,
            "rows": self.rows,
            "bytes": self.final.stat().st_size,
            "sha256": digest,
            "skipped": skipped,
        }
        write_json(self.dir / sidecar_name(self.index), record)
        return record

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
