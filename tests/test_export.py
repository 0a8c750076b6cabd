"""`cskd export`: TorchScript and ONNX files of a ViT and a CNN scorer agree with PyTorch below --atol, the
reloaded file scores a real image as IAAScorer does, the sidecar says how to preprocess, and a failed parity
check exits non-zero and leaves no file behind."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from _imgs import make_images
from _scorers import make_model
from cskd_cli.main import app
from typer.testing import CliRunner

from cskd_cache.evaluate.export import bake_pos_embed
from cskd_cache.evaluate.scoring import load_eval_tensor
from cskd_cache.models.scorer import load_iaa_model

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    # the ViT runs at 64 px instead of its native 160: timm resamples its position embedding on every forward,
    # which has no ONNX operator, so this also covers bake_pos_embed
    vit = make_model(d / "vit", spec="timm:test_vit", size=64)
    cnn = make_model(d / "cnn", spec="timm:test_efficientnet", kind="scalar", bins=None, scale=(0, 100), size=64)
    photos = [str(p) for p in make_images(d / "photos", 3, seed=5)]
    return {"vit": vit, "cnn": cnn}, photos


def run_file(fmt: str, path, x: torch.Tensor) -> list[np.ndarray]:
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            return [t.numpy() for t in torch.jit.load(str(path))(x)]
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})


@pytest.mark.parametrize("name,fmt,static", [("vit", "torchscript", False), ("vit", "onnx", False),
                                             ("cnn", "torchscript", False), ("cnn", "onnx", True)])
def test_export_parity_and_reloaded_file_scores_like_pytorch(models, tmp_path, name, fmt, static):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    runs, photos = models
    out = tmp_path / f"model.{fmt}"
    args = ["export", "--model", str(runs[name]), "--format", fmt, "--out", str(out)]
    if static:
        args += ["--no-batch-size-dynamic", "--batch-size", "3"]
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "parity: max abs diff" in r.stdout
    side = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    scorer = load_iaa_model(runs[name])
    assert side["parity"]["max_abs_diff"] <= side["parity"]["atol"] == 1e-4
    assert len(side["parity"]["inputs"]) == (2 if static else 3)
    cfg = side["input_cfg"]
    assert {k: cfg[k] for k in ("size", "mean", "std", "interpolation")} == scorer.input_cfg
    assert (cfg["resize_mode"], cfg["crop_pct"]) == ("shortest", 1.0)
    dist = scorer.head_kind == "distribution"
    assert [o["name"] for o in side["outputs"]] == (["score", "dist"] if dist else ["score"])
    batch = 3 if static else "batch"
    assert side["inputs"] == [{"name": "image", "shape": [batch, 3, 64, 64], "dtype": "float32"}]
    assert side["labels"]["scale"] == scorer.meta["labels"]["scale"] and side["dynamic_batch"] is not static

    # the file as a deployer loads it, on real images preprocessed with the sidecar's input_cfg
    x = torch.stack([load_eval_tensor(p, cfg) for p in photos])
    got = run_file(fmt, out, x)
    ref = scorer.score(x)
    np.testing.assert_allclose(got[0], ref["score"].numpy(), atol=1e-4, rtol=0)
    if dist:
        np.testing.assert_allclose(got[1], ref["dist"].numpy(), atol=1e-5, rtol=0)
    if not static:  # any batch size
        np.testing.assert_allclose(run_file(fmt, out, x[:1])[0], ref["score"].numpy()[:1], atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, out.name + ".json"])


def test_failed_parity_exits_nonzero_and_leaves_no_file(models, tmp_path):
    pytest.importorskip("onnxruntime")
    runs, _ = models
    out = tmp_path / "model.onnx"
    # ONNX Runtime's kernels round differently from PyTorch's, so a zero tolerance cannot pass
    r = runner.invoke(app, ["export", "--model", str(runs["vit"]), "--format", "onnx", "--out", str(out),
                            "--atol", "0"], env={"COLUMNS": "300"})
    assert r.exit_code == 1
    assert "differs from PyTorch by" in r.stderr and "was not written" in r.stderr
    assert not list(tmp_path.iterdir())  # no model, no sidecar, no temporary file


def test_bake_pos_embed_keeps_outputs(models):
    runs, _ = models
    scorer = load_iaa_model(runs["vit"])
    x = torch.randn(2, 3, 64, 64)
    ref = scorer.model(x)
    assert bake_pos_embed(scorer.model, (64, 64)) == 1
    assert scorer.model.encoder.model.pos_embed.shape[1] == 1 + 4 * 4
    torch.testing.assert_close(scorer.model(x), ref, atol=1e-6, rtol=0)
    assert bake_pos_embed(scorer.model, (64, 64)) == 0


def test_usage_errors(models, tmp_path, monkeypatch):
    runs, _ = models
    r = runner.invoke(app, ["export", "--model", str(runs["cnn"]), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    r = runner.invoke(app, ["export", "--model", str(runs["cnn"]), "--format", "onnx", "--out",
                            str(tmp_path / "m.onnx")], env={"COLUMNS": "300"})
    assert r.exit_code == 1 and "pip install onnxruntime" in r.stderr
    assert not list(tmp_path.iterdir())


def test_help_lists_every_option_and_the_io_contract():
    r = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    for opt in ("--model", "--format", "--out", "--batch-size-dynamic", "--no-batch-size-dynamic", "--batch-size",
                "--opset", "--atol", "--seed", '"image"', '"score"', '"dist"'):
        assert opt in r.output, opt
