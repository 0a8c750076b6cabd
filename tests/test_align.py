"""Stage I `align`, library level: learning, consistent teaching, errors, reproducibility, resume, DDP.

The cache comes from `centered_teacher` below, a py: teacher defined in this module. A random-init network
maps every image to nearly the same direction (toy_teacher's embeddings have cosine 0.99 to their mean), so a
student could score well by learning one constant vector, and a shuffled-target control would too. Centring
and scaling the toy teacher's head on unrelated calibration photos makes the targets differ per image, so
only a student that learned the image -> feature mapping scores well on held-out rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _crash import Crash, crash_in_second_epoch
from _imgs import make_images, photo, standardise_head
from safetensors.torch import load_file

import cskd_cache
from cskd_cache.cache.paths import ImagesMissing, parse_image_root, resolve_paths
from cskd_cache.cache.reader import open_cache
from cskd_cache.cache.stats import embed_stats
from cskd_cache.data.datasets import CachedViews, collate
from cskd_cache.data.images import load_rgb
from cskd_cache.data.views import render_tensor
from cskd_cache.losses import AlignLoss, CosineLoss, MSELoss, TokenSmoothL1Loss
from cskd_cache.models.align_heads import AlignHeads, resample_grid
from cskd_cache.models.runs import build_encoder
from cskd_cache.models.students import build_student
from cskd_cache.stages.align import AlignConfig, AlignError, run_align
from cskd_cache.stages.align_eval import heldout_mask, knn_agreement, knn_indices, split_rows
from cskd_cache.stages.extract import ExtractConfig, run_extract
from cskd_cache.train.engine import NonFiniteLoss, cosine_schedule
from cskd_cache.train.run_log import read_metrics

TESTS = Path(__file__).parent
TEACHER = "py:test_align:centered_teacher"
TIMING = {"img_s", "eval_s", "seconds"}


def centered_teacher():
    from toy_teacher import make

    # calibration photos: other seeds than any test image
    return standardise_head(make(), [photo(64 + 17 * (s % 5), 48 + 23 * (s % 3), 10_000 + s) for s in range(64)])


class TinyStudent(torch.nn.Module):
    """A py: student (the interface in the cskd_cache.models.students docstring)."""

    input_cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 4, stride=4)

    def forward_features(self, x):
        g = torch.relu(self.conv(x))
        return g.mean((2, 3)), g


def tiny_student():
    return TinyStudent()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    make_images(d / "imgs", 60)
    common = dict(teacher=TEACHER, images=[str(d / "imgs")], views=2, num_workers=0, shard_size=25)
    run_extract(ExtractConfig(out=str(d / "cache"), **common))
    run_extract(ExtractConfig(out=str(d / "cache-notok"), tokens=False, **common))
    return d


def cfg(data, out, **kw) -> AlignConfig:
    base = dict(cache=str(data / "cache"), student="timm:test_resnet", out=str(out), size=32,
                batch_size=8, num_workers=0, eval_fraction=0.3, max_steps=6, log_every=2)
    base.update(kw)
    return AlignConfig(**base)


def no_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_alignment_learns_without_constructing_the_teacher(data, tmp_path, monkeypatch):
    import open_clip

    import cskd_cache.models.teachers as teachers

    def boom(*a, **k):
        raise AssertionError("the teacher must never be constructed during align")

    monkeypatch.setattr(teachers, "build_teacher", boom)
    monkeypatch.setattr(teachers.Teacher, "__init__", boom)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    monkeypatch.setattr(open_clip, "create_model", boom)
    monkeypatch.setattr(sys.modules[__name__], "centered_teacher", boom)

    kw = dict(max_steps=200, batch_size=16, lr=3e-3, log_every=20)
    real = run_align(cfg(data, tmp_path / "real", **kw))
    control = run_align(cfg(data, tmp_path / "control", shuffle_targets=True, **kw))
    start = real["initial"]["global_cos"]
    print(f"\nheld-out global cosine: start {start:.4f}, aligned {real['global_cos']:.4f}, "
          f"shuffled-target control {control['global_cos']:.4f}; kNN agreement start "
          f"{real['initial']['knn_agreement']:.3f} -> {real['knn_agreement']:.3f} (control {control['knn_agreement']:.3f})")
    assert control["initial"]["global_cos"] == start  # same init, same held-out rows: only the targets differ
    assert real["global_cos"] > start + 0.5
    assert real["global_cos"] > control["global_cos"] + 0.4
    assert real["global_cos"] > 0.8
    assert real["token_cos"] > real["initial"]["token_cos"] + 0.3

    run = tmp_path / "real"
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    steps_per_epoch = evals[1]["step"]
    assert evals[0]["step"] == 0 and len(evals) == 1 + -(-200 // steps_per_epoch)
    assert [r["step"] for r in records if r["type"] == "train"][:2] == [20, 40]
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 3e-3 and saved["resolved"]["w_token"] == 1.0 and saved["resolved"]["total_steps"] == 200
    assert saved["resolved"]["cache"]["teacher"] == TEACHER


def test_standardized_global_target_scores_the_mean_at_zero_and_still_learns(data, tmp_path):
    """On the raw toy teacher (embeddings at cosine 0.99 to their mean) a shuffled-target control scores as high as
    real alignment; against the standardised target it scores ~0 and real alignment stays far above it."""
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(tmp_path / "raw"), images=[str(data / "imgs")],
                              views=2, num_workers=0, tokens=False))
    cache = open_cache(tmp_path / "raw")
    train_rows, _ = split_rows(cache, 0.3)
    mean, std = embed_stats(cache, train_rows, chunk=7)  # several chunks
    e = cache.embed[train_rows].reshape(-1, cache.embed_dim).astype(np.float64)
    np.testing.assert_allclose(mean, e.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, e.std(0), rtol=1e-4, atol=1e-6)
    paths = resolve_paths(cache)
    ds = CachedViews([paths[r] for r in train_rows[:3]], {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                                                          "interpolation": "bilinear"}, rows=train_rows[:3],
                     boxes=cache.boxes, embed=cache.embed, view=0, embed_stats=(mean, std))
    it = ds[0]
    want = (cache.embed[train_rows[0], 0].astype(np.float32) - mean) / std
    np.testing.assert_allclose(it["embed"].numpy(), want, rtol=1e-5, atol=1e-5)

    kw = dict(cache=str(tmp_path / "raw"), max_steps=120, batch_size=16, lr=3e-3, log_every=20)
    res = {(std_, shuf): run_align(cfg(data, tmp_path / f"{std_}-{shuf}", standardize_global=std_,
                                       shuffle_targets=shuf, **kw))["global_cos"]
           for std_ in (False, True) for shuf in (False, True)}
    print(f"\nheld-out global cos, raw target: real {res[False, False]:.3f} control {res[False, True]:.3f}; "
          f"standardised: real {res[True, False]:.3f} control {res[True, True]:.3f}")
    assert res[False, True] > 0.9 and res[False, False] - res[False, True] < 0.1  # raw: the constant wins
    assert abs(res[True, True]) < 0.25 and res[True, False] > res[True, True] + 0.4
    import yaml

    saved = yaml.safe_load((tmp_path / "True-False" / "config.yaml").read_text())
    assert saved["standardize_global"] is True and saved["resolved"]["global_target"] == "standardized"


def test_each_image_is_rebuilt_as_exactly_its_cached_view(data):
    cache = open_cache(data / "cache")
    student = build_student("timm:test_vit", size=48)
    icfg = student.input_cfg
    assert icfg["size"] == [48, 48] and icfg["interpolation"] == "bicubic"
    paths = resolve_paths(cache)
    n = len(cache)
    ds = CachedViews(paths, icfg, rows=np.arange(n), boxes=cache.boxes, embed=cache.embed, seed=3)
    views_by_epoch = []
    for epoch in (0, 1):
        # Through DataLoader workers: the pass is part of each index (epoch * n + row), and the images must still
        # match exactly.
        loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, collate_fn=collate,
                                             sampler=list(range(epoch * n, (epoch + 1) * n)))
        seen = {}
        for batch in loader:
            for j, row in enumerate(batch["row"].tolist()):
                v = int(batch["view"][j])
                assert v == ds.view_of(row, epoch)
                want = render_tensor(load_rgb(paths[row]), cache.boxes[row, v], icfg["size"], icfg["interpolation"],
                                     icfg["mean"], icfg["std"])
                assert torch.equal(batch["image"][j], want)
                assert torch.equal(batch["embed"][j], torch.from_numpy(cache.embed[row, v].astype(np.float32)))
                seen[row] = v
        assert sorted(seen) == list(range(len(cache)))
        views_by_epoch.append(seen)
    assert views_by_epoch[0] != views_by_epoch[1] and set(views_by_epoch[0].values()) == {0, 1}


def test_token_loss_on_a_cache_without_tokens_is_a_clear_error(data, tmp_path):
    with pytest.raises(AlignError, match="needs patch tokens.*--w-token 0"):
        run_align(cfg(data, tmp_path / "a", cache=str(data / "cache-notok"), w_token=1.0))
    assert not (tmp_path / "a").exists()
    r = run_align(cfg(data, tmp_path / "b", cache=str(data / "cache-notok"), max_steps=2))  # auto: global only
    assert r["token_cos"] is None and r["global_cos"] is not None
    import yaml

    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["resolved"]["w_token"] == 0.0


def test_missing_images_are_listed_and_image_root_fixes_it(tmp_path):
    make_images(tmp_path / "imgs", 8)
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(tmp_path / "cache"),
                              images=[str(tmp_path / "imgs")], num_workers=0))
    shutil.move(tmp_path / "imgs", tmp_path / "moved")
    base = dict(cache=str(tmp_path / "cache"), student="timm:test_resnet", size=32, batch_size=4,
                num_workers=0, eval_fraction=0, max_steps=2)
    with pytest.raises(ImagesMissing) as e:
        run_align(AlignConfig(out=str(tmp_path / "run"), **base))
    msg = str(e.value)
    assert "8 of 8 images" in msg and "--cache-image-root OLD=NEW" in msg and "... and 3 more" in msg
    assert str(tmp_path / "imgs" / "set0" / "img000.png") in msg and str(tmp_path / "imgs") in msg
    assert not (tmp_path / "run").exists()
    r = run_align(AlignConfig(out=str(tmp_path / "run"), cache_image_root=[f"{tmp_path / 'imgs'}={tmp_path / 'moved'}"],
                              **base))
    assert r["step"] == 2
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_image_root(["no-equals-sign"])


def test_nan_guard_stops_with_a_message(data, tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+ .*Lower --lr"):
        run_align(cfg(data, tmp_path / "lr", lr=1e30, warmup_fraction=0, max_steps=20))
    # A NaN in the targets stops the run too, before the update reaches the weights.
    orig = CachedViews.__getitems__

    def poisoned(self, indices):
        items = orig(self, indices)
        if min(indices) >= self.n:  # a batch wholly in the second pass over the rows: the second epoch
            items[0]["embed"][0] = float("nan")
        return items

    monkeypatch.setattr(CachedViews, "__getitems__", poisoned)
    with pytest.raises(NonFiniteLoss, match="global=nan"):
        run_align(cfg(data, tmp_path / "nan", max_steps=40))
    ckpts = sorted((tmp_path / "nan" / "checkpoints").glob("epoch-*"))
    assert [p.name for p in ckpts] == ["epoch-0001"]
    assert all(torch.isfinite(t).all() for t in load_file(ckpts[0] / "model.safetensors").values())


def test_same_seed_same_run_any_worker_count(data, tmp_path):
    a = run_align(cfg(data, tmp_path / "a", max_steps=10))
    b = run_align(cfg(data, tmp_path / "b", max_steps=10, num_workers=2))
    run_align(cfg(data, tmp_path / "c", max_steps=10, seed=1))
    ma, mb, mc = (no_timing(read_metrics(tmp_path / x / "metrics.jsonl")) for x in "abc")
    assert ma == mb and ma != mc
    assert a["global_cos"] == b["global_cos"]
    wa, wb = (load_file(tmp_path / x / "student.safetensors") for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_every_epoch_and_resume_reaches_the_same_weights(data, tmp_path):
    full = cfg(data, tmp_path / "full", max_steps=None, epochs=3, keep_checkpoints=0)
    run_align(full)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == \
        ["epoch-0001", "epoch-0002", "epoch-0003"]

    part = cfg(data, tmp_path / "part", max_steps=None, epochs=3, keep_checkpoints=0)
    with pytest.raises(Crash):
        run_align(part, on_progress=crash_in_second_epoch())
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["epoch-0001"]
    with pytest.raises(AlignError, match="already holds an align run; pass --resume"):
        run_align(part)
    with pytest.raises(AlignError, match="different settings.*lr"):
        run_align(AlignConfig(**{**part.to_dict(), "resume": True, "lr": 0.5}))
    statuses = []
    run_align(AlignConfig(**{**part.to_dict(), "resume": True}), on_status=statuses.append)
    assert any("resuming" in s and "epoch-0001" in s for s in statuses)

    for name in ("student.safetensors", "checkpoints/epoch-0003/model.safetensors"):
        wa, wb = load_file(tmp_path / "full" / name), load_file(tmp_path / "part" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ma, mb = (no_timing(read_metrics(tmp_path / x / "metrics.jsonl")) for x in ("full", "part"))
    assert ma == mb  # the crashed epoch's partial log lines were dropped, nothing is logged twice


def test_load_encoder_and_run_spec_give_the_trained_student(data, tmp_path):
    run_align(cfg(data, tmp_path / "run", student="timm:test_vit", max_steps=4))
    x = torch.randn(3, 3, 32, 32)
    trained = load_file(tmp_path / "run" / "student.safetensors")
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "epoch-0001" / "model.safetensors")
    assert all(torch.equal(trained[k], ckpt["student.model." + k]) for k in trained)

    enc = cskd_cache.load_encoder(tmp_path / "run", trust_code=True)
    enc2 = build_encoder(f"run:{tmp_path / 'run'}")
    fresh = build_student("timm:test_vit", size=32).eval()
    assert not enc.training and enc.spec == "timm:test_vit" and enc.input_cfg["size"] == [32, 32]
    with torch.no_grad():
        p1, g1 = enc(x)
        p2, g2 = enc2(x)
        p0, _ = fresh(x)
        fresh.model.load_state_dict(trained)
        p3, g3 = fresh(x)
    assert p1.shape == (3, 64) and g1.shape == (3, 64, 2, 2)
    assert torch.equal(p1, p2) and torch.equal(g1, g2) and torch.equal(p1, p3) and torch.equal(g1, g3)
    assert not torch.allclose(p0, p1)

    # A Stage I student can itself be aligned further; its run records the base spec, not run:.
    run_align(cfg(data, tmp_path / "again", student=f"run:{tmp_path / 'run'}", size=None, max_steps=2))
    meta = json.loads((tmp_path / "again" / "student.json").read_text())
    assert meta["spec"] == "timm:test_vit" and meta["input_cfg"]["size"] == [32, 32]
    with pytest.raises(FileNotFoundError, match="finished `cskd align` run"):
        cskd_cache.load_encoder(tmp_path)


def test_students_cnn_vit_and_py():
    for spec, size, pooled, grid in (("timm:test_resnet", 64, 96, (2, 2)), ("timm:test_efficientnet", 64, 256, (2, 2)),
                                     ("timm:test_vit", 48, 64, (3, 3)), ("timm:test_vit_relpos", 48, 96, (3, 3)),
                                     ("py:test_align:tiny_student", None, 16, (8, 8))):
        s = build_student(spec, size=size)
        assert (s.pooled_dim, s.grid_size) == (pooled, grid), spec
        p, g = s(torch.randn(2, 3, *s.input_cfg["size"]))
        assert p.shape == (2, pooled) and g.shape[2:] == grid
    native = build_student("timm:test_vit")
    assert native.input_cfg["size"] == [160, 160] and native.grid_size == (10, 10)
    with pytest.raises(ValueError, match="does not run at input size.*--size"):
        build_student("timm:test_maxvit", size=36)
    with pytest.raises(ValueError, match="malformed student spec"):
        build_student("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="unknown timm model"):
        build_student("timm:not_a_model")


def test_py_student_aligns(data, tmp_path):
    r = run_align(cfg(data, tmp_path / "run", student="py:test_align:tiny_student", size=None, max_steps=4))
    assert r["step"] == 4
    assert cskd_cache.load_encoder(tmp_path / "run", trust_code=True).grid_size == (8, 8)


def test_heads_and_losses():
    grid = torch.randn(2, 5, 4, 4)
    assert torch.equal(resample_grid(grid, (4, 4)), grid)
    assert torch.allclose(resample_grid(grid, (2, 2)), torch.nn.functional.avg_pool2d(grid, 2))
    assert resample_grid(grid, (8, 8)).shape == (2, 5, 8, 8)
    heads = AlignHeads(7, 5, 6, token_dim=12, token_grid=(8, 8))
    out = heads(torch.randn(2, 7), grid)
    assert out["embed"].shape == (2, 6) and out["tokens"].shape == (2, 64, 12)
    assert AlignHeads(7, 5, 6)(torch.randn(2, 7), grid)["tokens"] is None

    p, t = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(CosineLoss()(p, t), 1 - torch.nn.functional.cosine_similarity(p, t).mean())
    assert torch.allclose(CosineLoss()(3 * t, t), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(MSELoss()(p, t), ((p - t) ** 2).mean())
    tp, tt = torch.randn(2, 9, 12), 5 + 3 * torch.randn(2, 9, 12)
    white = (tt - tt.mean(-1, keepdim=True)) / torch.sqrt(tt.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(TokenSmoothL1Loss()(tp, tt), torch.nn.functional.smooth_l1_loss(tp, white, beta=2.0))
    assert torch.allclose(TokenSmoothL1Loss()(white, tt), torch.tensor(0.0), atol=1e-6)

    loss = AlignLoss(w_global=1.0, w_token=0.5, w_mse=2.0)
    parts = loss({"embed": p, "tokens": tp}, {"embed": t, "tokens": tt})
    assert torch.allclose(parts["loss"], parts["global"] + 0.5 * parts["token"] + 2.0 * parts["mse"])
    assert set(AlignLoss()({"embed": p, "tokens": None}, {"embed": t})) == {"global", "loss"}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        AlignLoss(0, 0, 0)

    s = cosine_schedule(100, 10, final=0.01)
    assert len(s) == 100 and s[0] == 0 and s[10] == 1 and abs(s[-1] - 0.01) < 1e-3 and (np.diff(s[10:]) <= 0).all()


def test_knn_faiss_and_torch_agree_and_split_is_stable():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 16, generator=g)
    b = a + 0.5 * torch.randn(60, 16, generator=g)
    ia, ib = knn_indices(a, 10, "faiss"), knn_indices(a, 10, "torch")
    assert all(set(x) == set(y) for x, y in zip(ia, ib))
    assert not any(i in row for i, row in enumerate(ia))
    for backend in ("faiss", "torch"):
        assert knn_agreement(a, a, 10, backend) == 1.0
    assert knn_agreement(a, b, 10, "faiss") == knn_agreement(a, b, 10, "torch") < 1.0
    assert knn_agreement(a[:1], b[:1]) is None

    keys = [f"img{i}.jpg" for i in range(2000)]
    m = heldout_mask(["src"] * 2000, keys, 0.1)
    assert 0.07 < m.mean() < 0.13
    assert (heldout_mask(["src"] * 1000, keys[1000:], 0.1) == m[1000:]).all()  # per key, not per position


def test_config_yaml_round_trip(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.01\nbatch-size: 4\nresolved: {ignored: true}\n")
    c = AlignConfig.from_yaml(tmp_path / "c.yaml", batch_size=2)
    assert (c.lr, c.batch_size, c.epochs) == (0.01, 2, 10)
    (tmp_path / "bad.yaml").write_text("lr: 0.01\nlearning_rate: 3\n")
    with pytest.raises(AlignError, match="unknown align config keys.*learning_rate"):
        AlignConfig.from_yaml(tmp_path / "bad.yaml")


def test_library_imports_without_typer_or_rich():
    code = ("import sys; sys.modules['typer'] = None; sys.modules['rich'] = None\n"
            "import cskd_cache, cskd_cache.stages.align, cskd_cache.models.students, cskd_cache.train.engine, cskd_cache.stages.align_eval\n"
            "from cskd_cache import load_encoder, open_cache\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cskd_cli.main", "align", "--cache", str(data / "cache"), "--student", "timm:test_resnet",
                        "--out", str(tmp_path / "run"), "--size", "32", "--epochs", "2", "--batch-size", "8",
                        "--num-workers", "0", "--eval-fraction", "0.3", "--log-every", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("cskd align ->") == 1  # one summary: rank 0 reports, rank 1 stays quiet
    run = tmp_path / "run"
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    train_rows = resolved["train_rows"]
    assert resolved["world_size"] == 2 and resolved["steps_per_epoch"] == train_rows // 2 // 8
    records = read_metrics(run / "metrics.jsonl")
    train_steps = [x["step"] for x in records if x["type"] == "train"]
    assert train_steps == list(range(1, 2 * resolved["steps_per_epoch"] + 1))  # logged once, not once per rank
    assert [x["epoch"] for x in records if x["type"] == "eval"] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert not list(run.glob("*.tmp")) and (run / "loss_curve.png").exists()
    assert cskd_cache.load_encoder(run, trust_code=True).grid_size == (1, 1)
