"""`cache verify` and `cache info`: check every shard against the manifest, summarise a cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .manifest import MANIFEST_NAME, CacheError, file_sha256, fingerprint, read_json, read_manifest
from .view_store import list_stores, store_dir, verify_store


def verify_cache(path: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Every fault found, one line each naming the file; an empty list means the cache is sound."""
    path = Path(path)
    try:
        m = read_manifest(path)
    except CacheError as e:
        return [str(e)]
    faults = []
    if m.get("fingerprint") != fingerprint(m):
        faults.append(f"{path / 'manifest.json'}: fingerprint does not match the manifest's contents (edited by hand?)")
    if not m.get("complete"):
        faults.append(f"{path}: cache is incomplete; re-run the same `cskd extract` command to finish it")
    arrays = m["arrays"]
    keys_seen: set[tuple[str, str]] = set()
    listed = {s["file"] for s in m["shards"]}
    for extra in sorted(p.name for p in path.glob("shard-*.h5")):
        if extra not in listed:
            faults.append(f"{path / extra}: shard file not listed in the manifest")
    for s in m["shards"]:
        p = path / s["file"]
        if not p.is_file():
            faults.append(f"{p}: missing shard file")
            continue
        if p.stat().st_size != s["bytes"]:
            faults.append(f"{p}: size {p.stat().st_size} bytes, manifest says {s['bytes']}")
        if checksums and file_sha256(p) != s["sha256"]:
            faults.append(f"{p}: sha256 mismatch (file changed or corrupt); re-extract this cache")
            continue
        try:
            faults += _check_shard(p, s["rows"], arrays, keys_seen)
        except (OSError, KeyError, ValueError) as e:
            faults.append(f"{p}: unreadable HDF5 ({e})")
    if m.get("complete") and sum(s["rows"] for s in m["shards"]) != m.get("rows"):
        faults.append(f"{path / 'manifest.json'}: rows {m.get('rows')} != sum of shard rows")
    for size in list_stores(path):
        faults += verify_store(path, size, m, checksums)
    return faults


def _check_shard(p: Path, rows: int, arrays: dict, keys_seen: set) -> list[str]:
    faults = []
    with h5py.File(p, "r") as f:
        for name, spec in arrays.items():
            if name not in f:
                faults.append(f"{p}: dataset {name!r} missing")
                continue
            ds = f[name]
            want = (rows, *spec["shape"][1:])
            if ds.shape != want:
                faults.append(f"{p}: {name} has shape {ds.shape}, manifest says {want}")
                continue
            if spec["dtype"] != "str" and ds.dtype != np.dtype(spec["dtype"]):
                faults.append(f"{p}: {name} has dtype {ds.dtype}, manifest says {spec['dtype']}")
                continue
            if spec["dtype"].startswith("float"):
                bad = _count_nonfinite(ds)
                if bad:
                    faults.append(f"{p}: {name} holds {bad} NaN/inf values")
        if "views" in f and len(f["views"]):
            b = f["views"][:]
            if (b[..., :4] < 0).any() or (b[..., :4] > 1).any() or (b[..., 2] <= b[..., 0]).any() \
                    or (b[..., 3] <= b[..., 1]).any():
                faults.append(f"{p}: views holds boxes outside [0,1] or empty")
        if "key" in f and "source" in f:
            for s, k in zip(f["source"].asstr()[:], f["key"].asstr()[:]):
                if (s, k) in keys_seen:
                    faults.append(f"{p}: duplicate row {s}/{k}")
                keys_seen.add((s, k))
    return faults


def _count_nonfinite(ds: h5py.Dataset, rows_per_read: int = 256) -> int:
    bad = 0
    for i in range(0, ds.shape[0], rows_per_read):
        block = ds[i:i + rows_per_read]
        bad += int(block.size - np.isfinite(block).sum())
    return bad


def cache_info(path: str | os.PathLike) -> dict:
    """A flat summary for `cskd cache info` (and anyone scripting against caches)."""
    path = Path(path)
    m = read_manifest(path)
    t = m["teacher"]
    nbytes = sum(s["bytes"] for s in m["shards"])
    info = {
        "path": str(path),
        "schema_version": m["schema_version"],
        "complete": m["complete"],
        "fingerprint": m["fingerprint"][:16],
        "teacher": t.get("spec"),
        "weights_sha256": (t.get("weights_sha256") or "-")[:16],
        "images planned": m["inputs"]["images"],
        "rows": m["rows"],
        "skipped": m["skipped"],
        "duplicates": m["duplicates"],
        "views per image": m["views"]["n_views"],
        "embed": _shape(m["arrays"]["embed"]),
        "tokens": _shape(m["arrays"]["tokens"]) if "tokens" in m["arrays"] else "-",
        "token grid": "x".join(map(str, m["storage"]["token_grid"])) + " (native "
                      + "x".join(map(str, m["storage"]["native_grid"])) + ")",
        "layers": ",".join(map(str, m["storage"]["layers"])) or "-",
        "preprocess": f"{m['preprocess'].get('size')} {m['preprocess'].get('resize_mode')} "
                      f"{m['preprocess'].get('interpolation')}",
        "shards": len(m["shards"]),
        "bytes on disk": nbytes,
        "bytes per image": round(nbytes / max(1, m["rows"])),
        "sources": ", ".join(f"{s['name']} ({s['rows']})" for s in m["sources"]),
        "view stores": ", ".join(_store_line(path, size) for size in list_stores(path)) or "-",
    }
    return info


def _store_line(path: Path, size: int) -> str:
    try:
        m = read_json(store_dir(path, size) / MANIFEST_NAME, CacheError, "")
    except CacheError:
        return f"{size} px (unreadable manifest)"
    state = "" if m.get("complete") else ", incomplete"
    return f"{size} px q{m.get('quality')} ({m.get('bytes_per_view', 0):,.0f} B/view{state})"


def _shape(spec: dict) -> str:
    return "N x " + " x ".join(str(d) for d in spec["shape"][1:]) + f" {spec['dtype']}"


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)
