"""`cskd predict`: CSV/JSON scores equal IAAScorer.score on the same preprocessed images; folders are scanned
recursively; unreadable files are listed, never fatal; exit codes 0 / 1 (nothing scored) / 2 (bad --out)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _imgs import make_images
from _scorers import make_model
from cskd_cli.main import app
from typer.testing import CliRunner

from cskd_cache.evaluate.scoring import load_eval_tensor
from cskd_cache.models.scorer import load_iaa_model

runner = CliRunner()
TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    model = make_model(d / "run")
    imgs = make_images(d / "photos", 7)  # photos/set0, photos/set1
    imgs += make_images(d / "photos" / "deep" / "er", 2, seed=1, sub=False)
    (d / "photos" / "notes.txt").write_text("not an image, and not an image extension: never picked up")
    (d / "photos" / ".hidden.jpg").write_bytes(b"skipped: hidden")
    bad = d / "photos" / "set0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this jpeg ends here")
    return d, model, sorted(str(p) for p in imgs), str(bad)


def reference(model: Path, paths: list[str]) -> dict:
    scorer = load_iaa_model(model)
    out = scorer.score(torch.stack([load_eval_tensor(p, scorer.input_cfg) for p in paths]))
    return {k: (v.double().numpy() if v is not None else None) for k, v in out.items()}


def test_csv_matches_scorer_recurses_folders_and_lists_unreadable(setup, tmp_path):
    d, model, imgs, bad = setup
    out = tmp_path / "sub" / "scores.csv"
    r = runner.invoke(app, ["predict", "--model", str(model), str(d / "photos"), "--out", str(out),
                            "--batch-size", "4", "--num-workers", "1"])
    assert r.exit_code == 0, r.output
    assert "1 of 10 files could not be read" in r.stderr and "broken.jpg" in r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "score", "std"] + [f"d{k}" for k in range(1, 11)] + ["error"]
    assert sorted(r["path"] for r in rows) == sorted(imgs + [bad])  # recursive, images only, no hidden files
    by_path = {r["path"]: r for r in rows}
    assert by_path[bad]["error"].startswith("corrupt") and by_path[bad]["score"] == ""
    ref = reference(model, imgs)
    got = [by_path[p] for p in imgs]
    assert all(g["error"] == "" for g in got)
    np.testing.assert_allclose([float(g["score"]) for g in got], ref["score"], atol=1e-5, rtol=0)
    np.testing.assert_allclose([float(g["std"]) for g in got], ref["std"], atol=1e-5, rtol=0)
    np.testing.assert_allclose([[float(g[f"d{k}"]) for k in range(1, 11)] for g in got], ref["dist"], atol=1e-6)
    assert np.ptp(ref["score"]) > 0.1  # the images really get different scores
    assert not [p for p in out.parent.iterdir() if p.name != "scores.csv"]  # no temp file left behind


def test_json_matches_scorer_with_files_and_a_missing_path(setup, tmp_path):
    d, model, imgs, bad = setup
    out = tmp_path / "scores.JSON"
    files = imgs[:3]
    r = runner.invoke(app, ["predict", "--model", str(model), *files, files[0], str(d / "nope.png"),
                            "--out", str(out), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert (doc["format"], doc["head"], doc["scale"], doc["bins"]) == ("cskd-predictions", "distribution",
                                                                       [1.0, 10.0], 10)
    assert (doc["n_scored"], doc["n_failed"]) == (3, 1)
    preds = doc["predictions"]
    assert [p["path"] for p in preds] == files + [str(d / "nope.png")]  # a file named twice is scored once
    assert preds[-1]["error"].startswith("missing") and preds[-1]["score"] is None and preds[-1]["dist"] is None
    ref = reference(model, files)
    np.testing.assert_allclose([p["score"] for p in preds[:3]], ref["score"], atol=1e-5, rtol=0)
    np.testing.assert_allclose([p["std"] for p in preds[:3]], ref["std"], atol=1e-5, rtol=0)
    np.testing.assert_allclose([p["dist"] for p in preds[:3]], ref["dist"], atol=1e-6)
    assert all(p["error"] is None for p in preds[:3])


def test_scalar_head_has_score_column_only(setup, tmp_path):
    d, _, imgs, _ = setup
    model = make_model(tmp_path / "scalar", spec="timm:test_efficientnet", kind="scalar", bins=None, scale=(0, 100))
    out = tmp_path / "s.csv"
    r = runner.invoke(app, ["predict", "--model", str(model), *imgs[:2], "--out", str(out), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == ["path", "score", "error"]
    np.testing.assert_allclose([float(x["score"]) for x in rows], reference(model, imgs[:2])["score"], atol=1e-4)


def test_nothing_readable_exits_1_and_still_lists_the_errors(setup, tmp_path):
    """As a user runs it: a real process with a decode worker."""
    d, model, _, bad = setup
    out = tmp_path / "none.csv"
    env = dict(os.environ, PYTHONPATH=str(TESTS), COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", "predict", "--model", str(model), bad,
                        str(d / "photos" / "notes.txt"), "--out", str(out), "--num-workers", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "none of the 2 files could be scored" in r.stderr
    rows = list(csv.DictReader(open(out, newline="")))
    assert [x["error"].split(":")[0] for x in rows] == ["corrupt", "not-an-image"]


def test_bad_suffix_is_a_usage_error_and_writes_nothing(setup, tmp_path):
    _, model, imgs, _ = setup
    r = runner.invoke(app, ["predict", "--model", str(model), imgs[0], "--out", str(tmp_path / "scores.txt")],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 2 and ".csv or .json" in r.output
    assert not list(tmp_path.iterdir())
    r = runner.invoke(app, ["predict", "--model", str(tmp_path / "norun"), imgs[0], "--out", str(tmp_path / "a.csv")])
    assert r.exit_code == 1 and "iaa_model.json" in r.stderr and not list(tmp_path.iterdir())


def test_help_lists_every_option():
    r = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    for opt in ("--model", "--out", "--batch-size", "--num-workers", "--device", "paths..."):
        assert opt in r.output, opt


def test_plot_draws_the_score_distribution_beside_the_table(setup, tmp_path):
    from PIL import Image

    _, model, imgs, _ = setup
    out = tmp_path / "scores.csv"
    r = runner.invoke(app, ["predict", "--model", str(model), *imgs, "--out", str(out), "--num-workers", "0", "--plot"])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "scores.png") as im:
        assert im.width > 300 and len(im.getcolors(1 << 16) or range(1000)) > 10
    assert "scores.png" in r.output
    r = runner.invoke(app, ["predict", "--model", str(model), imgs[0], "--out", str(tmp_path / "b.csv"),
                            "--num-workers", "0"])
    assert r.exit_code == 0 and not (tmp_path / "b.png").exists()  # only when asked
