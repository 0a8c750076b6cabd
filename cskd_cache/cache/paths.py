"""Where a cache's images are now: remapping moved source roots, resolving every row's path, checking them.

A cache records each row's source root and key (`manifest.json` ``sources``). When the images move, every stage
that decodes them (align, distill, teacher predictions, neighbours) takes ``cache_image_root`` pairs
``OLD=NEW`` and reads ``NEW/...`` for rows recorded under ``OLD/...``; `check_images` fails before any training
when files are missing or hold other content than the cache recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..data.images import file_digest, image_changed
from ..errors import ConfigError
from .manifest import CacheError
from .reader import FeatureCache

__all__ = ["ImagesMissing", "parse_image_root", "resolve_paths", "check_images"]


class ImagesMissing(CacheError):
    """Cache rows whose image file is not where the cache says; the message lists them and the fix."""


def parse_image_root(pairs: Sequence[str] | dict | None) -> dict[str, str]:
    """["OLD=NEW", ...] -> {OLD: NEW}; OLD is a source root (or any prefix of one) recorded in the manifest."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        return {str(k): str(v) for k, v in pairs.items()}
    out = {}
    for p in pairs:
        old, sep, new = str(p).partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--cache-image-root {p!r}: expected OLD=NEW, e.g. /data/AVA=/mnt/ssd/AVA")
        out[old] = new
    return out


def _remap(path: str, image_root: dict[str, str]) -> str:
    for old, new in image_root.items():
        o = old.rstrip("/")
        if path == o or path.startswith(o + "/"):
            return new.rstrip("/") + path[len(o):]
    return path


def resolve_paths(cache: FeatureCache, image_root: dict[str, str] | None = None) -> list[str]:
    """Every row's image path after remapping (relative keys through their source root, absolute keys as is)."""
    image_root = image_root or {}
    out = []
    for i in range(len(cache)):
        row = cache.row(i, image_root)
        out.append(_remap(row.path, image_root) if os.path.isabs(row.key) else row.path)
    return out


def check_images(cache: FeatureCache, paths: list[str], rows: Sequence[int], show: int = 5,
                 sample: int = 16) -> None:
    """Fail before training starts, not an hour in, when images have moved, or when a remapped root holds other
    images under the same names: every file must exist, and ``sample`` of them (spread over the rows) must have
    the content digest the cache stored. The loader then checks every file as it reads it (`images.load_rgb`)."""
    missing = [paths[r] for r in rows if not os.path.isfile(paths[r])]
    if not missing:
        rows = list(rows)
        for r in (rows[int(i)] for i in np.unique(np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(int))):
            got = file_digest(paths[r])
            if got != cache.digests[r]:
                raise image_changed(paths[r], r, got, cache.digests[r])
        return
    roots = "; ".join(f"{name}: {root}" for name, root in cache.roots.items())
    listed = "\n  ".join(missing[:show]) + (f"\n  ... and {len(missing) - show} more" if len(missing) > show else "")
    raise ImagesMissing(
        f"{len(missing)} of {len(rows)} images of cache {cache.path} are missing, e.g.\n  {listed}\n"
        f"The cache recorded these source roots: {roots}. If the images moved, pass --cache-image-root OLD=NEW "
        "(repeatable), e.g. --cache-image-root /old/root=/new/root")
