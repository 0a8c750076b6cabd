"""The cache manifest: the contract every later stage reads (see docs/cache-format.md).

A cache is a directory holding `manifest.json` and numbered HDF5 shards. The manifest names what produced
the features (teacher, weights hash, preprocessing, view policy, token grid, layers) and condenses all of it
into a `fingerprint`: two caches whose fingerprints match hold interchangeable rows, and an extraction refuses
to add rows to a cache whose fingerprint differs from its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CacheError
from ..files import atomic_write_text, default_file_mode, file_sha256, read_json, write_json  # noqa: F401 (re-exported)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"

# Fields that decide whether two caches' rows are interchangeable. Sources, shard lists and the completion
# flag are deliberately absent: they say which rows exist, not what a row means.
FINGERPRINT_FIELDS = ("schema_version", "teacher", "preprocess", "views", "storage", "arrays")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(manifest: dict) -> str:
    """sha256 over the fields that define what a row means, in canonical JSON."""
    payload = {k: manifest.get(k) for k in FINGERPRINT_FIELDS}
    # Library versions describe provenance; a patch release of timm must not orphan a 100 GB cache.
    teacher = dict(payload.get("teacher") or {})
    teacher.pop("versions", None)
    payload["teacher"] = teacher
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def sidecar_name(index: int) -> str:
    # Written atomically right after a shard is renamed into place; a resume (or rank 0 under torchrun)
    # rebuilds the manifest from these, so no two processes ever race on manifest.json.
    return f"shard-{index:05d}.json"


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"{path}: no manifest.json here; point at a directory made by `cskd extract`")
    manifest = read_json(path, CacheError, "re-run the same `cskd extract` to rebuild it")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: cache schema version {version!r}, this cskd reads version {SCHEMA_VERSION}; "
            "use the cskd release that wrote it or re-extract"
        )
    return manifest
