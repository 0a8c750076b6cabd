"""Where a training run's cached views get their pixels: a view store, or the original images (`--view-pixels`).

``auto`` (the default) takes the smallest complete view store beside the cache whose size covers the student's
input (`cache.view_store.needed_size`: the input side, over the side fraction a jitter keeps when views are
jittered) and otherwise decodes the originals, in JPEG draft mode; ``store`` demands a covering store;
``originals`` always decodes the originals (draft mode); ``exact`` decodes them at full size, as cskd 0.2 did.
The choice and its reason go to the run log and to config.yaml's ``resolved.view_pixels``.
"""

from __future__ import annotations

import math

from ..cache.view_store import StoreError, ViewStore, find_store, list_stores, needed_size

__all__ = ["resolve_view_pixels", "suggest_size", "store_may_serve"]


def suggest_size(need: int) -> int:
    """A store size to recommend for ``need`` px: rounded up to a multiple of 32 (251 -> 256)."""
    return int(math.ceil(need / 32) * 32)


def store_may_serve(cache, mode: str) -> bool:
    """Whether a view store may serve this run's cached views, so that the original images may be gone and are
    checked only once `resolve_view_pixels` has said they will be read."""
    return mode in ("auto", "store") and bool(list_stores(cache.path))


def resolve_view_pixels(cache, mode: str, input_cfg: dict, jitter: bool, verify: bool = True,
                        status=lambda m: None) -> tuple[ViewStore | None, dict]:
    """(the store to read, or None for the originals; the facts to record)."""
    size = input_cfg["size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if mode in ("originals", "exact"):
        status(f"view pixels: the original images ({'JPEG draft decoding' if mode == 'originals' else 'full decodes'}"
               f", --view-pixels {mode})")
        return None, {"source": "originals", "draft": mode == "originals", "mode": mode}
    need = needed_size(hw, jitter)
    store, why = find_store(cache, need, verify=verify)
    if store is not None:
        status(f"view pixels: view store {store.path} ({store.size} px, JPEG q{store.quality}) covers the "
               f"{need} px this student needs; the original images are not opened for cached views")
        return store, {"source": "store", "mode": mode, "need": need, **store.describe()}
    fix = f"`cskd cache add-views {cache.path} --size {suggest_size(need)}`"
    if mode == "store":
        raise StoreError(f"{cache.path}: --view-pixels store, but {why}; make one with {fix}, or use --view-pixels "
                         "auto to read the original images")
    status(f"view pixels: the original images, JPEG draft decoding ({why}; {fix} would make the loader 5-20x "
           "faster)")
    return None, {"source": "originals", "draft": True, "mode": mode, "need": need, "why": why}
