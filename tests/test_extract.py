"""cskd extract end to end: values, views, storage, sources, robustness, resumption."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _imgs import make_images, photo

from cskd_cache.cache.manifest import CacheError, read_manifest
from cskd_cache.cache.reader import open_cache
from cskd_cache.cache.verify import verify_cache
from cskd_cache.data.images import load_rgb
from cskd_cache.data.views import ViewPolicy, eval_box, render_tensor, sample_views
from cskd_cache.models.teachers import build_teacher
from cskd_cache.stages.extract import ExtractConfig, run_extract

ARRAYS = ("key", "source", "digest", "size", "views", "embed", "tokens", "prefix")


def read_all(cache_dir) -> dict[str, np.ndarray]:
    """Every array of every shard, concatenated in row order (what 'the same cache' means)."""
    m = read_manifest(cache_dir)
    out: dict[str, list] = {}
    for s in m["shards"]:
        with h5py.File(os.path.join(cache_dir, s["file"]), "r") as f:
            for name in m["arrays"]:
                ds = f[name]
                out.setdefault(name, []).append(ds.asstr()[:] if m["arrays"][name]["dtype"] == "str" else ds[:])
    return {k: np.concatenate(v) for k, v in out.items()}


def assert_same_arrays(a: dict, b: dict, float_atol: float = 0.0) -> None:
    """Exact equality; float_atol > 0 allows last-bit differences where thread counts differ (torchrun)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        if float_atol and a[k].dtype.kind == "f":
            np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=float_atol, err_msg=k)
        else:
            assert (a[k] == b[k]).all(), k


@pytest.fixture
def spec(tiny_clip_name):
    return f"open_clip:{tiny_clip_name}@none"


@pytest.fixture
def teacher(spec):
    return build_teacher(spec)


def cfg(tmp_path, spec, **kw):
    base = dict(teacher=spec, out=str(tmp_path / "cache"), images=[str(tmp_path / "imgs")], views=3,
                batch_size=3, num_workers=0, shard_size=4, layers=(0,))
    base.update(kw)
    return ExtractConfig(**base)


def test_cached_values_equal_direct_teacher_forward(tmp_path, spec, teacher):
    make_images(tmp_path / "imgs", 7)
    res = run_extract(cfg(tmp_path, spec), teacher=teacher)
    assert (res.images, res.rows, res.skipped) == (7, 7, 0)
    cache = open_cache(tmp_path / "cache")
    m = cache.manifest
    assert m["complete"] and m["arrays"]["tokens"]["shape"] == [None, 3, 16, 64]
    assert m["arrays"]["prefix"]["shape"] == [None, 3, 1, 64] and "layer_0" in m["arrays"]
    assert m["preprocess"]["repr"] == repr(teacher.preprocess)
    arrays = read_all(tmp_path / "cache")
    policy = ViewPolicy(n_views=3)
    cfgp = teacher.preprocess_cfg
    for r in range(len(cache)):
        img = load_rgb(cache.row(r).path)
        boxes = sample_views(policy, f"{cache.sources[r]}/{cache.keys[r]}", *img.size, eval_box(cfgp, *img.size))
        np.testing.assert_array_equal(arrays["views"][r], boxes)
        x = torch.stack([teacher.preprocess(img)] + [
            render_tensor(img, b, tuple(cfgp["size"]), cfgp["interpolation"], cfgp["mean"], cfgp["std"])
            for b in boxes[1:]])
        with torch.no_grad():
            ref = teacher(x, layers=[0])
        np.testing.assert_allclose(arrays["embed"][r].astype(np.float32), ref["embed"].numpy(), atol=2e-3, rtol=1e-2)
        np.testing.assert_allclose(arrays["tokens"][r].astype(np.float32), ref["tokens"].reshape(3, 16, 64).numpy(),
                                   atol=1e-2, rtol=1e-2)
        np.testing.assert_allclose(arrays["prefix"][r].astype(np.float32), ref["prefix"].numpy(), atol=1e-2, rtol=1e-2)
        np.testing.assert_allclose(arrays["layer_0"][r].astype(np.float32),
                                   ref["layers"][0].reshape(3, 16, 64).numpy(), atol=1e-2, rtol=1e-2)
        assert tuple(arrays["size"][r]) == img.size
    # norms: the global embedding is stored L2-normalised
    np.testing.assert_allclose(np.linalg.norm(arrays["embed"].astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert verify_cache(tmp_path / "cache") == []


def test_views_are_reproducible_and_differ_between_images(tmp_path, spec, teacher):
    make_images(tmp_path / "imgs", 5)
    run_extract(cfg(tmp_path, spec, out=str(tmp_path / "a")), teacher=teacher)
    run_extract(cfg(tmp_path, spec, out=str(tmp_path / "b"), shard_size=2, batch_size=2), teacher=teacher)
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert_same_arrays({k: a[k] for k in ("key", "views")}, {k: b[k] for k in ("key", "views")})
    np.testing.assert_allclose(a["embed"].astype(np.float32), b["embed"].astype(np.float32), atol=2e-3)
    assert not np.allclose(a["views"][0, 1], a["views"][1, 1])


def test_token_grid_pools_native_tokens(tmp_path, spec, teacher):
    make_images(tmp_path / "imgs", 3)
    run_extract(cfg(tmp_path, spec, out=str(tmp_path / "native"), views=1, layers=()), teacher=teacher)
    run_extract(cfg(tmp_path, spec, out=str(tmp_path / "g2"), views=1, layers=(), token_grid=2), teacher=teacher)
    native = read_all(tmp_path / "native")["tokens"].astype(np.float32)  # (N,1,16,64)
    pooled = read_all(tmp_path / "g2")["tokens"].astype(np.float32)  # (N,1,4,64)
    grid = torch.from_numpy(native[:, 0]).reshape(-1, 4, 4, 64).permute(0, 3, 1, 2)
    ref = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(-1, 4, 64).numpy()
    np.testing.assert_allclose(pooled[:, 0], ref, atol=1e-2)
    assert read_manifest(tmp_path / "g2")["storage"]["token_grid"] == [2, 2]
    with pytest.raises(CacheError, match="token-grid 9"):
        run_extract(cfg(tmp_path, spec, out=str(tmp_path / "bad"), token_grid=9), teacher=teacher)


def test_no_tokens_cache_is_smaller(tmp_path, spec, teacher):
    make_images(tmp_path / "imgs", 3)
    with_t = run_extract(cfg(tmp_path, spec, out=str(tmp_path / "t"), views=1, layers=()), teacher=teacher)
    without = run_extract(cfg(tmp_path, spec, out=str(tmp_path / "e"), views=1, layers=(), tokens=False),
                          teacher=teacher)
    assert "tokens" not in read_manifest(tmp_path / "e")["arrays"]
    assert without.bytes_per_image < with_t.bytes_per_image
    with pytest.raises(CacheError, match="holds no tokens"):
        open_cache(tmp_path / "e").dataset()
    assert len(open_cache(tmp_path / "e").dataset(tokens=False)) == 3


def test_bad_files_are_skipped_and_listed(tmp_path, spec, teacher):
    imgs = tmp_path / "imgs"
    make_images(imgs, 3, sub=False)
    (imgs / "empty.jpg").write_bytes(b"")
    good = (imgs / "img001.jpg").read_bytes()
    (imgs / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (imgs / "corrupt.jpg").write_bytes(good[:20] + os.urandom(400))
    (imgs / "notes.png").write_text("this is not an image")
    photo(300, 300, 9).save(imgs / "huge.png")
    photo(40, 30, 10).convert("CMYK").save(imgs / "cmyk.jpg")
    photo(40, 30, 11).convert("P").save(imgs / "palette.png")
    rgba = photo(40, 30, 12).convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(imgs / "rgba.png")
    Image16 = __import__("PIL.Image", fromlist=["Image"])
    Image16.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(imgs / "gray16.png")
    res = run_extract(cfg(tmp_path, spec, max_pixels=50_000), teacher=teacher)
    skipped = [json.loads(line) for line in (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert reasons["empty.jpg"] == "empty" and reasons["truncated.jpg"] == "truncated"
    assert reasons["notes.png"] == "not-an-image" and reasons["huge.png"] == "too-large"
    assert reasons["corrupt.jpg"] in ("corrupt", "truncated", "not-an-image")
    assert res.skipped == 5 and res.rows == 7
    keys = set(open_cache(tmp_path / "cache").keys)
    assert keys == {"img000.png", "img001.jpg", "img002.png", "cmyk.jpg", "palette.png", "rgba.png", "gray16.png"}
    assert verify_cache(tmp_path / "cache") == []


def test_sources_lists_and_duplicates(tmp_path, spec, teacher):
    a = make_images(tmp_path / "a", 3, seed=1, sub=False)
    make_images(tmp_path / "b", 2, seed=2, sub=False)
    shutil.copy(a[0], tmp_path / "b" / "copy_of_a0.png")
    lst = tmp_path / "lists"
    lst.mkdir()
    make_images(lst / "pics", 2, seed=3, sub=False)
    (lst / "l.csv").write_text("image,score\npics/img000.png,5\npics/img001.jpg,6\npics/missing.jpg,1\n")
    (lst / "j.jsonl").write_text(json.dumps({"path": str(a[1])}) + "\n")  # absolute, and a duplicate of a/img001
    res = run_extract(cfg(tmp_path, spec, images=[str(tmp_path / "a"), str(tmp_path / "b")],
                          lists=[str(lst / "l.csv"), str(lst / "j.jsonl")]), teacher=teacher)
    cache = open_cache(tmp_path / "cache")
    rows = sorted(zip(cache.sources, cache.keys))
    assert rows == sorted([("a", "img000.png"), ("a", "img001.jpg"), ("a", "img002.png"), ("b", "img000.png"),
                           ("b", "img001.jpg"), ("l", "pics/img000.png"), ("l", "pics/img001.jpg")])
    dups = [json.loads(x) for x in (tmp_path / "cache" / "duplicates.jsonl").read_text().splitlines()]
    assert {(d["source"], d["duplicate_of_key"]) for d in dups} == {("b", "img000.png"), ("j", "img001.jpg")}
    assert res.duplicates == 2
    skipped = (tmp_path / "cache" / "skipped.jsonl").read_text()
    assert "missing.jpg" in skipped and '"reason": "missing"' in skipped
    assert cache.row(cache.find("l", "pics/img001.jpg")).path == str(lst / "pics" / "img001.jpg")


def test_fingerprint_mismatch_refuses_and_leaves_cache_untouched(tmp_path, spec, teacher, tiny_clip_checkpoint):
    make_images(tmp_path / "imgs", 3)
    run_extract(cfg(tmp_path, spec), teacher=teacher)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    with pytest.raises(CacheError, match="views"):
        run_extract(cfg(tmp_path, spec, views=2), teacher=teacher)
    with pytest.raises(CacheError, match="storage"):
        run_extract(cfg(tmp_path, spec, token_grid=2), teacher=teacher)
    name, path, _ = tiny_clip_checkpoint
    with pytest.raises(CacheError, match="teacher"):
        run_extract(cfg(tmp_path, f"open_clip:{name}@{path}"))
    make_images(tmp_path / "imgs", 4)  # a new image appears in the source
    with pytest.raises(CacheError, match="other input images"):
        run_extract(cfg(tmp_path, spec), teacher=teacher)
    after = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    assert before == after


def test_checkpoint_teacher_records_weights_hash(tmp_path, tiny_clip_checkpoint):
    import hashlib
    name, path, model = tiny_clip_checkpoint
    make_images(tmp_path / "imgs", 2)
    run_extract(cfg(tmp_path, f"open_clip:{name}@{path}", views=1))
    m = read_manifest(tmp_path / "cache")
    assert m["teacher"]["weights_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    cache = open_cache(tmp_path / "cache")
    img = load_rgb(cache.row(0).path)
    _, _, pre = __import__("open_clip").create_model_and_transforms(name)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(pre(img)[None]), dim=-1)
    np.testing.assert_allclose(cache.embed[0, 0].astype(np.float32), ref[0].numpy(), atol=2e-3)


def test_interrupted_run_resumes_to_identical_cache(tmp_path, spec, teacher, monkeypatch):
    make_images(tmp_path / "imgs", 9)
    run_extract(cfg(tmp_path, spec, out=str(tmp_path / "ref")), teacher=teacher)
    ref = read_all(tmp_path / "ref")

    import cskd_cache.cache.shards as shards
    real_finish, calls = shards.ShardWriter.finish, {"n": 0}

    def dying_finish(self, skipped, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # killed mid-shard: data written to the .tmp file, never renamed
            self.f.flush()
            raise KeyboardInterrupt
        return real_finish(self, skipped, *args, **kwargs)

    monkeypatch.setattr(shards.ShardWriter, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg(tmp_path, spec), teacher=teacher)
    m = read_manifest(tmp_path / "cache")
    assert not m["complete"] and len(m["shards"]) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))
    monkeypatch.setattr(shards.ShardWriter, "finish", real_finish)
    res = run_extract(cfg(tmp_path, spec), teacher=teacher)
    assert res.resumed_shards == 1
    assert_same_arrays(read_all(tmp_path / "cache"), ref)
    assert verify_cache(tmp_path / "cache") == []


def test_leftover_tmp_and_missing_sidecar_are_redone(tmp_path, spec, teacher):
    make_images(tmp_path / "imgs", 9)
    run_extract(cfg(tmp_path, spec), teacher=teacher)
    ref = read_all(tmp_path / "cache")
    c = tmp_path / "cache"
    # as if killed after renaming shard 2 but before its sidecar, and while writing shard 1's temp file
    (c / "shard-00002.json").unlink()
    (c / "shard-00001.h5.tmp").write_bytes(b"partial")
    m = json.loads((c / "manifest.json").read_text())
    m["complete"] = False
    (c / "manifest.json").write_text(json.dumps(m))
    res = run_extract(cfg(tmp_path, spec), teacher=teacher)
    assert res.resumed_shards == 2
    assert_same_arrays(read_all(c), ref)
    assert not list(c.glob("*.tmp"))
    assert verify_cache(c) == []


def test_no_input_images_is_an_error(tmp_path, spec, teacher):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "readme.txt").write_text("no images here")
    with pytest.raises(CacheError, match="no input images"):
        run_extract(cfg(tmp_path, spec), teacher=teacher)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_verify_names_each_fault(tmp_path, spec, teacher):
    make_images(tmp_path / "imgs", 9)
    run_extract(cfg(tmp_path, spec), teacher=teacher)
    c = tmp_path / "cache"
    assert verify_cache(c) == []
    # NaN with a consistent checksum: only the value check can catch it
    with h5py.File(c / "shard-00001.h5", "r+") as f:
        f["embed"][0, 0, 0] = np.nan
    m = json.loads((c / "manifest.json").read_text())
    from cskd_cache.cache.manifest import file_sha256
    m["shards"][1]["sha256"] = file_sha256(c / "shard-00001.h5")
    m["shards"][1]["bytes"] = (c / "shard-00001.h5").stat().st_size
    (c / "manifest.json").write_text(json.dumps(m))
    # bit rot in another shard, and a third one deleted
    data = bytearray((c / "shard-00000.h5").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (c / "shard-00000.h5").write_bytes(bytes(data))
    (c / "shard-00002.h5").unlink()
    faults = verify_cache(c)
    text = "\n".join(faults)
    assert "shard-00001.h5: embed holds 1 NaN/inf" in text
    assert "shard-00000.h5: sha256 mismatch" in text
    assert "shard-00002.h5: missing shard file" in text


def test_manifest_is_readable_by_others_under_the_usual_umask(tmp_path):
    import stat

    from cskd_cache.cache.manifest import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
