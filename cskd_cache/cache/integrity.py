"""Checks a cache passes every time it is opened, and the one-time full check, remembered per shard.

Fast path (every open, no shard bytes read beyond what the reader loads anyway): each listed shard has the size
the manifest records, its sidecar agrees with the manifest (sha256, bytes, and the cache fingerprint it was
written under), and the identity stored in the shard file itself (`extract.shard_attrs`: fingerprint, inputs
digest, shard index) is this cache's. That catches a truncated shard, a shard copied in from another cache,
and a manifest edited to point elsewhere.

Full check (by default the first time a shard is opened for training): the shard's sha256 against the manifest,
which catches flipped bytes and scrambled arrays. A shard that passed is remembered by (size, mtime, inode,
sha256) in ``CACHE/.verified.json``, or, when the cache directory is read-only, in
``$XDG_CACHE_HOME/cskd/verified/<hash of the cache path>.json``; later opens skip it until the file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .manifest import CacheError, file_sha256, sidecar_name, write_json

VERIFIED_NAME = ".verified.json"


class CorruptCache(CacheError):
    """A shard does not match the manifest; the message names the shard and `cskd cache verify`."""


def _fix(cache_dir: Path) -> str:
    return f"run `cskd cache verify {cache_dir}` for the full list, then re-extract the cache (or restore the shard)"


def check_shard_size(cache_dir: Path, entry: dict) -> None:
    p = cache_dir / entry["file"]
    size = p.stat().st_size
    if size != entry["bytes"]:
        raise CorruptCache(f"{p}: {size:,} bytes, the manifest says {entry['bytes']:,} (changed or truncated); "
                           f"{_fix(cache_dir)}")


def check_shard_fast(cache_dir: Path, manifest: dict, entry: dict, attrs) -> None:
    """The every-open checks of one shard beyond its size (`check_shard_size`, done before the file is opened);
    ``attrs`` is the open HDF5 file's attribute mapping."""
    p = cache_dir / entry["file"]
    side = cache_dir / sidecar_name(int(entry["index"]))
    if side.is_file():
        try:
            rec = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            rec = None
        if not isinstance(rec, dict) or rec.get("sha256") != entry["sha256"] or rec.get("bytes") != entry["bytes"] \
                or rec.get("fingerprint", manifest.get("fingerprint")) != manifest.get("fingerprint"):
            raise CorruptCache(f"{side}: sidecar does not agree with the manifest about {entry['file']}; "
                               f"{_fix(cache_dir)}")
    want = {"cskd_fingerprint": manifest.get("fingerprint"),
            "cskd_inputs_sha256": manifest.get("inputs", {}).get("inputs_sha256"),
            "cskd_shard_index": int(entry["index"])}
    for key, value in want.items():
        if key in attrs:  # caches written before these attributes existed rely on the full check alone
            got = attrs[key]
            got = got.decode() if isinstance(got, bytes) else (int(got) if key == "cskd_shard_index" else str(got))
            if got != value:
                raise CorruptCache(f"{p}: this shard belongs to another cache ({key} differs); {_fix(cache_dir)}")


def _memo_path(cache_dir: Path) -> Path:
    if os.access(cache_dir, os.W_OK):
        return cache_dir / VERIFIED_NAME
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cskd" / "verified"
    return base / (hashlib.sha256(str(cache_dir.resolve()).encode()).hexdigest()[:24] + ".json")


def _stamp(p: Path, sha256: str) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": sha256}


def ensure_verified(cache_dir: str | os.PathLike, manifest: dict) -> dict:
    """Full-check every listed shard (their sizes already checked) not already verified in its current form; returns
    ``{"checked": n, "skipped": n, "bytes": n, "memo": path}``. Raises CorruptCache on the first mismatch."""
    cache_dir = Path(cache_dir)
    memo_path = _memo_path(cache_dir)
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, json.JSONDecodeError):
        memo = {}
    checked = skipped = nbytes = 0
    for entry in manifest.get("shards", []):
        p = cache_dir / entry["file"]
        stamp = _stamp(p, entry["sha256"])
        if memo.get(entry["file"]) == stamp:
            skipped += 1
            continue
        if file_sha256(p) != entry["sha256"]:
            memo.pop(entry["file"], None)
            _save(memo_path, memo)
            raise CorruptCache(f"{p}: sha256 does not match the manifest (flipped bytes or a replaced file); "
                               f"{_fix(cache_dir)}")
        checked += 1
        nbytes += stamp["size"]
        memo[entry["file"]] = stamp
    if checked:
        _save(memo_path, memo)
    return {"checked": checked, "skipped": skipped, "bytes": nbytes, "memo": str(memo_path)}


def _save(memo_path: Path, memo: dict) -> None:
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(memo_path, memo)
    except OSError:
        pass  # a memo that cannot be written only means the next open checks again
