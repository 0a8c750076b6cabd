"""`cskd finetune`: learning, the run directory, the saved scorer, label fractions, resume, errors and the CLI.

The task (tests/_iaa_task.py) scores images by their pixel-noise level while brightness varies independently,
so an untrained network ranks val images by a nuisance; the labels are real csv files, the images real PNGs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from _crash import Crash, crash_in_second_epoch
from _iaa_task import make_images, write_labels
from safetensors.torch import load_file
from typer.testing import CliRunner

from cskd_cache.data.datasets import CachedViews, StepBatches
from cskd_cache.data.images import load_rgb
from cskd_cache.data.transforms import eval_tensor
from cskd_cache.evaluate.metrics import srcc
from cskd_cache.labels import load_labels
from cskd_cache.labels.targets import keep_fraction
from cskd_cache.models.scorer import load_iaa_model
from cskd_cache.stages.finetune import FinetuneConfig, FinetuneError, run_finetune
from cskd_cache.train.run_log import read_metrics
from cskd_cache.train.state_io import load_state

TINY = "py:_iaa_task:tiny_student"
TIMING = {"img_s", "eval_s", "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    paths, scores = make_images(d / "imgs", 60)
    write_labels(d / "dist.csv", paths, scores)
    write_labels(d / "score.csv", paths, scores, dist=False)
    # control: every train image gets another train image's label; val/test keep the truth
    splits = [("train", "train", "train", "val", "test")[i % 5] for i in range(60)]
    tr = np.array([i for i, s in enumerate(splits) if s == "train"])
    shuffled = scores.copy()
    shuffled[tr] = scores[tr[np.random.default_rng(0).permutation(len(tr))]]
    write_labels(d / "shuffled.csv", paths, shuffled)
    return d


def cfg(data, out, labels="dist.csv", **kw) -> FinetuneConfig:
    base = dict(model=TINY, labels=f"csv:{data / labels}", out=str(out), batch_size=8, num_workers=0, max_steps=6,
                log_every=2, trust_code=True)  # the tests' own py: runs
    base.update(kw)
    return FinetuneConfig(**base)


def no_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_finetune_learns_and_writes_a_scorer_evaluate_can_use(data, tmp_path):
    kw = dict(model="timm:test_resnet", size=32, batch_size=16, max_steps=150, lr=3e-3, log_every=10)
    real = run_finetune(cfg(data, tmp_path / "real", **kw))
    control = run_finetune(cfg(data, tmp_path / "control", labels="shuffled.csv", keep="last", **kw))
    start, best, ctrl = real["initial"]["srcc"], real["val"]["srcc"], control["val"]["srcc"]
    print(f"\nval SRCC: step 0 {start:.3f}, trained {best:.3f} (epoch {real['best_epoch']}, last "
          f"{real['val_last']['srcc']:.3f}), shuffled-label control (last) {ctrl:.3f}")
    assert control["initial"]["srcc"] == start  # same init and val set: only the train labels differ
    assert abs(start) < 0.5 and best > 0.8 and best > start + 0.5
    assert real["val_last"]["srcc"] > ctrl + 0.4

    run = tmp_path / "real"
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "iaa_model.json", "iaa_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == "timm:test_resnet" and saved["resolved"]["head"]["kind"] == "distribution"
    assert saved["resolved"]["keep"] == "best" and saved["resolved"]["train_labels_used"] == 36
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "eval"]
    spe = saved["resolved"]["steps_per_epoch"]
    assert [r["epoch"] for r in evals] == list(range(0, 150 // spe + 1))
    assert all(r["split"] == "val" and r["n"] == 12 and {"srcc", "plcc", "mae", "acc", "emd"} <= r.keys()
               for r in evals)
    assert max(evals[1:], key=lambda r: r["srcc"])["srcc"] == best  # kept: best by val SRCC

    # The saved scorer, fed the eval view (what evaluate/predict use), reproduces the kept epoch's val SRCC.
    scorer = load_iaa_model(run, trust_code=True)
    meta = json.loads((run / "iaa_model.json").read_text())
    assert meta["epoch"] == real["best_epoch"] and meta["eval_view"] == {"resize_mode": "shortest", "crop_pct": 1.0}
    val = load_labels(f"csv:{data / 'dist.csv'}").split("val")
    x = torch.stack([eval_tensor(load_rgb(p), scorer.input_cfg) for p in val.paths()])
    out = scorer.score(x)
    assert out["dist"].shape == (12, 10) and ((out["score"] >= 1) & (out["score"] <= 10)).all()
    assert srcc(val.scores(), out["score"].numpy()) == pytest.approx(best, abs=1e-9)


def test_scalar_head_on_score_only_labels(data, tmp_path):
    r = run_finetune(cfg(data, tmp_path / "run", labels="score.csv", max_steps=8, w_plcc=0.5, keep="last"))
    assert r["head"] == "scalar" and r["bins"] is None
    train = [x for x in read_metrics(tmp_path / "run" / "metrics.jsonl") if x["type"] == "train"]
    assert {"sup", "plcc", "loss"} <= train[-1].keys()
    scorer = load_iaa_model(tmp_path / "run", trust_code=True)
    assert scorer.head_kind == "scalar" and scorer.scale == pytest.approx((1.0, 10.0), abs=1e-3)
    with pytest.raises(FinetuneError, match="no vote distributions.*--head scalar"):
        run_finetune(cfg(data, tmp_path / "bad", labels="score.csv", head="distribution"))


def test_starts_from_an_aligned_run(data, tmp_path):
    from cskd_cache.models.runs import save_encoder
    from cskd_cache.models.students import build_student

    torch.manual_seed(5)
    aligned = build_student(TINY)
    save_encoder(aligned, tmp_path / "align")  # what `cskd align` leaves: student.json + student.safetensors
    run_finetune(cfg(data, tmp_path / "run", model=f"run:{tmp_path / 'align'}", max_steps=1, lr=1e-12,
                     keep="last"))
    meta = json.loads((tmp_path / "run" / "iaa_model.json").read_text())
    assert meta["encoder"]["spec"] == TINY  # the base architecture, rebuildable anywhere
    w = load_file(tmp_path / "run" / "iaa_model.safetensors")
    for k, v in aligned.model.state_dict().items():
        torch.testing.assert_close(w["encoder.model." + k], v, atol=1e-8, rtol=0)
    with pytest.raises(FinetuneError, match=r"keeps the input size it was trained at \(32x32\), not 48x48") as e:
        run_finetune(cfg(data, tmp_path / "sized", model=f"run:{tmp_path / 'align'}", size=48))
    assert str(e.value).count(f"run:{tmp_path / 'align'}") == 1  # named once, by the flag that carried it
    # the size it was trained at is no change: a script that passes one --size to every stage still runs
    run_finetune(cfg(data, tmp_path / "same", model=f"run:{tmp_path / 'align'}", size=32, max_steps=1))


def test_label_fraction_is_stable_nested_and_used(data, tmp_path):
    train = load_labels(f"csv:{data / 'dist.csv'}").split("train")
    tenth, half = keep_fraction(train, 0.1, 0), keep_fraction(train, 0.5, 0)
    assert set(tenth.keys()) < set(half.keys()) < set(train.keys())
    assert keep_fraction(train, 0.5, 0).keys() == half.keys() and keep_fraction(train, 0.5, 1).keys() != half.keys()
    assert 0.3 < len(half) / len(train) < 0.7
    r = run_finetune(cfg(data, tmp_path / "run", label_fraction=0.5, max_steps=2))
    assert (r["train_labels"], r["train_labels_total"]) == (len(half), 36)


def test_step_batches_are_a_function_of_the_step():
    a = StepBatches(10, 4, seed=3, start=0, total=12)
    full = list(a)
    assert list(StepBatches(10, 4, seed=3, start=5, total=12)) == full[5:]
    seen = [i % 10 for b in full[:5] for i in b]  # 20 positions = exactly two passes, each a permutation
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert [i // 10 for i in full[2]] == [0, 0, 1, 1]  # step 2 spans the end of pass 0 and the start of pass 1
    r0 = [i % 10 for b in StepBatches(10, 2, 3, 0, 5, rank=0, world=2) for i in b]
    r1 = [i % 10 for b in StepBatches(10, 2, 3, 0, 5, rank=1, world=2) for i in b]
    assert not set(r0[:4]) & set(r1[:4])  # ranks split each pass
    ds = CachedViews(["a.png"], {"size": [8, 8]})
    assert ds.view_of(0, 0) == 0  # disk images have one (eval) view


def test_resume_reaches_the_same_weights(data, tmp_path):
    base = dict(max_steps=None, epochs=3, keep_checkpoints=0, batch_size=8)
    run_finetune(cfg(data, tmp_path / "full", **base))

    part = cfg(data, tmp_path / "part", **base)
    with pytest.raises(Crash):
        run_finetune(part, on_progress=crash_in_second_epoch())
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["epoch-0001"]
    with pytest.raises(FinetuneError, match="already holds a finetune run; pass --resume"):
        run_finetune(part)
    with pytest.raises(FinetuneError, match="different settings.*lr"):
        run_finetune(FinetuneConfig(**{**part.to_dict(), "resume": True, "lr": 0.5}))
    statuses = []
    run_finetune(FinetuneConfig(**{**part.to_dict(), "resume": True}), on_status=statuses.append)
    assert any("resuming" in s and "epoch-0001" in s for s in statuses)
    for name in ("iaa_model.safetensors", "checkpoints/epoch-0003/model.safetensors"):
        wa, wb = load_file(tmp_path / "full" / name), load_file(tmp_path / "part" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ma, mb = (no_timing(read_metrics(tmp_path / x / "metrics.jsonl")) for x in ("full", "part"))
    assert ma == mb


def test_eval_every_schedules_validation_by_steps_whatever_the_label_count(data, tmp_path):
    # 10% of the train labels is 3 steps per pass at batch 8, all of them 4x as many: with --eval-every the
    # validation and checkpoint steps are the same at both counts, and a kill between them resumes identically.
    steps = {}
    for fraction in (0.1, 1.0):
        out = tmp_path / f"f{fraction}"
        s = run_finetune(cfg(data, out, max_steps=10, eval_every=4, label_fraction=fraction))
        evals = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
        steps[fraction] = [r["step"] for r in evals]
        assert s["step"] == 10 and sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "epoch-0003"
        assert yaml.safe_load((out / "config.yaml").read_text())["resolved"]["steps_per_epoch"] == 4
    assert steps[0.1] == steps[1.0] == [0, 4, 8, 10]
    part = cfg(data, tmp_path / "part", max_steps=10, eval_every=4, keep_checkpoints=0)
    with pytest.raises(Crash):
        run_finetune(part, on_progress=crash_in_second_epoch())
    run_finetune(FinetuneConfig(**{**part.to_dict(), "resume": True}))
    wa, wb = (load_file(tmp_path / x / "iaa_model.safetensors") for x in ("f1.0", "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(FinetuneError, match="--eval-every must be >= 1"):
        run_finetune(cfg(data, tmp_path / "bad", eval_every=0))


def test_model_ema_follows_its_formula():
    from cskd_cache.train.ema import ModelEma

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(m, 0.5)
    w0 = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
        m[1].running_mean.fill_(4.0)
        m[1].num_batches_tracked += 3
    ema.update(m, 1)  # warm-up: d = min(0.5, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * w0 + (1 - d) * (w0 + 1))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), (1 - d) * 4.0))
    assert int(ema.module[1].num_batches_tracked) == 3 and not ema.module[0].weight.requires_grad
    before = ema.module[0].weight.clone()
    ema.update(m, 1000)  # past the warm-up: d = decay
    assert torch.allclose(ema.module[0].weight, 0.5 * before + 0.5 * (w0 + 1))
    with pytest.raises(ValueError, match="decay"):
        ModelEma(m, 1.0)


def test_ema_weights_are_the_ones_validated_saved_and_resumed(data, tmp_path):
    base = dict(max_steps=None, epochs=3, keep_checkpoints=0, batch_size=8, ema=0.9, keep="last")
    run_finetune(cfg(data, tmp_path / "full", **base))
    last = tmp_path / "full" / "checkpoints" / "epoch-0003"
    averaged = load_state(last)["ema"]["module"]
    raw = load_file(last / "model.safetensors")
    saved = load_file(tmp_path / "full" / "iaa_model.safetensors")
    assert saved.keys() <= averaged.keys() and all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved if raw[k].is_floating_point())
    # the val line of the last epoch scores the saved (averaged) model, as evaluate will
    scorer = load_iaa_model(tmp_path / "full", trust_code=True)
    last_val = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["type"] == "eval"][-1]
    val = load_labels(f"csv:{data / 'dist.csv'}").split("val")
    out = scorer.score(torch.stack([eval_tensor(load_rgb(p), scorer.input_cfg) for p in val.paths()]))
    assert srcc(val.scores(), out["score"].numpy()) == pytest.approx(last_val["srcc"], abs=1e-9)


    part = cfg(data, tmp_path / "part", **base)
    with pytest.raises(Crash):
        run_finetune(part, on_progress=crash_in_second_epoch())
    run_finetune(FinetuneConfig(**{**part.to_dict(), "resume": True}))
    wa, wb = (load_file(tmp_path / x / "iaa_model.safetensors") for x in ("full", "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(FinetuneError, match="--ema"):
        run_finetune(cfg(data, tmp_path / "bad", ema=1.0))


def test_nan_guard_and_bad_inputs(data, tmp_path, monkeypatch):
    from cskd_cache.train.engine import NonFiniteLoss

    orig = CachedViews.__getitems__

    def poisoned(self, indices):  # one NaN target in the second pass over the train labels
        items = orig(self, indices)
        if "dist" in items[0] and indices[0] >= len(self):
            items[0]["dist"][0] = float("nan")
        return items

    monkeypatch.setattr(CachedViews, "__getitems__", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+ .*=nan.*--lr-encoder"):
        run_finetune(cfg(data, tmp_path / "nan", max_steps=20))
    ckpts = sorted((tmp_path / "nan" / "checkpoints").glob("epoch-*"))
    assert [p.name for p in ckpts] == ["epoch-0001"]  # the epoch before the NaN, with finite weights
    assert all(torch.isfinite(t).all() for t in load_file(ckpts[0] / "model.safetensors").values())
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_finetune(cfg(data, tmp_path / "x", labels="nope.csv"))
    with pytest.raises(FinetuneError, match="no train labels left"):
        (data / "only_val.csv").write_text("path,score,split\nimgs/im000.png,3,val\nimgs/im001.png,4,val\n")
        run_finetune(cfg(data, tmp_path / "y", labels="only_val.csv"))
    with pytest.raises(FinetuneError, match="--model is required"):
        run_finetune(cfg(data, tmp_path / "z", model=""))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


runner = CliRunner()


def test_cli_exit_codes_and_summary(data, tmp_path):
    from cskd_cli.main import app

    def ft(*args):
        return runner.invoke(app, ["finetune", *map(str, args)], env={"COLUMNS": "200"})

    base = ["--model", TINY, "--batch-size", "8", "--num-workers", "0"]
    r = ft(*base, "--labels", f"csv:{data / 'dist.csv'}", "--out", tmp_path / "run", "--max-steps", "4")
    assert r.exit_code == 0, r.output + r.stderr
    assert "cskd finetune" in r.output and "val SRCC / PLCC" in r.output and "val SRCC at step 0" in r.output
    r = ft(*base, "--labels", "mystery:/x", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "bad dataset spec" in r.stderr
    r = ft(*base, "--labels", f"csv:{data / 'nope.csv'}", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "nope.csv does not exist" in r.stderr and "Traceback" not in r.stderr
    r = ft(*base, "--labels", f"csv:{data / 'dist.csv'}", "--out", tmp_path / "c", "--epochs", "2", "--max-steps", "2")
    assert r.exit_code == 2 and "not both" in r.stderr
    r = ft("--model", "resnet18", "--labels", f"csv:{data / 'dist.csv'}", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "timm:MODEL" in r.stderr
    r = ft(*base, "--labels", f"csv:{data / 'dist.csv'}", "--out", tmp_path / "e", "--keep", "median")
    assert r.exit_code == 2 and "--keep" in r.stderr
    r = ft(*base, "--labels", f"csv:{data / 'dist.csv'}", "--out", tmp_path / "run", "--max-steps", "4")
    assert r.exit_code == 1 and "--resume" in r.stderr
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_every_config_field_is_a_flag_with_help_and_the_same_default(data, tmp_path):
    import dataclasses

    import typer.main
    from cskd_cli.main import app

    from cskd_cache.stages.distill import DistillConfig

    commands = typer.main.get_command(app).commands
    for name, cls in (("finetune", FinetuneConfig), ("distill", DistillConfig)):
        fields = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                  for f in dataclasses.fields(cls)}
        params = {p.name: p for p in commands[name].params if p.name not in ("ctx", "config") and not p.hidden}
        assert set(params) == set(fields), name
        for p in params.values():
            assert p.help, (name, p.name)
            assert p.default == fields[p.name] or (p.default in ((), [], None) and fields[p.name] in ([], None, "")), \
                (name, p.name)

    (tmp_path / "c.yaml").write_text(f"model: {TINY}\nlabels: csv:{data / 'dist.csv'}\nlr: 0.002\nbatch-size: 6\n"
                                     "max_steps: 100\nnum_workers: 0\n")
    r = CliRunner().invoke(app, ["finetune", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"),
                                 "--max-steps", "2", "--batch-size", "4"])
    assert r.exit_code == 0, r.output + r.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["model"], saved["lr"], saved["batch_size"], saved["max_steps"]) == (TINY, 0.002, 4, 2)
    (tmp_path / "bad.yaml").write_text("learning_rate: 3\n")
    r = CliRunner().invoke(app, ["finetune", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown finetune config keys" in r.stderr


def test_library_imports_without_typer_or_rich():
    code = ("import sys; sys.modules['typer'] = None; sys.modules['rich'] = None\n"
            "import cskd_cache.stages.finetune, cskd_cache.stages.distill, cskd_cache.labels.link, cskd_cache.stages.teacher_predictions\n"
            "import cskd_cache.data.datasets, cskd_cache.models.cache_head, cskd_cache.stages.iaa_task\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
