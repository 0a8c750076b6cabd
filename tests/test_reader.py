"""open_cache and its Dataset: lazy per-worker HDF5 handles, sorted batched token reads, view sampling."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from _imgs import make_images
from torch.utils.data import DataLoader

from cskd_cache.cache.manifest import CacheError
from cskd_cache.cache.reader import open_cache
from cskd_cache.stages.extract import ExtractConfig, run_extract


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    make_images(d / "imgs", 13)
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(d / "cache"), images=[str(d / "imgs")],
                              views=3, shard_size=5, num_workers=0, layers=(0,)))
    return d / "cache"


def direct(cache_dir, row, view, name="tokens"):
    cache = open_cache(cache_dir)
    s = int(np.searchsorted(cache.offsets, row, side="right") - 1)
    with h5py.File(cache.shards[s], "r") as f:
        return f[name][row - cache.offsets[s], view].astype(np.float32)


def test_dataloader_with_two_workers_yields_exact_rows(cache_dir):
    cache = open_cache(cache_dir)
    ds = cache.dataset(view="random", extra=("layer_0",), seed=3)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        for j in range(len(batch["row"])):
            r, v = int(batch["row"][j]), int(batch["view"][j])
            seen.append(r)
            assert batch["key"][j] == cache.keys[r]
            np.testing.assert_array_equal(batch["tokens"][j].numpy(), direct(cache_dir, r, v))
            np.testing.assert_array_equal(batch["layer_0"][j].numpy(), direct(cache_dir, r, v, "layer_0"))
            np.testing.assert_array_equal(batch["embed"][j].numpy(), cache.embed[r, v].astype(np.float32))
            np.testing.assert_array_equal(batch["box"][j].numpy(), cache.boxes[r, v])
    assert sorted(seen) == list(range(len(cache)))


def test_random_view_changes_with_epoch_and_is_stable_within(cache_dir):
    ds = open_cache(cache_dir).dataset(view="random", tokens=False)
    e0 = [ds.view_of(r) for r in range(len(ds))]
    assert e0 == [ds.view_of(r) for r in range(len(ds))]
    ds.set_epoch(1)
    e1 = [ds.view_of(r) for r in range(len(ds))]
    assert e0 != e1 and set(e0 + e1) == {0, 1, 2}
    fixed = open_cache(cache_dir).dataset(view=2, tokens=False)
    assert {item["view"] for item in fixed.__getitems__(list(range(len(fixed))))} == {2}


def test_batched_read_handles_unsorted_and_repeated_indices(cache_dir):
    ds = open_cache(cache_dir).dataset(view=1)
    items = ds.__getitems__([12, 3, 3, 7, 0, 12])
    assert [it["row"] for it in items] == [12, 3, 3, 7, 0, 12]
    for it in items:
        np.testing.assert_array_equal(it["tokens"].numpy(), direct(cache_dir, it["row"], 1))


def test_clear_errors(cache_dir, tmp_path):
    cache = open_cache(cache_dir)
    with pytest.raises(CacheError, match="no array 'layer_5'"):
        cache.dataset(extra=("layer_5",))
    with pytest.raises(CacheError, match="view 7 out of range"):
        cache.dataset(view=7)
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache(tmp_path)
    assert cache.row(0, image_root={str(cache_dir.parent / "imgs"): "/new/place"}).path.startswith("/new/place/")
