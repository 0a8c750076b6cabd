"""`cskd align` as a command: options and their defaults, --config merging, exit codes and messages.

Runs the Typer app in-process (typer.testing.CliRunner); the multi-process path is in test_align.py (torchrun).
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from _imgs import make_images
from cskd_cli.main import app
from typer.testing import CliRunner

from cskd_cache.stages.align import AlignConfig
from cskd_cache.stages.extract import ExtractConfig, run_extract

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("align_cli")
    make_images(d / "imgs", 20)
    common = dict(teacher="py:toy_teacher:make", images=[str(d / "imgs")], views=2, num_workers=0)
    run_extract(ExtractConfig(out=str(d / "cache"), **common))
    run_extract(ExtractConfig(out=str(d / "notok"), tokens=False, **common))
    return d


def align(*args):
    return runner.invoke(app, ["align", *map(str, args)])


def small(caches, out, *extra, cache="cache"):
    return ["--cache", caches / cache, "--student", "timm:test_resnet", "--out", out, "--size", "32",
            "--batch-size", "4", "--num-workers", "0", "--eval-fraction", "0.2", *extra]


def test_every_option_has_help_and_the_config_defaults():
    import typer.main

    command = typer.main.get_command(app).commands["align"]
    fields = {f.name: f.default for f in dataclasses.fields(AlignConfig)}
    fields["cache_image_root"] = None
    for p in command.params:
        if p.name in ("ctx", "config", "cache", "student", "out") or p.hidden:  # hidden: a renamed flag's old name
            continue
        assert p.help, p.name
        assert p.name in fields, p.name
        assert p.default == fields[p.name] or (p.default in ((), []) and fields[p.name] in ([], None)), p.name
    assert set(fields) <= {p.name for p in command.params}  # every config field is a flag
    out = runner.invoke(app, ["align", "--help"], env={"COLUMNS": "200"}).output
    for opt in ("--cache", "--student", "--out", "--epochs", "--max-steps", "--batch-size", "--config",
                "--cache-image-root", "--size", "--w-global", "--w-token", "--w-mse", "--lr", "--lr-encoder",
                "--weight-decay", "--warmup-fraction", "--clip-grad", "--eval-fraction", "--seed", "--resume", "--device",
                "--num-workers"):
        assert opt in out, opt


def test_usage_errors_exit_2(caches, tmp_path):
    r = align(*small(caches, tmp_path / "r"), "--epochs", "2", "--max-steps", "3")
    assert r.exit_code == 2 and "not both" in r.stderr
    r = align("--student", "timm:test_resnet", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "--cache is required" in r.stderr
    r = align(*small(caches, tmp_path / "r"), "--view", "first")
    assert r.exit_code == 2 and "--view" in r.stderr
    r = align(*small(caches, tmp_path / "r"), "--batch-size", "0")
    assert r.exit_code == 2


def test_config_file_then_flags(caches, tmp_path):
    (tmp_path / "c.yaml").write_text(f"cache: {caches / 'cache'}\nstudent: timm:test_vit\nstudent-size: 32\n"
                                     "lr: 0.002\nbatch_size: 6\nmax_steps: 100\nnum_workers: 0\neval_pct: 20\n")
    r = align("--config", tmp_path / "c.yaml", "--out", tmp_path / "run", "--max-steps", "3", "--batch-size", "4")
    assert r.exit_code == 0, r.output + r.stderr
    assert "held-out global cosine" in r.output and "step 0:" in r.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["student"], saved["lr"], saved["batch_size"], saved["max_steps"]) == ("timm:test_vit", 0.002, 4, 3)
    for name in ("metrics.jsonl", "loss_curve.png", "student.safetensors", "student.json", "checkpoints"):
        assert (tmp_path / "run" / name).exists(), name
    # The run's own config.yaml reproduces it elsewhere.
    r = align("--config", tmp_path / "run" / "config.yaml", "--out", tmp_path / "again")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "again" / "metrics.jsonl").read_text().count('"type": "eval"') == \
        (tmp_path / "run" / "metrics.jsonl").read_text().count('"type": "eval"')
    r = align("--config", tmp_path / "run" / "config.yaml", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "--resume" in r.stderr


def test_input_errors_exit_1_with_one_message(caches, tmp_path):
    r = align(*small(caches, tmp_path / "a", "--max-steps", "2", "--w-token", "1", cache="notok"))
    assert r.exit_code == 1 and "needs patch tokens" in r.stderr and "Traceback" not in r.stderr
    r = align(*small(caches, tmp_path / "b", "--max-steps", "5", "--lr", "1e30", "--warmup-fraction", "0"))
    assert r.exit_code == 1 and "non-finite loss" in r.stderr
    r = align(*small(caches, tmp_path / "c", "--max-steps", "2", "--cache-image-root", f"{caches / 'imgs'}={tmp_path}"))
    assert r.exit_code == 1 and "20 of 20 images" in r.stderr and "--cache-image-root" in r.stderr
    r = align(*small(caches, tmp_path / "d", "--max-steps", "2"), "--student", "timm:nope_net")
    assert r.exit_code == 1 and "unknown timm model" in r.stderr
