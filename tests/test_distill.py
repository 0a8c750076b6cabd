"""`cskd distill`: teachers and their predictions caches, learning, no val/test leakage, resume, CLI, torchrun.

Setup (module fixture): 60 labelled and 40 unlabelled noise-level images (tests/_iaa_task.py), a real feature cache
of both folders (2 views, a py: teacher), and a label file whose val/test entries partly point at byte-identical
copies outside the cache (they must still be recognised, by content, and kept out of training) and whose train
entries include images the cache never saw (they are read from disk). A small `cskd finetune` run serves as the
``run:`` teacher.
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
import yaml
from _crash import Crash, crash_in_second_epoch
from _iaa_task import make_images, write_labels
from typer.testing import CliRunner

import cskd_cache.models.scorer as iaa_model_mod
import cskd_cache.stages.teacher_predictions as predictions_mod
from cskd_cache.cache.reader import open_cache
from cskd_cache.data.datasets import CachedViews
from cskd_cache.data.images import file_digest, load_rgb
from cskd_cache.data.transforms import eval_tensor
from cskd_cache.data.views import render_tensor
from cskd_cache.labels import load_labels
from cskd_cache.models.cache_head import load_cache_head, predict_embeddings
from cskd_cache.models.scorer import load_iaa_model, save_iaa_model
from cskd_cache.errors import ModelError
from cskd_cache.stages.distill import DistillConfig, DistillError, run_distill
from cskd_cache.stages.extract import ExtractConfig, run_extract
from cskd_cache.stages.finetune import FinetuneConfig, run_finetune
from cskd_cache.stages.teacher_predictions import StalePredictions, default_predictions_dir, read_predictions
from cskd_cache.train.run_log import read_metrics

TESTS = Path(__file__).parent
TINY = "py:_iaa_task:tiny_student"
TIMING = {"img_s", "eval_s", "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    paths, scores = make_images(d / "lab", 60)
    make_images(d / "unl", 40, seed=1)
    extra, extra_scores = make_images(d / "extra", 4, seed=2)  # labelled, never extracted
    splits = [("train", "train", "train", "val", "test")[i % 5] for i in range(60)]
    (d / "copies").mkdir()
    label_paths = []
    for i, p in enumerate(paths):
        if splits[i] != "train" and i % 2 == 0:  # half of val/test: a renamed copy, linkable only by content
            label_paths.append(shutil.copy(p, d / "copies" / f"copy_{p.name}"))
        else:
            label_paths.append(p)
    all_paths = label_paths + extra
    all_scores = np.r_[scores, extra_scores]
    write_labels(d / "dist.csv", all_paths, all_scores, splits=splits + ["train"] * 4)
    write_labels(d / "score.csv", all_paths, all_scores, dist=False, splits=splits + ["train"] * 4)
    run_extract(ExtractConfig(teacher="py:_iaa_task:noise_teacher", out=str(d / "cache"),
                              images=[str(d / "lab"), str(d / "unl")], views=2, num_workers=0, shard_size=40))
    run_finetune(FinetuneConfig(model=TINY, labels=f"csv:{d / 'dist.csv'}", out=str(d / "teacher"), batch_size=8,
                                num_workers=0, max_steps=6, keep="last"))
    return d


def spy_items(monkeypatch, which) -> tuple[list, object]:
    """Record (dataset, index, item) of every item made by a CachedViews for which ``which(dataset)`` holds;
    returns (that list, the original maker)."""
    seen, orig = [], CachedViews._item

    def spy(self, index):
        it = orig(self, index)
        if which(self):
            seen.append((self, index, it))
        return it

    monkeypatch.setattr(CachedViews, "_item", spy)
    return seen, orig


def cfg(data, out, **kw) -> DistillConfig:
    base = dict(student=TINY, cache=str(data / "cache"), labels=f"csv:{data / 'dist.csv'}", out=str(out),
                batch_size=8, num_workers=0, max_steps=4, log_every=2, trust_code=True)  # its own py: runs
    base.update(kw)
    return DistillConfig(**base)


def _weights(run: Path, name: str = "iaa_model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(run / name)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_caches_made_alike_from_other_images_keep_their_own_predictions(data, tmp_path):
    """Same teacher, views and storage (equal fingerprints) over other images: each cache gets its own predictions
    directory, so alternating between them reuses both instead of recomputing over each other."""
    other = tmp_path / "cache-unl"
    run_extract(ExtractConfig(teacher="py:_iaa_task:noise_teacher", out=str(other), images=[str(data / "unl")],
                              views=2, num_workers=0, shard_size=40))
    a, b = open_cache(data / "cache"), open_cache(other)
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    teacher = tmp_path / "teacher"
    shutil.copytree(data / "teacher", teacher, ignore=shutil.ignore_patterns("checkpoints", "predictions"))
    assert default_predictions_dir(teacher, a) != default_predictions_dir(teacher, b)
    assert default_predictions_dir(teacher, a) == default_predictions_dir(teacher, open_cache(data / "cache"))
    r1 = run_distill(cfg(data, tmp_path / "a1", teacher=f"run:{teacher}", max_steps=1))
    r2 = run_distill(cfg(data, tmp_path / "b1", teacher=f"run:{teacher}", cache=str(other), max_steps=1,
                         labels_outside_cache=True))
    r3 = run_distill(cfg(data, tmp_path / "a2", teacher=f"run:{teacher}", max_steps=1))
    assert r1["teacher"]["computed"] and r2["teacher"]["computed"] and not r3["teacher"]["computed"]
    assert len(read_predictions(default_predictions_dir(teacher, b), b).arrays["logits"]) == len(b)


def no_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_cache_head_teacher_fits_and_predicts_every_cached_view(data, tmp_path):
    r = run_distill(cfg(data, tmp_path / "run", max_steps=2))
    tdir = tmp_path / "run" / "teacher"
    head, meta = load_cache_head(tdir)
    fit = meta["fit"]
    print(f"\ncache-head fit: {fit['images']} images x 2 views, {fit['steps']} steps in {fit['seconds']:.2f} s; "
          f"teacher val SRCC (view 0) {r['teacher']['val']['srcc']:.3f}")
    assert fit["images"] == 36 and fit["samples"] == 72  # the linked train labels (the 4 extra are not cached)
    assert r["teacher"]["computed"] and r["teacher"]["val"]["n"] == 12 and r["teacher"]["val"]["srcc"] > 0.4

    cache = open_cache(data / "cache")
    preds = read_predictions(tdir / "predictions", cache)
    logits = preds.arrays["logits"]
    assert logits.shape == (len(cache), 2, 10) and preds.kind == "distribution" and preds.scale == (1.0, 10.0)
    np.testing.assert_array_equal(logits, predict_embeddings(head, cache.embed))
    with torch.no_grad():  # by hand: L2-normalised cached embedding -> linear layer, for one row and view
        e = torch.from_numpy(cache.embed[17, 1].astype(np.float32))
        want = head.head.fc(e / e.norm())
    np.testing.assert_allclose(logits[17, 1], want.numpy(), rtol=1e-5, atol=1e-6)
    m = json.loads((tdir / "predictions" / "manifest.json").read_text())
    assert m["complete"] and m["feature_cache"]["fingerprint"] == cache.manifest["fingerprint"]
    assert m["teacher"]["kind"] == "cache-head" and m["arrays"]["logits"]["shape"] == [None, 2, 10]


def test_distill_learns_without_touching_val_or_test_images(data, tmp_path, monkeypatch):
    seen = []  # (stream, path, row) of every item a training dataset produced
    orig = CachedViews._item

    def spy(self, index):
        it = orig(self, index)
        stream = "unlabelled" if self.teacher else "labelled" if self.targets else "val"
        seen.append((stream, self.paths[it["index"]], it["row"]))
        return it

    monkeypatch.setattr(CachedViews, "_item", spy)
    r = run_distill(cfg(data, tmp_path / "run", student="timm:test_resnet", size=32, batch_size=16, max_steps=60,
                        lr=3e-3, log_every=10))
    start, best = r["initial"]["srcc"], r["val"]["srcc"]
    print(f"\ndistill val SRCC: step 0 {start:.3f} -> {best:.3f} (epoch {r['best_epoch']}); teacher "
          f"{r['teacher']['val']['srcc']:.3f}; {r['unlabelled_rows']} unlabelled rows, {r['heldout_rows']} held out")
    assert best > 0.7 and best > start + 0.4

    labels = load_labels(f"csv:{data / 'dist.csv'}")
    held = [lb for lb in labels.labels if lb.split in ("val", "test")]
    assert r["heldout_rows"] == len(held) == 24 and r["unlabelled_rows"] == 100 - 24
    assert r["link"] == {"by_path": 48, "by_content": 12, "unlinked": 4,
                         "first_unlinked": [str(data / "extra" / f"im00{i}.png") for i in range(4)]}
    held_digests = {file_digest(lb.path) for lb in held}
    train_streams = [(s, p, row) for s, p, row in seen if s != "val"]
    assert {s for s, _, _ in train_streams} == {"labelled", "unlabelled"}
    assert not {file_digest(p) for p in {p for _, p, _ in train_streams}} & held_digests
    assert {p for s, p, _ in seen if s == "val"} == {lb.path for lb in held if lb.split == "val"}
    # the 4 labelled images outside the cache come from disk (row -1), the others as cached views
    assert {p for s, p, row in train_streams if row < 0} <= {str(data / "extra" / f"im00{i}.png") for i in range(4)}
    assert all(row >= 0 for s, p, row in train_streams if s == "unlabelled")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    assert saved["heldout_rows"] == 24 and saved["streams"]["unlabelled"]["items"] == 76

    scorer = load_iaa_model(tmp_path / "run", trust_code=True)
    meta = json.loads((tmp_path / "run" / "iaa_model.json").read_text())
    assert meta["trained_by"] == "cskd distill" and meta["teacher"] == "cache-head"
    x = torch.stack([eval_tensor(load_rgb(data / "lab" / f"im00{i}.png"), scorer.input_cfg) for i in range(4)])
    out = scorer.score(x)
    assert out["score"].shape == (4,) and ((out["score"] >= 1) & (out["score"] <= 10)).all()


def test_jitter_views_shows_a_crop_inside_the_cached_view_against_its_targets(data, tmp_path, monkeypatch):
    from cskd_cache.data.transforms import augment_box

    seen, orig = spy_items(monkeypatch, lambda ds: bool(ds.teacher))  # (dataset, index, item) of every unlabelled item
    run_distill(cfg(data, tmp_path / "exact", jitter_views=False, max_steps=1))
    exact_items, seen[:] = list(seen), []
    assert exact_items and all(not ds.jitter for ds, _, _ in exact_items)
    for ds, index, it in exact_items:  # off: exactly the cached view
        row, v = it["row"], it["view"]
        c = ds.cfg
        want = render_tensor(load_rgb(ds.paths[it["index"]]), ds.boxes[row, v], c["size"], c["interpolation"],
                             c["mean"], c["std"])
        assert torch.equal(it["image"], want)
    run_distill(cfg(data, tmp_path / "run", max_steps=3))  # on by default
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["jitter_views"] is True
    cache = open_cache(data / "cache")
    logits = read_predictions(tmp_path / "run" / "teacher" / "predictions", cache).arrays["logits"]
    assert len(seen) == 3 * 8
    moved = 0
    for ds, index, it in seen:
        row, v = it["row"], it["view"]
        assert ds.jitter and row >= 0 and v == ds.view_of(row, index // ds.n)
        np.testing.assert_array_equal(it["logits"].numpy(), logits[row, v])  # the targets of the cached view
        exact = orig(CachedViews(ds.paths, ds.cfg, rows=ds.rows, boxes=ds.boxes, seed=ds.seed), index)["image"]
        assert torch.equal(orig(ds, index)["image"], it["image"])  # a pure function of (seed, cycle, item)
        moved += not torch.equal(exact, it["image"])
    assert moved >= 0.9 * len(seen)
    rng, box = np.random.default_rng(0), np.array([0.1, 0.2, 0.7, 0.9, 0.0], np.float32)
    for _ in range(200):  # the jittered box: inside the view, 80-100% of its area
        x0, y0, x1, y1, flip = augment_box(box, 300, 200, rng)
        assert box[0] - 1e-6 <= x0 < x1 <= box[2] + 1e-6 and box[1] - 1e-6 <= y0 < y1 <= box[3] + 1e-6
        area = (x1 - x0) * (y1 - y0) / ((box[2] - box[0]) * (box[3] - box[1]))
        assert 0.78 <= area <= 1.0 + 1e-6 and flip in (0.0, 1.0)


def test_run_teacher_predictions_are_written_once_reused_and_renewed(data, tmp_path, monkeypatch):
    teacher = data / "teacher"
    r1 = run_distill(cfg(data, tmp_path / "a", teacher=f"run:{teacher}", max_steps=2))
    cache = open_cache(data / "cache")
    pdir = default_predictions_dir(teacher, cache)
    assert r1["teacher"]["computed"] and r1["teacher"]["predictions"] == str(pdir)
    preds = read_predictions(pdir, cache)
    scorer = load_iaa_model(teacher, trust_code=True)
    c = scorer.input_cfg
    for row, view in ((0, 0), (33, 1), (99, 1)):  # each prediction is the teacher on exactly that cached view
        x = render_tensor(load_rgb(cache.row(row).path), cache.boxes[row, view], c["size"], c["interpolation"],
                          c["mean"], c["std"])
        with torch.no_grad():
            want = scorer.model(x[None])[0]
        np.testing.assert_allclose(preds.arrays["logits"][row, view], want.numpy(), rtol=1e-4, atol=1e-5)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher model must not run when its predictions are cached")

    with monkeypatch.context() as mp:
        mp.setattr(iaa_model_mod, "load_iaa_model", no_teacher)
        mp.setattr(predictions_mod, "run_teacher_compute", no_teacher)
        statuses = []
        r2 = run_distill(cfg(data, tmp_path / "b", teacher=f"run:{teacher}", max_steps=2), on_status=statuses.append)
    assert not r2["teacher"]["computed"] and any("reusing teacher predictions" in s for s in statuses)

    # The teacher changes (retrained into the same directory): its predictions are stale.
    changed = tmp_path / "teacher2"
    shutil.copytree(teacher, changed, ignore=shutil.ignore_patterns("checkpoints"))
    s = load_iaa_model(changed, trust_code=True)
    with torch.no_grad():
        s.model.head.fc.bias += 1.0
    meta = json.loads((changed / "iaa_model.json").read_text())
    save_iaa_model(changed, s.model.encoder._encoder[0], s.model.head, meta["head"], meta["labels"],
                   extra={k: v for k, v in meta.items() if k not in ("format", "version", "encoder", "head", "labels")})
    with pytest.raises(StalePredictions, match="teacher's weights or metadata changed.*--stale-predictions"):
        run_distill(cfg(data, tmp_path / "c", teacher=f"run:{changed}", max_steps=2, stale_predictions="error"))
    assert not (tmp_path / "c" / "config.yaml").exists()
    r3 = run_distill(cfg(data, tmp_path / "d", teacher=f"run:{changed}", max_steps=2))
    renewed = read_predictions(default_predictions_dir(changed, cache), cache)
    assert r3["teacher"]["computed"] and renewed.manifest["fingerprint"] != preds.manifest["fingerprint"]
    np.testing.assert_allclose(renewed.arrays["logits"], preds.arrays["logits"] + 1.0, atol=1e-4)
    assert not [p for p in (changed / "predictions").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_scalar_labels_and_teacher_mismatch(data, tmp_path):
    r = run_distill(cfg(data, tmp_path / "run", labels=f"csv:{data / 'score.csv'}", max_steps=4, w_plcc=0.2))
    assert r["head"] == "scalar" and load_iaa_model(tmp_path / "run", trust_code=True).head_kind == "scalar"
    preds = read_predictions(tmp_path / "run" / "teacher" / "predictions")
    assert preds.kind == "scalar" and preds.arrays["score"].shape == (100, 2)
    train = [x for x in read_metrics(tmp_path / "run" / "metrics.jsonl") if x["type"] == "train"]
    assert {"sup", "plcc", "distill"} <= train[-1].keys()
    with pytest.raises(DistillError, match="distribution head.*scalar head"):
        run_distill(cfg(data, tmp_path / "bad", labels=f"csv:{data / 'score.csv'}", teacher=f"run:{data / 'teacher'}"))
    with pytest.raises(FileNotFoundError, match="finished `cskd finetune` run"):
        run_distill(cfg(data, tmp_path / "bad2", teacher=f"run:{tmp_path}"))
    with pytest.raises(DistillError, match="--teacher 'clip'"):
        run_distill(cfg(data, tmp_path / "bad3", teacher="clip"))


def test_resume_reaches_the_same_weights(data, tmp_path):
    base = dict(max_steps=None, epochs=3, keep_checkpoints=0, batch_size=8, unlabelled_ratio=2.0, lambda_f=0.5,
                distill_loss="kl", temperature=2.0, consistency=0.5)  # every Stage II term on at once
    full = run_distill(cfg(data, tmp_path / "full", **base))
    assert full["steps_per_epoch"] == 76 // 16

    part = cfg(data, tmp_path / "part", **base)
    with pytest.raises(Crash):
        run_distill(part, on_progress=crash_in_second_epoch())
    with pytest.raises(DistillError, match="already holds a distill run; pass --resume"):
        run_distill(part)
    run_distill(DistillConfig(**{**part.to_dict(), "resume": True}))
    for name in ("iaa_model.safetensors", "checkpoints/epoch-0003/model.safetensors"):
        assert _same(_weights(tmp_path / "full", name), _weights(tmp_path / "part", name)), name
    ma, mb = (no_timing(read_metrics(tmp_path / x / "metrics.jsonl")) for x in ("full", "part"))
    assert ma == mb
    train = [r for r in ma if r["type"] == "train"]
    assert {"sup", "distill", "feat", "consistency"} <= train[-1].keys()


runner = CliRunner()


def test_cli_exit_codes_and_summary(data, tmp_path):
    from cskd_cli.main import app

    def ds(*args):
        return runner.invoke(app, ["distill", *map(str, args)], env={"COLUMNS": "220"})

    base = ["--student", TINY, "--labels", f"csv:{data / 'dist.csv'}", "--batch-size", "8", "--num-workers", "0"]
    r = ds(*base, "--cache", data / "cache", "--out", tmp_path / "run", "--max-steps", "2", "--no-jitter-views")
    assert r.exit_code == 0, r.output + r.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["jitter_views"] is False
    for text in ("cskd distill", "val/test rows left out", "24 (never trained on)", "labels not in the cache",
                 "4 (first:", "48 by path, 12 by content", "predictions computed"):
        assert text in r.output, text
    r = ds(*base, "--cache", data / "cache", "--out", tmp_path / "a", "--teacher", "clip")
    assert r.exit_code == 2 and "cache-head or run:TEACHER_RUN" in r.stderr
    r = ds(*base, "--cache", tmp_path / "nocache", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = ds(*base, "--cache", data / "cache", "--out", tmp_path / "c", "--teacher", f"run:{tmp_path / 'none'}")
    assert r.exit_code == 1 and "finished `cskd finetune` run" in r.stderr
    r = ds("--student", TINY, "--labels", "csv", "--cache", data / "cache", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "bad dataset spec" in r.stderr
    r = ds(*base, "--out", tmp_path / "e")
    assert r.exit_code == 2 and "--cache is required" in r.stderr
    assert not any((tmp_path / x).exists() for x in "abcde")


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cskd_cli.main", "distill", "--cache", str(data / "cache"), "--student", TINY,
                        "--labels", f"csv:{data / 'dist.csv'}", "--out", str(tmp_path / "run"), "--epochs", "2",
                        "--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--lambda-f", "0.5"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("cskd distill ->") == 1  # rank 0 reports, rank 1 stays quiet
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["steps_per_epoch"] == 76 // 2 // 8
    records = read_metrics(run / "metrics.jsonl")
    assert [x["step"] for x in records if x["type"] == "train"] == list(range(1, 2 * resolved["steps_per_epoch"] + 1))
    assert [x["epoch"] for x in records if x["type"] == "eval"] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert (run / "loss_curve.png").is_file()
    # both ranks wrote teacher predictions (shards 0 and 2 on rank 0, shard 1 on rank 1), rank 0 the manifest
    preds = read_predictions(run / "teacher" / "predictions", open_cache(data / "cache"))
    assert [s["rows"] for s in preds.manifest["shards"]] == [40, 40, 20] and preds.arrays["logits"].shape[0] == 100
    assert not [p for p in (run / "teacher").iterdir() if p.name.startswith(".")]
    assert load_iaa_model(run, trust_code=True).head_kind == "distribution"


def test_consistency_is_off_by_default_and_sees_two_jitters_of_one_cached_view(data, tmp_path, monkeypatch):
    assert DistillConfig().consistency == 0.0
    r = run_distill(cfg(data, tmp_path / "off", max_steps=2))
    train = [x for x in read_metrics(tmp_path / "off" / "metrics.jsonl") if x["type"] == "train"]
    assert r["step"] == 2 and all("consistency" not in x for x in train)
    with pytest.raises(DistillError, match="--consistency compares two jitters.*--jitter-views"):
        run_distill(cfg(data, tmp_path / "nojit", consistency=0.5, jitter_views=False))
    seen, orig = spy_items(monkeypatch, lambda ds: ds.pair)
    r = run_distill(cfg(data, tmp_path / "on", consistency=0.5, max_steps=2))
    assert r["step"] == 2 and seen
    for ds, index, it in seen:
        assert it["image2"].shape == it["image"].shape and not torch.equal(it["image2"], it["image"])
        again = orig(ds, index)
        assert torch.equal(again["image2"], it["image2"]) and torch.equal(again["image"], it["image"])
    train = [x for x in read_metrics(tmp_path / "on" / "metrics.jsonl") if x["type"] == "train"]
    assert all(x["consistency"] >= 0 for x in train)
    assert yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())["consistency"] == 0.5


def test_collaborative_rounds_make_each_student_the_next_teacher(data, tmp_path):
    from cskd_cache.stages.rounds import run_rounds

    said = []
    r = run_rounds(cfg(data, tmp_path / "run", rounds=2, max_steps=2), on_status=said.append)
    first = tmp_path / "run" / "rounds" / "round-1"
    assert [x["round"] for x in r["rounds"]] == [1, 2] and r["rounds"][1]["teacher"] == f"run:{first}"
    for d in (first, tmp_path / "run"):  # every round is a whole run: its metrics, checkpoints and model
        assert (d / "iaa_model.json").is_file() and (d / "metrics.jsonl").is_file() and (d / "checkpoints").is_dir()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["teacher"] == f"run:{first}" and saved["resolved"]["teacher"]["spec"] == f"run:{first}"
    assert list((first / "predictions").glob("*/manifest.json"))  # round 1's student scored every cached view once
    with pytest.raises(DistillError, match="already holds collaborative rounds; pass --resume"):
        run_rounds(cfg(data, tmp_path / "run", rounds=2, max_steps=2))
    said.clear()
    again = run_rounds(cfg(data, tmp_path / "run", rounds=2, max_steps=2, resume=True), on_status=said.append)
    assert any("round 1 of 2: finished already" in m for m in said) and again["step"] == 2
    with pytest.raises(DistillError, match="run through `stages.rounds.run_rounds`"):
        run_distill(cfg(data, tmp_path / "direct", rounds=2))


def test_refine_teacher_trains_the_teacher_again_on_labels_and_the_students_predictions(data, tmp_path):
    from cskd_cache.models.runs import build_encoder
    from cskd_cache.stages.rounds import run_rounds

    # a finetune run as an encoder spec: its encoder with the run's weights, without the head
    enc = build_encoder(f"run:{data / 'teacher'}", trust_code=True)
    saved = _weights(data / "teacher")
    mine = enc.model.state_dict()
    assert mine and all(torch.equal(mine[k], saved[f"encoder.model.{k}"]) for k in mine)

    teacher = f"run:{data / 'teacher'}"
    said = []
    r = run_rounds(cfg(data, tmp_path / "run", teacher=teacher, rounds=2, refine_teacher=True, max_steps=2),
                   on_status=said.append)
    rounds = tmp_path / "run" / "rounds"
    refined = yaml.safe_load((rounds / "teacher-2" / "config.yaml").read_text())
    assert refined["student"] == teacher and refined["teacher"] == f"run:{rounds / 'round-1'}"
    assert refined["lr_encoder"] == 3e-4 and refined["refine_teacher"] is False
    # the measured variant: the refined teacher learns its head afresh, not from the run it refines
    assert refined["head_init"] == "fresh" and refined["resolved"]["head_init"] == "fresh"
    final = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert final["teacher"] == f"run:{rounds / 'teacher-2'}"
    assert [x.get("refined_teacher") for x in r["rounds"]] == [None, str(rounds / "teacher-2"), None]
    said.clear()
    run_rounds(cfg(data, tmp_path / "run", teacher=teacher, rounds=2, refine_teacher=True, max_steps=2,
                   resume=True), on_status=said.append)
    assert any("refined already" in m for m in said)
    with pytest.raises(DistillError, match="--refine-teacher refines a run: teacher"):
        run_rounds(cfg(data, tmp_path / "head", rounds=2, refine_teacher=True))


def killed_and_resumed_equals_uninterrupted(data, tmp_path, **base) -> dict:
    """Train ``base`` whole and, in another run dir, killed in its second epoch then resumed: same weights.
    Returns the uninterrupted run's summary."""
    full = run_distill(cfg(data, tmp_path / "full", **base))
    part = cfg(data, tmp_path / "part", **base)
    with pytest.raises(Crash):
        run_distill(part, on_progress=crash_in_second_epoch())
    run_distill(DistillConfig(**{**part.to_dict(), "resume": True}))
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "part"))
    return full


def test_consistency_resumes_to_the_same_weights(data, tmp_path):
    killed_and_resumed_equals_uninterrupted(data, tmp_path, consistency=1.0, max_steps=None, epochs=2,
                                            keep_checkpoints=0)


def test_attention_distance_constraint_resumes_to_the_same_weights(data, tmp_path):
    base = dict(student="timm:test_vit", size=32, attn_distance=1.0, max_steps=None, epochs=2, keep_checkpoints=0)
    full = killed_and_resumed_equals_uninterrupted(data, tmp_path, **base)
    saved = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    ref = saved["resolved"]["attn_reference"]
    assert len(ref) >= 2 and all(r > 0 for r in ref) and full["step"] > 0
    train = [x for x in read_metrics(tmp_path / "full" / "metrics.jsonl") if x["type"] == "train"]
    assert all("attn_distance" in x for x in train)
    with pytest.raises(ModelError, match="needs a ViT-family student"):
        run_distill(cfg(data, tmp_path / "cnn", student="timm:test_resnet", size=32, attn_distance=1.0))



def test_label_views_eval_shows_each_labelled_image_its_eval_view_only(data, tmp_path, monkeypatch):
    """A label scores the whole picture: with ``label_views="eval"`` a labelled image shows its cached view 0 (the
    eval view), exactly when jitter is off; the default, "cached", shows its random crops too."""
    seen, _ = spy_items(monkeypatch, lambda ds: bool(ds.targets) and not ds.teacher)
    run_distill(cfg(data, tmp_path / "eval", jitter_views=False, max_steps=3, label_views="eval"))
    linked = [(ds, it) for ds, _, it in seen if it["row"] >= 0]
    assert len(linked) >= 20 and {it["view"] for _, it in linked} == {0}
    for ds, it in linked:
        c = ds.cfg
        want = render_tensor(load_rgb(ds.paths[it["index"]]), ds.boxes[it["row"], 0], c["size"], c["interpolation"],
                             c["mean"], c["std"])
        assert torch.equal(it["image"], want)
    seen[:] = []
    run_distill(cfg(data, tmp_path / "cached", jitter_views=False, max_steps=3))
    assert yaml.safe_load((tmp_path / "cached" / "config.yaml").read_text())["label_views"] == "cached"
    assert {it["view"] for _, _, it in seen if it["row"] >= 0} == {0, 1}
    with pytest.raises(DistillError, match="--label-views must be eval or cached"):
        run_distill(cfg(data, tmp_path / "bad", label_views="crops"))
    assert not (tmp_path / "bad").exists()


def test_a_run_made_before_label_views_resumes_as_it_ran(data, tmp_path):
    """A config.yaml without ``label_views`` was written by a run that showed every cached view, today's default:
    it resumes; asking it for eval views is refused, and the message names the value it ran with."""
    part = cfg(data, tmp_path / "old", max_steps=None, epochs=2, keep_checkpoints=0)
    with pytest.raises(Crash):
        run_distill(part, on_progress=crash_in_second_epoch())
    saved = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del saved["label_views"]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    other = DistillConfig(**{**part.to_dict(), "label_views": "eval", "resume": True})
    assert other.changed(saved) == ["label_views"] and part.changed(saved) == []
    with pytest.raises(DistillError, match=r"label_views: 'cached' -> 'eval'"):
        run_distill(other)
    assert run_distill(DistillConfig(**{**part.to_dict(), "resume": True}))["val"]["srcc"] is not None


def test_no_pool_labelled_keeps_the_teacher_to_images_without_a_label(data, tmp_path, monkeypatch):
    """By default the unlabelled stream holds every cache row but val/test ones, the labelled train images included;
    with ``pool_labelled`` off it holds only the images no label in use speaks for: here, exactly the 40 of unl/."""
    seen, _ = spy_items(monkeypatch, lambda ds: bool(ds.teacher))
    r = run_distill(cfg(data, tmp_path / "run", pool_labelled=False, max_steps=6))
    assert r["unlabelled_rows"] == 40
    shown = {ds.paths[it["index"]] for ds, _, it in seen}
    assert shown and all(Path(p).parent == data / "unl" for p in shown)
    part = cfg(data, tmp_path / "half", pool_labelled=False, label_fraction=0.5, max_steps=2)
    half = run_distill(part)["unlabelled_rows"]
    assert 40 < half < 76  # the train images whose labels the fraction drops are unlabelled again


BN_STUDENT = dict(student="timm:test_resnet", size=32)  # batch norm throughout, no dropout


def test_bn_stats_keeps_unlabelled_items_out_of_the_labelled_batch_statistics(data, tmp_path):
    """With no loss on the unlabelled items (lambda_u 0), their only way into the weights is batch norm: with
    ``bn_stats="labelled"`` how many of them a step holds changes nothing, weights and running statistics alike;
    with the default "joint" it does. A student without batch norm trains the same either way."""
    assert DistillConfig().bn_stats == "joint"
    base = dict(**BN_STUDENT, lambda_u=0.0, max_steps=4, keep="last")
    runs = {(bn, r): tmp_path / f"{bn}-{r}" for bn in ("joint", "labelled") for r in (1.0, 2.0)}
    for (bn, r), out in runs.items():
        run_distill(cfg(data, out, bn_stats=bn, unlabelled_ratio=r, **base))
    w = {k: _weights(v) for k, v in runs.items()}
    assert any("running_mean" in k for k in w["labelled", 1.0])
    assert _same(w["labelled", 1.0], w["labelled", 2.0])
    assert not _same(w["joint", 1.0], w["joint", 2.0])
    assert not _same(w["joint", 1.0], w["labelled", 1.0])
    # separate: the same batches as labelled, but the unlabelled one moves the running statistics too; what the
    # gradient sees (each batch's own statistics) is the same, so only the running statistics differ
    run_distill(cfg(data, tmp_path / "separate", bn_stats="separate", unlabelled_ratio=1.0, **base))
    sep, lab = _weights(tmp_path / "separate"), w["labelled", 1.0]
    running = {k for k in lab if "running_" in k}
    assert running and all(torch.equal(sep[k], lab[k]) for k in lab if k not in running and "num_batches" not in k)
    assert not any(torch.equal(sep[k], lab[k]) for k in running)
    run_distill(cfg(data, tmp_path / "tiny-j", lambda_u=1.0, max_steps=3, keep="last"))
    run_distill(cfg(data, tmp_path / "tiny-l", lambda_u=1.0, max_steps=3, keep="last", bn_stats="labelled"))
    assert _same(_weights(tmp_path / "tiny-j"), _weights(tmp_path / "tiny-l"))
    with pytest.raises(DistillError, match="--bn-stats must be joint, separate or labelled"):
        run_distill(cfg(data, tmp_path / "bad", bn_stats="unlabelled"))
    assert not (tmp_path / "bad").exists()


def _evals(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "eval"]


def test_a_scorer_run_as_student_starts_from_its_head_too_and_step_0_counts(data, tmp_path):
    """--student run:FINETUNE_RUN (--head-init auto) starts from the whole scorer, head included, and its step 0 is
    a candidate for --keep best: with an optimiser that cannot move the weights (encoder lr 0, head lr below
    float32's resolution) no later step beats it, and the kept model is the starting run's, bit for bit. With
    --head-init fresh the same run starts a new head, whose step 0 never counts."""
    start = data / "teacher"
    saved, start_val = _weights(start), json.loads((start / "iaa_model.json").read_text())["val"]["srcc"]
    still = dict(student=f"run:{start}", lr=1e-20, lr_encoder=0.0, max_steps=4, eval_every=2)
    r = run_distill(cfg(data, tmp_path / "warm", **still))
    evals = _evals(tmp_path / "warm")
    assert [e["epoch"] for e in evals] == [0, 1, 2] and evals[0]["srcc"] == start_val  # the same model, same val
    meta = json.loads((tmp_path / "warm" / "iaa_model.json").read_text())
    assert meta["step"] == 0 and r["best_epoch"] == 0 and _same(_weights(tmp_path / "warm"), saved)
    assert yaml.safe_load((tmp_path / "warm" / "config.yaml").read_text())["resolved"]["head_init"] == "run"

    run_distill(cfg(data, tmp_path / "fresh", head_init="fresh", **still))
    kept = _weights(tmp_path / "fresh")
    meta = json.loads((tmp_path / "fresh" / "iaa_model.json").read_text())
    assert meta["step"] == 2  # the first epoch's, never step 0's
    assert all(torch.equal(kept[k], saved[k]) for k in saved if k.startswith("encoder."))
    assert not all(torch.equal(kept[k], saved[k]) for k in saved if k.startswith("head."))
    assert yaml.safe_load((tmp_path / "fresh" / "config.yaml").read_text())["resolved"]["head_init"] == "fresh"

    # training that moves: the kept model is the first best of every evaluation, step 0 included
    run_distill(cfg(data, tmp_path / "moving", student=f"run:{start}", max_steps=6, eval_every=2))
    evals = _evals(tmp_path / "moving")
    best = max(evals, key=lambda e: e["srcc"])
    meta = json.loads((tmp_path / "moving" / "iaa_model.json").read_text())
    assert evals[0]["srcc"] == start_val and (meta["step"], meta["val"]["srcc"]) == (best["step"], best["srcc"])

    # finetune takes a scorer run the same way
    run_finetune(FinetuneConfig(model=f"run:{start}", labels=f"csv:{data / 'dist.csv'}", out=str(tmp_path / "ft"),
                                batch_size=8, num_workers=0, max_steps=2, lr=1e-20, lr_encoder=0.0, trust_code=True))
    assert _evals(tmp_path / "ft")[0]["srcc"] == start_val and _same(_weights(tmp_path / "ft"), saved)


def test_a_scorer_run_whose_head_cannot_serve_the_labels_is_refused(data, tmp_path):
    from cskd_cache.stages.finetune import FinetuneError

    start = f"run:{data / 'teacher'}"  # a distribution head of 10 bins
    with pytest.raises(DistillError, match=r"distribution head of 10 bins cannot start.*--head-init fresh"):
        run_distill(cfg(data, tmp_path / "bad", student=start, labels=f"csv:{data / 'score.csv'}"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FinetuneError, match="--model .*--head-init fresh"):
        run_finetune(FinetuneConfig(model=start, labels=f"csv:{data / 'score.csv'}", out=str(tmp_path / "bad-ft"),
                                    trust_code=True))
    assert not (tmp_path / "bad-ft").exists()
    with pytest.raises(DistillError, match="--head-init must be auto or fresh"):
        run_distill(cfg(data, tmp_path / "bad-v", student=start, head_init="teacher"))
    r = run_distill(cfg(data, tmp_path / "ok", student=start, labels=f"csv:{data / 'score.csv'}",
                        head_init="fresh", max_steps=2))
    assert r["head"] == "scalar"


def test_a_run_made_before_head_init_resumes_as_it_started(data, tmp_path):
    """A config.yaml without ``head_init`` was written by a run whose scorer-run student started with a fresh head:
    resumed under today's default (auto) it still does not count its step 0, as its uninterrupted twin did not
    (weights that cannot move make every evaluation tie, so only which ones count decides the kept epoch)."""
    still = dict(student=f"run:{data / 'teacher'}", lr=1e-20, lr_encoder=0.0, max_steps=None, epochs=3,
                 keep_checkpoints=0)
    full = run_distill(cfg(data, tmp_path / "full", head_init="fresh", **still))
    part = cfg(data, tmp_path / "old", head_init="fresh", **still)
    with pytest.raises(Crash):
        run_distill(part, on_progress=crash_in_second_epoch())
    saved = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del saved["head_init"], saved["resolved"]["head_init"]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    today = DistillConfig(**{**part.to_dict(), "head_init": "auto", "resume": True})
    assert today.changed(saved) == []
    resumed = run_distill(today)
    assert full["best_epoch"] == resumed["best_epoch"] == 1
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "old"))


def test_a_scorer_run_as_student_resumes_to_the_same_weights(data, tmp_path):
    killed_and_resumed_equals_uninterrupted(data, tmp_path, student=f"run:{data / 'teacher'}", max_steps=None,
                                            epochs=3, keep_checkpoints=0)


@pytest.mark.parametrize("mode", ["labelled", "separate"])
def test_bn_stats_resumes_to_the_same_weights(data, tmp_path, mode):
    killed_and_resumed_equals_uninterrupted(data, tmp_path, **BN_STUDENT, bn_stats=mode, consistency=1.0,
                                            lambda_f=0.5, max_steps=None, epochs=2, keep_checkpoints=0)


@pytest.mark.slow
def test_bn_stats_two_forwards_train_under_torchrun(data, tmp_path):
    """DDP sees two forwards before one backward with --bn-stats labelled: every rank finishes and one run comes out,
    with finite losses and running statistics that moved from their initial 0 / 1 (the labelled forward's)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cskd_cli.main", "distill", "--cache", str(data / "cache"), "--student",
                        "timm:test_resnet", "--size", "32", "--labels", f"csv:{data / 'dist.csv'}", "--out",
                        str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "8", "--num-workers", "0",
                        "--log-every", "1", "--bn-stats", "labelled", "--keep", "last"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["world_size"] == 2
    train = [x for x in read_metrics(run / "metrics.jsonl") if x["type"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3] and all(np.isfinite(x["loss"]) for x in train)
    w = _weights(run)
    means = [v for k, v in w.items() if k.endswith("running_mean")]
    assert means and all(torch.isfinite(v).all() for v in means) and any(v.abs().sum() > 0 for v in means)
