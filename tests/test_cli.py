"""The `cskd` command as a user runs it: real subprocesses, exit codes, stderr, resumption after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _imgs import make_images
from test_extract import assert_same_arrays, read_all

TESTS = Path(__file__).parent
SPEC = "py:toy_teacher:make"


def cskd(*args, env=None, check=False, timeout=300):
    e = dict(os.environ, PYTHONPATH=str(TESTS), COLUMNS="200")
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_help_lists_every_option():
    r = cskd("extract", "--help", check=True)
    for opt in ("--teacher", "--out", "--images", "--list", "--views", "--token-grid", "--layers", "--batch-size",
                "--num-workers", "--device", "--shard-size", "--compression", "--max-pixels", "--seed"):
        assert opt in r.stdout, opt
    assert "verify" in cskd("cache", "--help", check=True).stdout


def test_extract_info_verify_roundtrip(tmp_path):
    make_images(tmp_path / "imgs", 6)
    r = cskd("extract", "--teacher", SPEC, "--images", tmp_path / "imgs", "--out", tmp_path / "c", "--views", "2",
             "--num-workers", "2", "--shard-size", "4", check=True)
    assert "rows written" in r.stdout and "bytes per image" in r.stdout and "images/s" in r.stdout
    info = cskd("cache", "info", tmp_path / "c", check=True).stdout
    assert "py:toy_teacher:make" in info and "N x 2 x 64 x 12 float16" in info
    assert cskd("cache", "verify", tmp_path / "c").returncode == 0


def test_usage_and_input_errors_exit_nonzero_with_one_line(tmp_path):
    r = cskd("extract", "--teacher", SPEC, "--out", tmp_path / "c")
    assert r.returncode == 2 and "no input images" in r.stderr
    (tmp_path / "empty").mkdir()
    r = cskd("extract", "--teacher", SPEC, "--images", tmp_path / "empty", "--out", tmp_path / "c")
    assert r.returncode == 1 and "no input images found" in r.stderr and "Traceback" not in r.stderr
    r = cskd("extract", "--teacher", "clip:ViT-B-32", "--images", tmp_path / "empty", "--out", tmp_path / "c")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = cskd("extract", "--teacher", SPEC, "--images", tmp_path / "nope", "--out", tmp_path / "c")
    assert r.returncode == 1 and "nope" in r.stderr
    r = cskd("extract", "--teacher", SPEC, "--images", tmp_path / "empty", "--out", tmp_path / "c", "--views", "0")
    assert r.returncode == 2
    r = cskd("cache", "info", tmp_path / "nope")
    assert r.returncode == 1 and "manifest.json" in r.stderr


def test_verify_cli_exits_nonzero_on_fault(tmp_path):
    make_images(tmp_path / "imgs", 3)
    cskd("extract", "--teacher", SPEC, "--images", tmp_path / "imgs", "--out", tmp_path / "c", check=True)
    (tmp_path / "c" / "shard-00000.h5").write_bytes(b"garbage")
    r = cskd("cache", "verify", tmp_path / "c")
    assert r.returncode == 1 and "shard-00000.h5" in r.stderr


def test_sigkill_mid_run_then_same_command_resumes_to_identical_cache(tmp_path):
    make_images(tmp_path / "imgs", 10)
    args = ["extract", "--teacher", SPEC, "--images", tmp_path / "imgs", "--views", "3", "--shard-size", "2",
            "--batch-size", "1", "--num-workers", "1"]
    cskd(*args, "--out", tmp_path / "ref", check=True)
    env = dict(os.environ, PYTHONPATH=str(TESTS), CSKD_TOY_TEACHER_SLEEP="0.3")
    proc = subprocess.Popen([sys.executable, "-m", "cskd_cli.main", *map(str, args), "--out", tmp_path / "c"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "c" / "shard-00001.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.35)  # into the middle of the next shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not m["complete"] and 2 <= len(list((tmp_path / "c").glob("shard-*.json"))) < 5
    r = cskd(*args, "--out", tmp_path / "c", check=True)
    assert "resumed shards" in r.stdout
    assert_same_arrays(read_all(tmp_path / "c"), read_all(tmp_path / "ref"))
    assert cskd("cache", "verify", tmp_path / "c").returncode == 0


def test_library_imports_without_typer_or_rich():
    code = ("import sys; sys.modules['typer'] = None; sys.modules['rich'] = None\n"
            "import cskd_cache, cskd_cache.stages.extract, cskd_cache.cache.reader, cskd_cache.cache.verify, cskd_cache.models.teachers\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path):
    make_images(tmp_path / "imgs", 11)
    args = ["extract", "--teacher", SPEC, "--images", tmp_path / "imgs", "--views", "2", "--shard-size", "3",
            "--num-workers", "0", "--device", "cpu", "--layers", "0"]
    cskd(*args, "--out", tmp_path / "one", check=True)
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cskd_cli.main", *map(str, args), "--out", tmp_path / "two"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["complete"] and len(m["shards"]) == 4
    # One process and two ranks run different thread counts: allow fp16 last-bit noise, nothing more.
    assert_same_arrays(read_all(tmp_path / "two"), read_all(tmp_path / "one"), float_atol=2e-3)
    assert cskd("cache", "verify", tmp_path / "two").returncode == 0
