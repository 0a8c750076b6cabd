"""Trust: cskd never deletes or overwrites what it did not create, never runs code named by a file, never trains
on a corrupt cache or on images that are not the ones cached, and fails early and in one line.

Each test here is one of the points of the trust issue, and fails on the code before it (the closing note of that
issue says which line of which module each one catches)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _imgs import make_images, photo
from cskd_cli.main import app
from typer.testing import CliRunner

from cskd_cache.cache.integrity import CorruptCache
from cskd_cache.cache.lock import CacheLocked, DirLock, remove_dead_temporaries
from cskd_cache.cache.manifest import CacheError, read_manifest
from cskd_cache.cache.reader import open_cache
from cskd_cache.cache.verify import verify_cache
from cskd_cache.stages.extract import ExtractConfig, run_extract
from cskd_cache.stages.teacher_predictions import PredictionsError, ensure_predictions

TESTS = Path(__file__).parent
TOY = "py:toy_teacher:make"
DEAD_PID = 2 ** 22 + 12345  # above Linux's default pid_max: never a live process


def extract(tmp_path, images, out, teacher=TOY, **kw):
    base = dict(teacher=teacher, out=str(out), images=[str(images)], num_workers=0, batch_size=4, shard_size=3)
    base.update(kw)
    return run_extract(ExtractConfig(**base))


def shard_bytes(cache) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(cache).glob("shard-*.h5"))}


@pytest.fixture
def cache(tmp_path):
    make_images(tmp_path / "imgs", 7)
    extract(tmp_path, tmp_path / "imgs", tmp_path / "cache")
    return tmp_path / "cache"


@contextlib.contextmanager
def small_disk(tmp_path, size: str):
    """A real file system of ``size`` (tmpfs; needs root, as in CI), unmounted afterwards; skips where it cannot."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def run_cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


# ------------------------------------------------------------------------------------- 1. nothing deleted


def _teacher(bins=10):
    return {"kind": "run", "spec": "run:x", "path": "/x", "weights_sha256": "w" * 64, "meta_sha256": "m" * 64,
            "head": {"kind": "distribution", "bins": bins}, "scale": [1.0, 10.0]}


def _compute(cache, fill=0.0):
    return lambda: (lambda a, b: np.full((b - a, cache.n_views, 10), fill, np.float32))


def test_predictions_dir_pointed_at_a_feature_cache_is_refused_and_the_cache_survives(cache):
    before = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    c = open_cache(cache)
    with pytest.raises(PredictionsError, match="not a cskd predictions cache"):
        ensure_predictions(cache, c, _teacher(), _compute(c))
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file() and p.name != ".verified.json"} == \
        {k: v for k, v in before.items() if k != ".verified.json"}
    assert verify_cache(cache) == []


def test_predictions_dir_with_a_users_files_is_never_deleted(cache, tmp_path):
    c = open_cache(cache)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"project": "my own notes"}')
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(PredictionsError, match="not a cskd predictions cache"):
        ensure_predictions(mine, c, _teacher(), _compute(c))
    assert (mine / "thesis.tex").read_text() == "years of work"
    # a real predictions cache of another teacher is recomputed (the positive control) ...
    pred = tmp_path / "pred"
    ensure_predictions(pred, c, _teacher(), _compute(c, 1.0))
    other = {**_teacher(), "weights_sha256": "v" * 64}
    p, computed = ensure_predictions(pred, c, other, _compute(c, 2.0))
    assert computed and float(p.arrays["logits"].mean()) == 2.0
    # ... but not once a user has put a file of their own into it
    (pred / "notes.txt").write_text("mine")
    with pytest.raises(PredictionsError, match="files cskd did not write"):
        ensure_predictions(pred, c, _teacher(), _compute(c, 3.0))
    assert (pred / "notes.txt").read_text() == "mine" and (pred / "manifest.json").is_file()


def test_distill_predictions_pointed_at_its_own_feature_cache_leaves_it_intact(tmp_path):
    from _iaa_task import make_images as noisy
    from _iaa_task import write_labels

    paths, scores = noisy(tmp_path / "imgs", 15)
    write_labels(tmp_path / "l.csv", paths, scores)
    extract(tmp_path, tmp_path / "imgs", tmp_path / "cache", teacher="py:_iaa_task:noise_teacher")
    before = shard_bytes(tmp_path / "cache")
    code, _, err = run_cli("distill", "--cache", tmp_path / "cache", "--labels", f"csv:{tmp_path / 'l.csv'}",
                           "--student", "py:_iaa_task:tiny_student", "--out", tmp_path / "run", "--max-steps", "1",
                           "--num-workers", "0", "--predictions", tmp_path / "cache")
    assert code == 1 and "not a cskd predictions cache" in err and len(err.strip().splitlines()) == 1
    assert shard_bytes(tmp_path / "cache") == before and verify_cache(tmp_path / "cache") == []
    assert not (tmp_path / "run").exists()  # refused before any work


def test_extract_into_a_non_empty_folder_that_is_not_a_cache_is_refused(tmp_path):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "draft.h5.tmp").write_text("a user's file that happens to end in .h5.tmp")
    (out / "skipped.jsonl").write_text("my list\n")
    code, _, err = run_cli("extract", "--teacher", TOY, "--images", tmp_path / "imgs", "--out", out,
                           "--num-workers", "0")
    assert code == 1 and "not empty" in err and "not a cskd cache" in err
    assert (out / "draft.h5.tmp").read_text().startswith("a user's file") and \
        (out / "skipped.jsonl").read_text() == "my list\n"
    assert sorted(p.name for p in out.iterdir()) == ["draft.h5.tmp", "skipped.jsonl"]


def test_training_and_report_outs_refuse_a_folder_of_someone_elses_files(cache, tmp_path):
    from cskd_cache.inspect.neighbors import NeighborsConfig, NeighborsError, run_neighbors
    from cskd_cache.stages.align import AlignConfig, AlignError, run_align

    out = tmp_path / "notes"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own metrics\n")
    with pytest.raises(AlignError, match="not empty"):
        run_align(AlignConfig(cache=str(cache), student="timm:test_vit", out=str(out), max_steps=1, num_workers=0,
                              size=32))
    (out / "sheets").mkdir()
    with pytest.raises(NeighborsError, match="not empty"):
        run_neighbors(NeighborsConfig(cache=str(cache), out=str(out), queries=1, num_workers=0))
    assert (out / "metrics.jsonl").read_text() == "my own metrics\n" and (out / "sheets").is_dir()


def test_proxy_set_never_prunes_a_folder_it_did_not_build(tmp_path):
    from cskd_cache.inspect.proxy_quality import build_proxy_set

    make_images(tmp_path / "src", 2, sub=False)
    mine = tmp_path / "photos"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_bytes(b"my photo")
    with pytest.raises(ValueError, match="not a proxy set"):
        build_proxy_set(sorted((tmp_path / "src").iterdir()), mine, size=32, per_image=1)
    assert (mine / "images" / "holiday.jpg").read_bytes() == b"my photo"
    build_proxy_set(sorted((tmp_path / "src").iterdir()), tmp_path / "proxy", size=32, per_image=1)
    build_proxy_set(sorted((tmp_path / "src").iterdir()), tmp_path / "proxy", size=32, per_image=1)  # its own


# ------------------------------------------------------------------------------------- 2. seeded random init


def test_random_init_teacher_is_seeded_and_recorded_and_must_be_explicit(tmp_path, tiny_clip_name):
    from cskd_cache.models.teachers import build_teacher

    a, b = (build_teacher("timm:test_vit@none") for _ in range(2))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    build_teacher(f"open_clip:{tiny_clip_name}@none")
    assert torch.equal(torch.rand(3), x)  # the caller's RNG stream is untouched
    make_images(tmp_path / "imgs", 5)
    spec = f"open_clip:{tiny_clip_name}@none"
    r1 = extract(tmp_path, tmp_path / "imgs", tmp_path / "c1", teacher=spec)
    r2 = extract(tmp_path, tmp_path / "imgs", tmp_path / "c2", teacher=spec)
    assert r1.fingerprint == r2.fingerprint and shard_bytes(tmp_path / "c1") == shard_bytes(tmp_path / "c2")
    assert isinstance(read_manifest(tmp_path / "c1")["teacher"]["init_seed"], int)
    code, _, err = run_cli("extract", "--teacher", f"open_clip:{tiny_clip_name}", "--images", tmp_path / "imgs",
                           "--out", tmp_path / "c3")
    assert code == 1 and "@none" in err and not (tmp_path / "c3").exists()


def test_killed_and_resumed_random_init_extract_equals_one_run(tmp_path, tiny_clip_name):
    make_images(tmp_path / "imgs", 7)
    spec = f"open_clip:{tiny_clip_name}@none"
    env = dict(os.environ, PYTHONPATH=str(TESTS), CSKD_TEST_CLIP=tiny_clip_name)
    script = textwrap.dedent(f"""
        import json, open_clip, sys
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        from conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME
        d = Path(sys.argv[2]); d.mkdir(exist_ok=True)
        (d / (TINY_CLIP_NAME + ".json")).write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(d)
        import cskd_cache.cache.shards as shards
        real, n = shards.ShardWriter.finish, [0]
        def finish(self, *a, **k):
            n[0] += 1
            if n[0] == 2 and sys.argv[3] == "die":
                import os, signal; os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)
        shards.ShardWriter.finish = finish
        from cskd_cache.stages.extract import ExtractConfig, run_extract
        run_extract(ExtractConfig(teacher={spec!r}, out=sys.argv[1], images=[{str(tmp_path / "imgs")!r}],
                                  num_workers=0, batch_size=4, shard_size=3))
    """)
    run = lambda out, mode: subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "cfg"), mode],
                                           env=env, capture_output=True, text=True, timeout=300)
    assert run(tmp_path / "ref", "ok").returncode == 0
    assert run(tmp_path / "c", "die").returncode == -signal.SIGKILL
    r = run(tmp_path / "c", "ok")
    assert r.returncode == 0, r.stderr
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "ref")
    assert verify_cache(tmp_path / "c") == []


# ------------------------------------------------------------------------------------- 3. the lock


HOLDER = """
import sys, time
from cskd_cache.cache.lock import DirLock
DirLock(sys.argv[1], "a test holder").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_extract_on_one_out_is_refused_and_a_dead_holders_lock_is_reclaimed(tmp_path):
    make_images(tmp_path / "imgs", 4)
    out = tmp_path / "c"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli("extract", "--teacher", TOY, "--images", tmp_path / "imgs", "--out", out,
                               "--num-workers", "0")
        assert code == 1 and "in use by a test holder" in err and f"pid {holder.pid}" in err
        assert len(err.strip().splitlines()) == 1
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = json.loads((out / ".cskd.lock").read_text())
    assert lock["pid"] == holder.pid  # the killed holder never released it: stale now
    res = extract(tmp_path, tmp_path / "imgs", out)
    assert res.rows == 4 and not (out / ".cskd.lock").exists()


def test_lock_file_records_holder_and_is_released():
    import socket

    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"cskd-lock-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    with DirLock(d, "unit test"):
        rec = json.loads((d / ".cskd.lock").read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["what"] == "unit test"
    assert not (d / ".cskd.lock").exists()
    shutil.rmtree(d)


def test_predictions_cache_is_locked_too(cache, tmp_path):
    c = open_cache(cache)
    pred = tmp_path / "teacher" / "predictions" / "abc"
    pred.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace('"a test holder")', '"x", name=".abc.lock")'),
                               str(pred.parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLocked, match="in use"):
            ensure_predictions(pred, c, _teacher(), _compute(c))
    finally:
        holder.kill()
        holder.wait()
    ensure_predictions(pred, c, _teacher(), _compute(c))
    assert (pred / "manifest.json").is_file()


# ------------------------------------------------------------------------------------- 4. manifest rebuilt


def _partial(tmp_path, out):
    """A cache killed after its first of three shards (SIGKILL in a subprocess)."""
    script = textwrap.dedent("""
        import sys
        import cskd_cache.cache.shards as shards
        real, n = shards.ShardWriter.finish, [0]
        def finish(self, *a, **k):
            n[0] += 1
            if n[0] == 2:
                import os, signal; os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)
        shards.ShardWriter.finish = finish
        from cskd_cache.stages.extract import ExtractConfig, run_extract
        run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=sys.argv[1], images=[sys.argv[2]],
                                  num_workers=0, batch_size=4, shard_size=3))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "imgs")], capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(TESTS)), timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert len(read_manifest(out)["shards"]) == 1


@pytest.mark.parametrize("damage", ["deleted", "unreadable"])
def test_lost_manifest_of_a_partial_cache_is_rebuilt_from_sidecars(tmp_path, damage):
    make_images(tmp_path / "imgs", 7)
    extract(tmp_path, tmp_path / "imgs", tmp_path / "ref")
    out = tmp_path / "c"
    _partial(tmp_path, out)
    if damage == "deleted":
        (out / "manifest.json").unlink()
    else:
        (out / "manifest.json").write_bytes(b"\x00\xff{ half a manifest")
    res = extract(tmp_path, tmp_path / "imgs", out)
    assert res.resumed_shards == 1
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref") and verify_cache(out) == []


def test_sidecars_of_another_command_are_not_trusted_to_rebuild_a_manifest(tmp_path):
    make_images(tmp_path / "imgs", 7)
    out = tmp_path / "c"
    _partial(tmp_path, out)
    (out / "manifest.json").unlink()
    with pytest.raises(CacheError, match="not written by this command"):
        extract(tmp_path, tmp_path / "imgs", out, views=2)  # another view policy: another fingerprint
    assert (out / "shard-00000.h5").is_file()


# ------------------------------------------------------------------------------------- 5. dead temporaries


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    make_images(tmp_path / "imgs", 4)
    out = tmp_path / "c"
    extract(tmp_path, tmp_path / "imgs", out)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = [f".manifest.json.{DEAD_PID}-ab12_x.tmp", ".manifest.json.k3j_2ab.tmp", ".shard-00001.json.zz9.tmp"]
        for name in dead:
            (out / name).write_text("{")
        keep = out / f".manifest.json.{live.pid}-cd34.tmp"
        keep.write_text("{")
        preds = tmp_path / "preds"
        (preds / f".0123abcd.tmp-{DEAD_PID}-deadbeef").mkdir(parents=True)
        (preds / f".0123abcd.tmp-{DEAD_PID}-deadbeef" / "shard-00000.h5").write_text("x")
        (preds / f".0123abcd.tmp-{live.pid}-cafef00d").mkdir()
        (preds / "mine.tmp").write_text("a user's file")
        extract(tmp_path, tmp_path / "imgs", out)  # a rerun of the finished command
        assert not any((out / n).exists() for n in dead) and keep.exists()
        assert remove_dead_temporaries(preds) == [f".0123abcd.tmp-{DEAD_PID}-deadbeef"]
        assert (preds / f".0123abcd.tmp-{live.pid}-cafef00d").is_dir() and (preds / "mine.tmp").is_file()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------- 6. no pickle on resume


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    import random

    from cskd_cache.train.state_io import STATE_JSON, STATE_TENSORS, load_state, save_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"epoch": 2, "step": 7, "optimizer": opt.state_dict(), "scaler": None, "nan": float("nan"),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]
    back = load_state(tmp_path)
    assert back["rng"]["python"] == state["rng"]["python"]
    n0, n1 = state["rng"]["numpy"], back["rng"]["numpy"]
    assert n1[0] == n0[0] and np.array_equal(n1[1], n0[1]) and n1[1].dtype == n0[1].dtype and n1[2:] == n0[2:]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and np.isnan(back["nan"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])  # what resume does with it


def test_resume_never_unpickles_a_planted_state_file(tmp_path):
    from _iaa_task import make_images as noisy
    from _iaa_task import write_labels

    paths, scores = noisy(tmp_path / "imgs", 20)
    write_labels(tmp_path / "l.csv", paths, scores)
    run = tmp_path / "run"
    args = ["finetune", "--model", "py:_iaa_task:tiny_student", "--labels", f"csv:{tmp_path / 'l.csv'}", "--out",
            run, "--max-steps", "2", "--batch-size", "4", "--num-workers", "0"]
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ckpt = sorted((run / "checkpoints").glob("epoch-*"))[-1]
    marker = tmp_path / "PWNED"
    for name in ("state.json", "state.safetensors"):
        (ckpt / name).unlink()
    (ckpt / "state.pt").write_bytes(pickle.dumps({"epoch": 1, "payload": Payload(marker)}))
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", *map(str, args), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert r.returncode == 1 and "pickle" in r.stderr and "Traceback" not in r.stderr
    # a state.json that names no code cannot be made to run any either: a tampered one is a clean error
    (ckpt / "state.pt").unlink()
    (ckpt / "state.json").write_text('{"__tensor__": "t99"}')
    (ckpt / "state.safetensors").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", *map(str, args), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "state" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- 7. no py: from a run


EVIL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("code ran")
def make():
    raise SystemExit("factory called")
"""


def _planted_run(tmp_path, spec):
    from _scorers import make_model

    run = make_model(tmp_path / "downloaded")
    meta = json.loads((run / "iaa_model.json").read_text())
    meta["encoder"]["spec"] = spec
    (run / "iaa_model.json").write_text(json.dumps(meta))
    (run / "evil_mod.py").write_text(EVIL)
    return run


def test_predict_refuses_py_spec_from_a_run_dir_without_trust_code(tmp_path):
    run = _planted_run(tmp_path, "py:os:abort")
    photo(40, 30, 1).save(tmp_path / "a.jpg")
    env = dict(os.environ, PYTHONPATH=str(run))
    base = [sys.executable, "-m", "cskd_cli.main", "predict", str(tmp_path / "a.jpg"), "--model", str(run),
            "--out", str(tmp_path / "p.csv")]
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "py:os:abort" in r.stderr and "--trust-code" in r.stderr  # not SIGABRT
    assert len(r.stderr.strip().splitlines()) == 1
    meta = json.loads((run / "iaa_model.json").read_text())
    meta["encoder"]["spec"] = "py:evil_mod:make"
    (run / "iaa_model.json").write_text(json.dumps(meta))
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "py:evil_mod:make" in r.stderr and not (run / "IMPORTED").exists()
    # with the user's consent it is imported (and here fails as the planted factory does)
    r = subprocess.run(base + ["--trust-code"], env=env, capture_output=True, text=True, timeout=300)
    assert (run / "IMPORTED").exists() and r.returncode != 0


def test_every_run_loader_asks_before_importing_code(tmp_path):
    from cskd_cache.models.runs import build_encoder, load_encoder, save_encoder
    from cskd_cache.models.scorer import load_iaa_model
    from cskd_cache.models.students import build_student
    from cskd_cache.models.trust import UntrustedCode

    run = _planted_run(tmp_path, "py:evil_mod:make")
    sys.path.insert(0, str(run))
    try:
        with pytest.raises(UntrustedCode, match="--trust-code"):
            load_iaa_model(run)
        align = tmp_path / "align"
        save_encoder(build_student("timm:test_vit", pretrained_ok=False, size=32), align)
        meta = json.loads((align / "student.json").read_text())
        (align / "student.json").write_text(json.dumps({**meta, "spec": "py:evil_mod:make"}))
        for load in (lambda: load_encoder(align), lambda: build_encoder(f"run:{align}")):
            with pytest.raises(UntrustedCode):
                load()
        assert not (run / "IMPORTED").exists()
        (align / "student.json").write_text(json.dumps(meta))
        assert load_encoder(align).spec == "timm:test_vit"  # timm: specs load as before
    finally:
        sys.path.remove(str(run))


def test_a_runs_config_yaml_naming_py_code_needs_trust_code(tmp_path):
    from _iaa_task import make_images as noisy
    from _iaa_task import write_labels

    paths, scores = noisy(tmp_path / "imgs", 10)
    write_labels(tmp_path / "l.csv", paths, scores)
    (tmp_path / "config.yaml").write_text(f"model: py:evil_mod:make\nlabels: csv:{tmp_path / 'l.csv'}\n"
                                          "resolved: {command: finetune}\n")
    code, _, err = run_cli("finetune", "--config", tmp_path / "config.yaml", "--out", tmp_path / "r")
    assert code == 2 and "--trust-code" in err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------- 8. corrupt caches


def _flip(path: Path, offset_from_end: int = 2000, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - offset_from_end
    data[i:i + n] = bytes(b ^ 0x5A for b in data[i:i + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_at_open_once_and_no_verify_skips_knowingly(cache):
    first = open_cache(cache)
    assert first.verified["checked"] == 3 and (cache / ".verified.json").is_file()
    assert open_cache(cache).verified == {**first.verified, "checked": 0, "skipped": 3, "bytes": 0}
    _flip(cache / "shard-00001.h5")
    with pytest.raises(CorruptCache, match=r"shard-00001\.h5.*sha256.*cskd cache verify"):
        open_cache(cache)
    assert open_cache(cache, verify=False).n == 7  # --no-verify: the user said so
    code, _, err = run_cli("align", "--cache", cache, "--student", "timm:test_vit", "--out", cache.parent / "run",
                           "--max-steps", "1", "--num-workers", "0")
    assert code == 1 and "shard-00001.h5" in err and "cskd cache verify" in err
    assert len(err.strip().splitlines()) == 1 and not (cache.parent / "run").exists()


def test_a_shard_of_another_cache_with_the_same_fingerprint_is_caught_even_without_verify(tmp_path, cache):
    make_images(tmp_path / "other", 7, seed=5)
    extract(tmp_path, tmp_path / "other", tmp_path / "c2")
    assert read_manifest(tmp_path / "c2")["fingerprint"] == read_manifest(cache)["fingerprint"]
    shutil.copy(tmp_path / "c2" / "shard-00000.h5", cache / "shard-00000.h5")
    with pytest.raises(CorruptCache, match=r"shard-00000\.h5"):
        open_cache(cache, verify=False)


def test_scrambled_tokens_and_truncation_are_caught(cache):
    p = cache / "shard-00002.h5"
    st = p.stat()
    with h5py.File(p, "r+") as f:
        t = f["tokens"][:]
        f["tokens"][:] = t[:, :, ::-1]  # the grid scrambled, every value still plausible
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptCache, match="shard-00002"):
        open_cache(cache)
    shutil.copy(cache / "shard-00001.h5", cache.parent / "keep")
    with open(cache / "shard-00001.h5", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptCache, match=r"shard-00001\.h5: 1,000 bytes"):
        open_cache(cache, verify=False)


def test_verified_memo_goes_to_the_user_cache_dir_when_the_cache_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_images(tmp_path / "imgs", 4)
    if os.geteuid() == 0:  # root writes through a chmod: make the file system itself read-only instead
        with small_disk(tmp_path, "4m") as mnt:
            extract(tmp_path, tmp_path / "imgs", mnt / "c")
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            assert open_cache(mnt / "c").verified["checked"] == 2
            assert open_cache(mnt / "c").verified["checked"] == 0  # remembered in the user's cache dir
    else:
        extract(tmp_path, tmp_path / "imgs", tmp_path / "c")
        (tmp_path / "c").chmod(0o555)
        try:
            assert open_cache(tmp_path / "c").verified["checked"] == 2
            assert open_cache(tmp_path / "c").verified["checked"] == 0
        finally:
            (tmp_path / "c").chmod(0o755)
    assert len(list((tmp_path / "xdg" / "cskd" / "verified").glob("*.json"))) == 1


# ------------------------------------------------------------------------------------- 9. remapped images


def test_image_root_mapped_to_other_images_with_the_same_names_is_refused(cache, tmp_path):
    from cskd_cache.cache.paths import check_images, parse_image_root, resolve_paths
    from cskd_cache.data.datasets import CachedViews
    from cskd_cache.data.images import ImageChanged

    other = tmp_path / "other"
    make_images(other, 7, seed=9)  # same names, other photos
    c = open_cache(cache)
    root = c.roots["imgs"]
    paths = resolve_paths(c, parse_image_root([f"{root}={other}"]))
    with pytest.raises(ImageChanged, match="not the image cache row"):
        check_images(c, paths, range(len(c)))
    # one replaced file that the up-front sample misses is caught when the loader reads it
    good = resolve_paths(c)
    check_images(c, good, range(len(c)), sample=1)
    swapped = good[3]
    shutil.copy(paths[3], swapped)
    ds = CachedViews(good, {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"},
                     rows=np.arange(len(c)), boxes=c.boxes, digests=c.digests)
    ds[2]
    with pytest.raises(ImageChanged, match=Path(swapped).name):
        ds[3]
    code, _, err = run_cli("align", "--cache", cache, "--student", "timm:test_vit", "--out", tmp_path / "run",
                           "--cache-image-root", f"{root}={other}", "--max-steps", "1", "--num-workers", "0",
                           "--size", "32")
    assert code == 1 and "not the image cache row" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- 10. label files


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "high"])
def test_non_finite_or_non_numeric_scores_name_file_and_line(tmp_path, bad):
    from cskd_cache.labels import load_labels

    make_images(tmp_path / "i", 3, sub=False)
    names = sorted(p.name for p in (tmp_path / "i").iterdir())
    f = tmp_path / "l.csv"
    f.write_text("path,score\n" + "".join(f"i/{n},{s}\n" for n, s in zip(names, ["5.1", bad, "3"])))
    with pytest.raises(ValueError, match=rf"l\.csv:3: score '{bad}' is not"):
        load_labels(f"csv:{f}")
    f.write_text("path,dist\n" + f"i/{names[0]},1;2;{bad}\n")
    with pytest.raises(ValueError, match=r"l\.csv:2"):
        load_labels(f"csv:{f}")


def test_a_truncated_train_jpeg_is_skipped_and_counted_not_fatal(tmp_path):
    from _iaa_task import make_images as noisy
    from _iaa_task import write_labels

    paths, scores = noisy(tmp_path / "imgs", 20)
    jpgs = []
    for p in paths:
        j = p.with_suffix(".jpg")
        from PIL import Image

        Image.open(p).convert("RGB").save(j, quality=95)
        p.unlink()
        jpgs.append(j)
    data = jpgs[0].read_bytes()  # im000: a train image (split cycle starts with train)
    jpgs[0].write_bytes(data[: len(data) // 2])
    write_labels(tmp_path / "l.csv", jpgs, scores)
    code, out, err = run_cli("finetune", "--model", "py:_iaa_task:tiny_student", "--labels", f"csv:{tmp_path / 'l.csv'}",
                             "--out", tmp_path / "run", "--max-steps", "3", "--batch-size", "4",
                             "--num-workers", "0")
    assert code == 0, err
    assert "1 labelled images are broken and were skipped" in out + err and "im000.jpg (truncated)" in out + err


def test_distill_whose_labels_link_to_no_cache_row_stops(tmp_path):
    from _iaa_task import make_images as noisy
    from _iaa_task import write_labels

    paths, scores = noisy(tmp_path / "labelled", 10)
    write_labels(tmp_path / "l.csv", paths, scores)
    make_images(tmp_path / "unlabelled", 5)
    extract(tmp_path, tmp_path / "unlabelled", tmp_path / "cache")
    code, _, err = run_cli("distill", "--cache", tmp_path / "cache", "--labels", f"csv:{tmp_path / 'l.csv'}",
                           "--student", "py:_iaa_task:tiny_student", "--out", tmp_path / "run", "--max-steps", "1",
                           "--num-workers", "0")
    assert code == 1 and "links to a row" in err and "do not match" in err
    assert not (tmp_path / "run" / "iaa_model.safetensors").exists()


# ------------------------------------------------------------------------------------- 11-12. odd inputs


def test_non_utf8_file_name_is_skipped_with_its_bytes_escaped(tmp_path):
    d = tmp_path / "imgs"
    make_images(d, 3, sub=False)
    bad = os.fsencode(str(d)) + b"/caf\xe9.jpg"
    shutil.copy(next(d.iterdir()), os.fsdecode(bad))
    res = extract(tmp_path, d, tmp_path / "c")
    assert res.rows == 3 and res.skipped == 1
    rec = [json.loads(ln) for ln in (tmp_path / "c" / "skipped.jsonl").read_text().splitlines()]
    assert rec[0]["reason"] == "undecodable-name" and rec[0]["key"] == "caf\\xe9.jpg"


def test_symlink_loop_is_walked_once_and_a_link_is_followed(tmp_path):
    from cskd_cache.data.sources import scan_images

    d = tmp_path / "imgs"
    make_images(d, 3, sub=False)
    (d / "loop").symlink_to(d, target_is_directory=True)
    make_images(tmp_path / "elsewhere", 2, sub=False, seed=4)
    (d / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (d / "more2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    keys = [p.relative_to(d).as_posix() for p in scan_images(d)]
    assert len(keys) == 5 and not any(k.startswith("loop/") for k in keys)
    assert sum(k.startswith("more") for k in keys) == 2  # the linked folder once, by its first name


# ------------------------------------------------------------------------------------- 13. disk full


def test_disk_full_leaves_complete_shards_and_says_what_the_next_one_needs(tmp_path):
    with small_disk(tmp_path, "160k") as mnt:
        make_images(tmp_path / "imgs", 30)
        code, _, err = run_cli("extract", "--teacher", TOY, "--images", tmp_path / "imgs", "--out", mnt / "c",
                               "--num-workers", "0", "--shard-size", "3", "--batch-size", "3")
        assert code == 1 and "MB free" in err and "needs about" in err and "Traceback" not in err
        m = read_manifest(mnt / "c")
        assert 0 < len(m["shards"]) < 10 and not m["complete"]
        assert not list((mnt / "c").glob("*.tmp"))
        assert verify_cache(mnt / "c") == [f"{mnt / 'c'}: cache is incomplete; re-run the same `cskd extract` "
                                           "command to finish it"]


ENOSPC = """
import sys
import cskd_cache.stages.extract as ex
ex.check_free_space = lambda *a, **k: None  # as if the estimate were wrong: HDF5 itself hits the full disk
from cskd_cache.stages.extract import ExtractConfig, run_extract
run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=sys.argv[1], images=[sys.argv[2]], num_workers=0,
                          batch_size=3, shard_size=3))
"""


def test_enospc_inside_hdf5_is_one_error_no_crash_and_the_run_resumes(tmp_path):
    with small_disk(tmp_path, "100k") as mnt:
        make_images(tmp_path / "imgs", 30)
        run = lambda: subprocess.run([sys.executable, "-c", ENOSPC, str(mnt / "c"), str(tmp_path / "imgs")],
                                     capture_output=True, text=True, timeout=300,
                                     env=dict(os.environ, PYTHONPATH=str(TESTS)))
        r = run()
        assert r.returncode == 1, r.stderr  # a Python exception, not a segfault (-11)
        assert r.stderr.strip().splitlines()[-1].startswith("cskd_cache.cache.shards.DiskFull: ") and \
            "disk full while writing shard" in r.stderr
        done = len(read_manifest(mnt / "c")["shards"])
        assert done >= 1 and not list((mnt / "c").glob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        assert run().returncode == 0
        assert read_manifest(mnt / "c")["complete"] and verify_cache(mnt / "c") == []


# ------------------------------------------------------------------------------------- 14-15. the front door


def test_pretrained_tag_offline_fails_in_one_line_before_any_work(tmp_path):
    make_images(tmp_path / "imgs", 3)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(TESTS))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", "extract", "--teacher", "open_clip:ViT-B-32@openai",
                        "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "c")], env=env,
                       capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not in the local cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr and "@/path/to/" in r.stderr
    assert not (tmp_path / "c").exists() and "hashing" not in r.stderr
    print(f"offline refusal: {took:.1f} s including interpreter start and imports")


def test_bad_options_are_refused_before_hashing(tmp_path):
    make_images(tmp_path / "imgs", 3)
    for args, msg in ((["--teacher", "timm:no_such_net@none"], "unknown timm model"),
                      (["--teacher", TOY, "--layers", "7"], "--layers 7"),
                      (["--teacher", TOY, "--token-grid", "99"], "--token-grid 99"),
                      (["--teacher", TOY, "--list", tmp_path / "nope.txt"], "nope.txt")):
        code, _, err = run_cli("extract", *args, "--images", tmp_path / "imgs", "--out", tmp_path / "c",
                               "--num-workers", "0")
        assert code == 1 and msg in err and "hashing" not in err, (args, err)
        assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------- 16-17. output


def test_piped_output_keeps_long_paths_whole(tmp_path):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / ("a-very-long-folder-name-" * 4) / "cache-with-a-long-name"
    r = subprocess.run([sys.executable, "-m", "cskd_cli.main", "extract", "--teacher", TOY, "--images",
                        str(tmp_path / "imgs"), "--out", str(out), "--num-workers", "0"],
                       env={k: v for k, v in dict(os.environ, PYTHONPATH=str(TESTS)).items() if k != "COLUMNS"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "…" not in r.stdout
    info = subprocess.run([sys.executable, "-m", "cskd_cli.main", "cache", "info", str(out)], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert str(out) in info.stdout and "…" not in info.stdout


def test_version_notice_once_knn_na_and_view_values(tmp_path, tiny_clip_name, cache):
    from cskd_cache import __version__
    from cskd_cache.stages.align_eval import knn_agreement

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"cskd {__version__}"
    make_images(tmp_path / "imgs", 2)
    script = (f"import json, open_clip, sys; from pathlib import Path; sys.path.insert(0, {str(TESTS)!r});"
              "from conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME; d = Path(sys.argv[1]); d.mkdir();"
              "(d / (TINY_CLIP_NAME + '.json')).write_text(json.dumps(TINY_CLIP_CONFIG)); "
              "open_clip.add_model_config(d); sys.argv = ['cskd'] + sys.argv[2:]; from cskd_cli.main import main; main()")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg"), "extract", "--teacher",
                        f"open_clip:{tiny_clip_name}@none", "--images", str(tmp_path / "imgs"), "--out",
                        str(tmp_path / "c"), "--num-workers", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    notices = [ln for ln in (r.stdout + r.stderr).splitlines() if "random" in ln.lower()]
    assert len(notices) == 1 and notices[0].startswith("warning: "), notices
    x = torch.randn(5, 8)
    assert knn_agreement(x, torch.randn(5, 8), k=10) is None and knn_agreement(x, x, k=4) is None
    assert knn_agreement(x, x, k=3) == 1.0
    c = open_cache(cache)
    for bad in ("randon", "first", 1.5, True):
        with pytest.raises(CacheError, match="view="):
            c.dataset(view=bad)
