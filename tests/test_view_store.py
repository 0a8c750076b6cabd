"""The view-pixel store (`cache.view_store`, `stages.add_views`), store-first loading and JPEG draft decoding.

What is asserted: a stored view shows the original's pixels within JPEG tolerance, and a training item built from
the store differs from one built from the original only by that coding (same boxes, same jitter); add-views
resumes after SIGKILL to byte-identical shards; a store is verified like the cache and refused for other rows;
align and distill train with the original images deleted; a store that does not cover the student falls back to
the originals (and ``--view-pixels store`` refuses); draft decoding reduces a large JPEG, keeps the original
size for the crop geometry, and is never used for the teacher's view 0 at extract.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _imgs import make_images, photo
from PIL import Image

from cskd_cache.cache.integrity import CorruptCache
from cskd_cache.cache.paths import ImagesMissing, resolve_paths
from cskd_cache.cache.reader import open_cache
from cskd_cache.cache.verify import verify_cache
from cskd_cache.cache.view_store import StoreError, needed_size, open_store, store_dir
from cskd_cache.data.datasets import CachedViews
from cskd_cache.data.images import load_rgb
from cskd_cache.data.view_cuts import cut_view, encode_jpeg
from cskd_cache.stages.add_views import run_add_views
from cskd_cache.stages.extract import ExtractConfig, run_extract

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent
CFG = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}


def _cache(tmp_path, n=7, views=3, shard_size=3, store=None, name="c"):
    imgs = tmp_path / "imgs"
    if not imgs.exists():
        make_images(imgs, n)
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(tmp_path / name), images=[str(imgs)],
                              views=views, num_workers=0, batch_size=4, shard_size=shard_size, store_views=store))
    return tmp_path / name


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """A rendered tensor back on the 0..255 scale."""
    return t * 0.25 * 255 + 0.5 * 255


def _shards(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*.h5"))}


def test_stored_views_are_the_original_pixels_within_jpeg_tolerance(tmp_path):
    c = _cache(tmp_path, store=40)
    cache = open_cache(c)
    store = open_store(cache, 40)
    assert store.quality == 90 and verify_cache(c) == []
    paths = resolve_paths(cache)
    for r in range(len(cache)):
        img = load_rgb(paths[r])
        for v in range(cache.n_views):
            want = cut_view(img, cache.boxes[r, v], 40)
            got = store.image(r, v)
            assert got.size == want.size and min(got.size) == min(40, min(want.size))
            # exactly the JPEG coding of the cut, and no more (the test photos are noisy: q90 costs ~9 levels)
            coded = Image.open(io.BytesIO(encode_jpeg(want, 90).tobytes())).convert("RGB")
            assert np.array_equal(np.asarray(got), np.asarray(coded))
            diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).mean()
            assert diff < 12.0, (r, v, diff)


def test_store_item_equals_original_item_up_to_the_coding(tmp_path):
    """Same boxes, same jitter, same flip: only the JPEG coding (and the store's resize) differ."""
    c = _cache(tmp_path, store=48)
    cache = open_cache(c)
    paths = resolve_paths(cache)
    rows = np.arange(len(cache))
    common = dict(rows=rows, boxes=cache.boxes, jitter=True, pair=True, seed=3, sizes=cache.sizes)
    original = CachedViews(paths, CFG, draft=False, **common)
    stored = CachedViews(paths, CFG, store=open_store(cache, 48), **common)
    diffs = []
    for i in range(3 * len(cache)):  # three passes: other views, other jitters
        a, b = original[i], stored[i]
        assert a["view"] == b["view"]
        for k in ("image", "image2"):
            diffs.append(float((_pixels(a[k]) - _pixels(b[k])).abs().mean()))
    assert max(diffs) < 8.0 and np.mean(diffs) < 5.0, diffs
    # and the comparison can fail: another view's pixels are far off
    far = float((_pixels(original[0]["image"]) - _pixels(stored[1]["image"])).abs().mean())
    assert far > 3 * np.mean(diffs)


def test_add_views_after_sigkill_resumes_to_identical_shards(tmp_path):
    c = _cache(tmp_path, n=9, shard_size=2)
    ref = run_add_views(c, 40, num_workers=0)
    ref_bytes = _shards(Path(ref.store))
    shutil.rmtree(ref.store)
    script = textwrap.dedent("""
        import sys
        import cskd_cache.cache.shards as shards
        real, n = shards.ShardWriter.finish, [0]
        def finish(self, *a, **k):
            n[0] += 1
            if n[0] == 3:
                import os, signal; os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)
        shards.ShardWriter.finish = finish
        from cskd_cache.stages.add_views import run_add_views
        run_add_views(sys.argv[1], 40, num_workers=0)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(c)], capture_output=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(TESTS)))
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    sdir = store_dir(c, 40)
    m = json.loads((sdir / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 2 and (sdir / ".cskd.lock").exists()
    with pytest.raises(StoreError, match="incomplete"):
        open_store(open_cache(c), 40)
    res = run_add_views(c, 40, num_workers=0)
    assert res.resumed_shards == 2
    assert _shards(sdir) == ref_bytes and verify_cache(c) == []
    assert sorted(p.name for p in sdir.iterdir() if p.name.startswith(".") and p.name != ".verified.json") == []


def test_a_damaged_or_foreign_store_is_refused(tmp_path):
    c = _cache(tmp_path, store=40)
    other = _cache(tmp_path, name="other", views=2)
    # a store copied beside another cache is not that cache's store
    shutil.copytree(store_dir(c, 40), store_dir(other, 40))
    with pytest.raises(StoreError, match="another cache"):
        open_store(open_cache(other), 40)
    assert any("another cache" in f for f in verify_cache(other))
    # flipped bytes in a store shard: verify names the shard, opening refuses it
    shard = store_dir(c, 40) / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    faults = verify_cache(c)
    assert len(faults) == 1 and "shard-00000.h5" in faults[0] and "view-store-40" in faults[0]
    (store_dir(c, 40) / ".verified.json").unlink(missing_ok=True)
    with pytest.raises(CorruptCache, match="shard-00000.h5"):
        open_store(open_cache(c), 40)
    # a different quality at the same size is not written over
    with pytest.raises(StoreError, match="quality 90"):
        run_add_views(c, 40, quality=75, num_workers=0)


def test_add_views_refuses_images_that_changed(tmp_path):
    c = _cache(tmp_path)
    victim = sorted((tmp_path / "imgs").rglob("*.jpg"))[0]
    photo(64, 48, 999).save(victim, quality=92)
    with pytest.raises(Exception, match="not the image cache row"):
        run_add_views(c, 40, num_workers=0)
    assert not (store_dir(c, 40) / "manifest.json").exists() or not json.loads(
        (store_dir(c, 40) / "manifest.json").read_text())["complete"]


def _align_cfg(c, out, **kw):
    from cskd_cache.stages.align import AlignConfig

    return AlignConfig(cache=str(c), student="py:test_align:TinyStudent", out=str(out), epochs=1, batch_size=2,
                       num_workers=0, device="cpu", eval_fraction=0.3, **kw)


def test_align_trains_from_the_store_with_the_originals_deleted(tmp_path):
    from cskd_cache.stages.align import run_align

    c = _cache(tmp_path, store=48)
    shutil.rmtree(tmp_path / "imgs")
    with pytest.raises(ImagesMissing):
        run_align(_align_cfg(c, tmp_path / "orig", view_pixels="originals"))
    assert not (tmp_path / "orig").exists()
    said = []
    res = run_align(_align_cfg(c, tmp_path / "run"), on_status=said.append)
    assert res["global_cos"] is not None and (tmp_path / "run" / "student.safetensors").is_file()
    import yaml
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    assert resolved["view_pixels"]["source"] == "store" and resolved["view_pixels"]["size"] == 48
    assert any("view store" in m and "not opened" in m for m in said)


def test_a_store_too_small_falls_back_to_the_originals(tmp_path):
    from cskd_cache.stages.align import run_align

    c = _cache(tmp_path, store=24)  # the 32 px student needs 32
    said = []
    run_align(_align_cfg(c, tmp_path / "run", max_steps=1), on_status=said.append)
    import yaml
    pixels = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]["view_pixels"]
    assert pixels["source"] == "originals" and pixels["draft"] and "24" in pixels["why"]
    assert any("add-views" in m and "--size 32" in m for m in said)
    with pytest.raises(StoreError, match="--view-pixels store"):
        run_align(_align_cfg(c, tmp_path / "strict", view_pixels="store", max_steps=1))


def test_distill_trains_with_the_unlabelled_originals_deleted(tmp_path):
    """Labelled images stay (val reads their eval view); every cached view, labelled or not, comes from the store."""
    from cskd_cache.stages.distill import DistillConfig, run_distill

    make_images(tmp_path / "lab", 8, seed=5, sub=False)
    make_images(tmp_path / "unl", 10, seed=6, sub=False)
    rows = [f"{p.name},{1 + (i % 9)}" for i, p in enumerate(sorted((tmp_path / "lab").iterdir()))]
    (tmp_path / "labels.csv").write_text("path,score\n" + "\n".join(rows) + "\n")
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(tmp_path / "c"),
                              images=[str(tmp_path / "lab"), str(tmp_path / "unl")], views=2, num_workers=0,
                              store_views=48))
    shutil.rmtree(tmp_path / "unl")
    said = []
    cfg = DistillConfig(cache=str(tmp_path / "c"), student="py:test_align:TinyStudent", teacher="cache-head",
                        labels=f"csv:{tmp_path / 'labels.csv'}", label_image_root=str(tmp_path / "lab"),
                        out=str(tmp_path / "d"), epochs=1, batch_size=2, num_workers=0, device="cpu",
                        val_fraction=0.25, consistency=0.5)
    res = run_distill(cfg, on_status=said.append)
    assert res["unlabelled_rows"] >= 10 and (tmp_path / "d" / "iaa_model.safetensors").is_file()
    assert any("view store" in m for m in said)


def test_needed_size_covers_the_jitter():
    assert needed_size([224, 224], jitter=False) == 224
    assert needed_size([224, 224], jitter=True) == 251  # so a 256 store covers a 224 student
    assert needed_size([160, 192], jitter=False) == 192


def _big_jpeg(path: Path, w=800, h=600, orientation: int | None = None) -> Path:
    img = photo(w, h, 7)
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, quality=92, exif=exif)
    else:
        img.save(path, quality=92)
    return path


def test_draft_decoding_reduces_a_large_jpeg_and_keeps_its_geometry(tmp_path):
    p = _big_jpeg(tmp_path / "big.jpg")
    full = load_rgb(p)
    small = load_rgb(p, draft=lambda w, h: (w / 4, h / 4))
    assert full.size == (800, 600) and small.size == (200, 150)
    assert small.info["original_size"] == (800, 600) == full.info["original_size"]
    # not reduced when the target exceeds half the source
    assert load_rgb(p, draft=lambda w, h: (w * 0.6, h * 0.6)).size == (800, 600)
    # a PNG is decoded whole
    photo(800, 600, 7).save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", draft=lambda w, h: (100, 100)).size == (800, 600)
    # EXIF-rotated: the asked size is in the shown orientation
    r = _big_jpeg(tmp_path / "rot.jpg", orientation=6)
    seen = []
    out = load_rgb(r, draft=lambda w, h: seen.append((w, h)) or (w / 4, h / 4))
    assert seen == [(600, 800)] and out.size == (150, 200) and out.info["original_size"] == (600, 800)


def test_draft_items_match_full_decodes_closely(tmp_path):
    paths = [str(_big_jpeg(tmp_path / f"b{i}.jpg", 640 + 32 * i, 480)) for i in range(3)]
    boxes = np.array([[[0.1, 0.1, 0.9, 0.9, 0.0]]] * 3, np.float32)
    sizes = np.array([[640 + 32 * i, 480] for i in range(3)], np.int32)
    common = dict(rows=np.arange(3), boxes=boxes, jitter=True, seed=1, sizes=sizes)
    exact, drafted = CachedViews(paths, CFG, draft=False, **common), CachedViews(paths, CFG, **common)
    for i in range(3):
        d = float((_pixels(exact[i]["image"]) - _pixels(drafted[i]["image"])).abs().mean())
        assert d < 4.0, d


def test_extract_never_drafts_the_teachers_view_0(tmp_path, monkeypatch):
    from cskd_cache.data import extract_views

    (tmp_path / "imgs").mkdir()
    _big_jpeg(tmp_path / "imgs" / "big.jpg", 1600, 1200)
    calls = []
    real = extract_views.load_rgb
    monkeypatch.setattr(extract_views, "load_rgb", lambda *a, **k: calls.append(k) or real(*a, **k))
    c = tmp_path / "c"
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(c), images=[str(tmp_path / "imgs")],
                              num_workers=0))
    assert calls and all(k.get("draft") is None for k in calls)
    with h5py.File(c / "shard-00000.h5") as f:
        assert tuple(f["size"][0]) == (1600, 1200)


def test_cli_add_views_info_and_verify(tmp_path):
    c = _cache(tmp_path, n=4, views=2)
    env = dict(os.environ, PYTHONPATH=str(TESTS))

    def cskd(*args):
        return subprocess.run([sys.executable, "-m", "cskd_cli.main", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300)

    r = cskd("cache", "add-views", c, "--size", "40", "--num-workers", "0")
    assert r.returncode == 0, r.stderr
    assert "per view" in r.stdout and (store_dir(c, 40) / "manifest.json").is_file()
    r = cskd("cache", "info", c)
    assert r.returncode == 0 and "40 px q90" in r.stdout
    assert cskd("cache", "verify", c).returncode == 0
    r = cskd("cache", "add-views", tmp_path / "nowhere", "--size", "40")
    assert r.returncode == 1 and "manifest.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_cut_the_same_store(tmp_path):
    c = _cache(tmp_path, n=7, shard_size=2)
    one = _shards(Path(run_add_views(c, 40, num_workers=0).store))
    shutil.rmtree(store_dir(c, 40))
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cskd_cli.main", "cache", "add-views", str(c), "--size", "40", "--num-workers", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _shards(store_dir(c, 40)) == one and verify_cache(c) == []


def test_finetune_has_no_store_and_says_so(tmp_path):
    from cskd_cache.stages.finetune import FinetuneConfig, FinetuneError, run_finetune

    with pytest.raises(FinetuneError, match="no view store"):
        run_finetune(FinetuneConfig(model="py:test_align:TinyStudent", labels="csv:x.csv", out=str(tmp_path / "f"),
                                    view_pixels="store"))
    assert not (tmp_path / "f").exists()


def test_extract_cuts_the_store_in_its_own_pass_as_add_views_would(tmp_path):
    """--store-views cuts each view from the decode the teacher's views came from: the same store add-views makes
    afterwards, and the closing add-views pass finds every shard done."""
    make_images(tmp_path / "imgs", 7)
    one = tmp_path / "one"
    res = run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(one), images=[str(tmp_path / "imgs")],
                                    views=2, num_workers=0, batch_size=4, shard_size=3, store_views=40))
    n_shards = len(json.loads((one / "manifest.json").read_text())["shards"])
    assert n_shards == 3 and res.store.resumed_shards == n_shards  # all cut in the extraction pass
    m = json.loads((store_dir(one, 40) / "manifest.json").read_text())
    assert m["complete"] and len(m["shards"]) == n_shards
    two = _cache(tmp_path, n=7, views=2, shard_size=3, name="two")
    assert run_add_views(two, 40, num_workers=0).resumed_shards == 0

    def arrays(c):
        out = []
        for p in sorted(store_dir(c, 40).glob("shard-*.h5")):
            with h5py.File(p) as f:
                out.append(([bytes(x) for x in f["jpeg"][:].ravel()], f["shape"][:].tolist(), list(f["key"][:])))
        return out
    assert arrays(one) == arrays(two)
    assert verify_cache(one) == []


def test_a_damaged_store_stops_training_instead_of_being_replaced_silently(tmp_path):
    from cskd_cache.stages.align import run_align

    c = _cache(tmp_path, store=48)
    shard = store_dir(c, 48) / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptCache, match="shard-00000.h5"):
        run_align(_align_cfg(c, tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    # a stale store (made for the cache before it was re-extracted) is passed over with its reason
    shutil.rmtree(store_dir(c, 48))
    run_add_views(c, 48, num_workers=0)
    m = json.loads((store_dir(c, 48) / "manifest.json").read_text())
    m["shards"][0]["feature_sha256"] = "0" * 64
    (store_dir(c, 48) / "manifest.json").write_text(json.dumps(m))
    said = []
    run_align(_align_cfg(c, tmp_path / "run2", max_steps=1), on_status=said.append)
    assert any("original images" in s and "other feature shards" in s for s in said), said
