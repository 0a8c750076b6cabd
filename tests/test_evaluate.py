"""`cskd evaluate`: metrics equal a direct computation (the scorer on the same images + cskd_cache.evaluate.metrics),
bootstrap intervals bracket the estimate, the scatter plot is a real PNG, missing/unreadable images are counted
and left out, never fatal; a model trained on another scale gets only the correlations."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from _imgs import make_images
from _scorers import make_model
from cskd_cli.main import app
from PIL import Image
from typer.testing import CliRunner

from cskd_cache.evaluate import metrics as M
from cskd_cache.evaluate.evaluate import EvalConfig, run_evaluate
from cskd_cache.evaluate.scoring import load_eval_tensor
from cskd_cache.models.scorer import load_iaa_model

runner = CliRunner()
N_BOOT = 200


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A csv: dataset with 10-bin vote histograms: 14 test rows (one image missing, one corrupt), 3 train rows."""
    d = tmp_path_factory.mktemp("evaluate")
    model = make_model(d / "run")
    imgs = make_images(d / "images", 17)
    (d / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rng = np.random.default_rng(0)
    rows = [(p.relative_to(d).as_posix(), "test" if i < 12 else "train") for i, p in enumerate(imgs)]
    rows += [("images/gone.jpg", "test"), ("images/broken.png", "test")]
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "dist", "split"])
        for path, split in rows:
            w.writerow([path, ";".join(str(v) for v in rng.integers(1, 30, 10)), split])
    return d, model


def test_metrics_equal_direct_computation(data, tmp_path):
    d, model = data
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--labels", f"csv:{d / 'labels.csv'}", "--out",
                            str(out), "--bootstrap", str(N_BOOT), "--seed", "3", "--num-workers", "1",
                            "--batch-size", "5"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    # one summary line for both skipped images, and the table
    assert "2 of 14 test images left out of the metrics (1 missing, 1 unreadable" in r.stderr
    assert "SRCC" in r.stdout and "PLCC" in r.stdout and "EMD" in r.stdout

    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_labels"], m["n_missing"], m["n_unreadable"]) == (12, 14, 1, 1)
    assert {s["key"]: s["reason"].split(":")[0] for s in m["skipped"]} == {"images/gone.jpg": "missing",
                                                                           "images/broken.png": "corrupt"}

    # the same thing computed by hand: labels from the file, scores from the scorer, metrics from cskd_cache.evaluate.metrics
    with open(d / "labels.csv", newline="") as f:
        rows = [x for x in csv.DictReader(f) if x["split"] == "test" and "images/set" in x["path"]]
    votes = np.array([[float(v) for v in x["dist"].split(";")] for x in rows])
    dist_true = votes / votes.sum(1, keepdims=True)
    y_true = dist_true @ np.arange(1, 11)
    scorer = load_iaa_model(model)
    out_ref = scorer.score(torch.stack([load_eval_tensor(d / x["path"], scorer.input_cfg) for x in rows]))
    y_pred = out_ref["score"].double().numpy()
    assert np.ptp(y_pred) > 0.1
    assert m["srcc"] == pytest.approx(M.srcc(y_true, y_pred), abs=1e-6)
    assert m["plcc"] == pytest.approx(M.plcc(y_true, y_pred), abs=1e-6)
    assert m["mae"] == pytest.approx(M.mae(y_true, y_pred), abs=1e-5)
    assert m["acc"] == pytest.approx(M.binary_accuracy(y_true, y_pred, m["threshold"]))
    assert m["emd"] == pytest.approx(M.emd(dist_true, out_ref["dist"].double().numpy()), abs=1e-6)
    assert m["threshold"] == 5.5 and m["bins"] == m["model_bins"] == 10 and m["notes"] == []
    # intervals: the seeded bootstrap of cskd_cache.evaluate.metrics, and they bracket the point estimate
    for key, fn in (("srcc", M.srcc), ("plcc", M.plcc)):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi and lo < hi
        np.testing.assert_allclose([lo, hi], M.bootstrap_ci(fn, y_true, y_pred, N_BOOT, seed=3), atol=1e-6)
    assert m["bootstrap"] == {"n": N_BOOT, "alpha": 0.05, "seed": 3}

    with open(out / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == ["key", "path", "true", "pred"]
    assert [p["key"] for p in preds] == [x["path"] for x in rows]
    np.testing.assert_allclose([float(p["true"]) for p in preds], y_true, atol=1e-12)
    np.testing.assert_allclose([float(p["pred"]) for p in preds], y_pred, atol=1e-5)

    png = (out / "scatter.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "scatter.png") as im:
        im.load()
        assert im.width > 300 and im.height > 300 and len(im.getcolors(1 << 16) or range(1000)) > 10
    # with vote histograms on both sides (EMD computed) the per-bin confusion is drawn too
    confusion = ["confusion.png"] if "emd" in json.loads((out / "metrics.json").read_text()) else []
    assert sorted(p.name for p in out.iterdir()) == [*confusion, "metrics.json", "predictions.csv", "scatter.png"]
    for name in confusion:
        with Image.open(out / name) as im:
            assert im.width > 300 and len(im.getcolors(1 << 16) or range(1000)) > 10


def test_scalar_model_on_another_scale_reports_correlations_only(data, tmp_path):
    d, _ = data
    model = make_model(tmp_path / "scalar", spec="timm:test_efficientnet", kind="scalar", bins=None, scale=(0, 1))
    res = run_evaluate(EvalConfig(model=str(model), labels=f"csv:{d / 'labels.csv'}", out=str(tmp_path / "e"),
                                  bootstrap=0, num_workers=0))
    m = res.metrics
    assert m["n"] == 12 and "srcc" in m and "plcc" in m
    assert not {"mae", "acc", "emd", "srcc_ci", "plcc_ci"} & set(m)
    assert m["model_scale"] == [0.0, 1.0] and m["scale"] == [1.0, 10.0] and "different units" in m["notes"][0]


def test_too_few_images_fails_cleanly_without_output(data, tmp_path):
    d, model = data
    (tmp_path / "labels.csv").write_text("path,score,split\nmissing1.jpg,3,test\nmissing2.jpg,4,test\n"
                                         "missing3.jpg,5,train\n")
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--labels", f"csv:{tmp_path / 'labels.csv'}",
                            "--out", str(tmp_path / "e"), "--num-workers", "0"])
    assert r.exit_code == 1 and "only 0 of 2 images could be scored" in r.stderr
    assert not (tmp_path / "e").exists()
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--labels", f"csv:{tmp_path / 'labels.csv'}",
                            "--out", str(tmp_path / "e"), "--split", "val"])
    assert r.exit_code == 1 and "no 'val' labels" in r.stderr
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--labels", f"csv:{tmp_path / 'labels.csv'}",
                            "--out", str(tmp_path / "e"), "--split", "dev"])
    assert r.exit_code == 2


def test_help_lists_every_option():
    r = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"})
    for opt in ("--model", "--labels", "--split", "--out", "--label-image-root", "--batch-size", "--num-workers",
                "--bootstrap", "--seed", "--device"):
        assert opt in r.output, opt


def test_group_by_resamples_source_photos_together(data, tmp_path):
    d, model = data
    args = ["evaluate", "--model", str(model), "--labels", f"csv:{d / 'labels.csv'}", "--num-workers", "0",
            "--bootstrap", "200"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "g"), "--group-by", r"^images/(set\d+)/"])
    assert r.exit_code == 0, r.output + r.stderr
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert m["bootstrap"]["group_by"] == r"^images/(set\d+)/" and m["bootstrap"]["groups"] >= 2
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert plain.exit_code == 0
    p = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert p["srcc"] == m["srcc"] and p["srcc_ci"] != m["srcc_ci"]  # same point estimate, other resampling
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--group-by", "^nomatch"])
    assert r.exit_code == 1 and "does not match the label key" in r.stderr and not (tmp_path / "bad").exists()


def test_group_by_a_label_column_resamples_its_groups_and_records_them(data, tmp_path):
    d, model = data
    # the same rows as labels.csv, plus a source-photo column that pairs the images up; one row lacks it
    with open(d / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        r["photo"] = f"p{i // 2}"
    args = ["evaluate", "--model", str(model), "--num-workers", "0", "--bootstrap", "200"]
    grouped = d / "grouped.csv"

    def write(rows):
        with open(grouped, "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "dist", "split", "photo"])
            w.writeheader()
            w.writerows(rows)

    write(rows)
    r = runner.invoke(app, [*args, "--labels", f"csv:{grouped}", "--out", str(tmp_path / "c"),
                            "--group-by", "column:photo"])
    assert r.exit_code == 0, r.output + r.stderr
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    with open(tmp_path / "c" / "predictions.csv", newline="") as f:
        pred = list(csv.DictReader(f))
    by_key = {x["path"]: x["photo"] for x in rows}  # the key is the path as written
    assert [p["group"] for p in pred] == [by_key[p["key"]] for p in pred]
    assert m["bootstrap"]["groups"] == len({p["group"] for p in pred}) < len(pred)
    # the interval is the cluster bootstrap's over those groups, computed from the written predictions
    t, y = np.array([float(p["true"]) for p in pred]), np.array([float(p["pred"]) for p in pred])
    lo, hi = M.bootstrap_ci(M.srcc, t, y, n=200, seed=0, groups=[p["group"] for p in pred])
    assert m["srcc_ci"] == pytest.approx([lo, hi])

    rows[3]["photo"] = ""
    write(rows)
    r = runner.invoke(app, [*args, "--labels", f"csv:{grouped}", "--out", str(tmp_path / "bad"),
                            "--group-by", "column:photo"])
    assert r.exit_code == 1 and "has no 'photo' value" in r.stderr and str(grouped) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_paired_comparison_resamples_the_recorded_column_groups():
    from cskd_cache.errors import EvaluateError
    from cskd_cache.evaluate.evaluate import group_keys
    from cskd_cache.inspect.compare import paired_srcc

    rng = np.random.default_rng(1)
    keys = [f"k{i}" for i in range(40)]
    truth = rng.normal(size=40)
    a = {k: (t, t + rng.normal(), f"g{i // 10}") for i, (k, t) in enumerate(zip(keys, truth))}
    b = {k: (t, t + 0.1 * rng.normal(), f"g{i // 10}") for i, (k, t) in enumerate(zip(keys, truth))}
    grouped = paired_srcc(a, b, 200, 0, "column:photo")
    plain = paired_srcc(a, b, 200, 0)
    assert grouped["groups"] == 4 and grouped["diff"] == plain["diff"] and grouped["ci"] != plain["ci"]
    with pytest.raises(EvaluateError, match="evaluate again with --group-by 'column:photo'"):
        group_keys(keys, "column:photo", {k: "g" for k in keys[:-1]})
