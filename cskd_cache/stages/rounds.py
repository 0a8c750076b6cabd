"""`cskd distill --rounds N`: collaborative rounds, each round's student the next round's teacher.

Round 1 distils from ``--teacher`` as a single `cskd distill` would. Round k + 1 distils a fresh student (the
same ``--student`` spec: the aligned encoder, not the previous student) from round k's student, a finished
distill run, through ``run:`` and its predictions cache: computed once on every cached view, fingerprinted and
reused like any run teacher's. Rounds 1 .. N-1 are whole run directories under RUN_DIR/rounds/round-K/ (config,
metrics, checkpoints, iaa_model.*), so every round's metrics are kept; round N is RUN_DIR itself, and the
returned summary lists every round's validation.

The variant the defaults follow: the student is re-initialised every round and only the teacher changes (the
self-training / noisy-student loop, Xie et al. 2020), because it costs one distillation per round and needs no
second trainable copy of the large model.

``--refine-teacher`` (both learners refine the task knowledge, as the paper puts it): before round k + 1 the
teacher itself is trained again, on the labels plus round k's student's predictions on every unlabelled cached
view: a distillation whose student is the current teacher's fine-tuned encoder (its head learnt afresh, at its
own input size, encoder lr ``refine_lr_encoder``) and whose teacher is round k's student. That refined teacher,
RUN_DIR/rounds/teacher-(k+1)/, teaches round k + 1. It needs a ``run:`` teacher (a finetune run).

A rerun with ``--resume`` continues the first unfinished round; finished rounds (their ``end`` record written)
are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from .distill import DistillConfig, DistillError, run_distill

__all__ = ["run_rounds", "ROUNDS_DIR"]

ROUNDS_DIR = "rounds"


def _finished(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "iaa_model.json").is_file() or not metrics.is_file():
        return False
    last = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()][-1:]
    try:
        return bool(last) and json.loads(last[0]).get("type") == "end"
    except ValueError:
        return False


def _kept_val(run_dir: Path) -> dict:
    """The validation of a finished round's kept model."""
    return json.loads((run_dir / "iaa_model.json").read_text(encoding="utf-8")).get("val") or {}


def _student_of(run_dir: Path, k: int) -> Path:
    return run_dir / ROUNDS_DIR / f"round-{k}"


def _teacher_of(cfg: DistillConfig, run_dir: Path, k: int) -> str:
    """Round k's teacher: --teacher for round 1; then round k-1's student, or with --refine-teacher the teacher
    refined on round k-1's student's predictions."""
    if k == 1:
        return cfg.teacher
    if cfg.refine_teacher:
        return f"run:{run_dir / ROUNDS_DIR / f'teacher-{k}'}"
    return f"run:{_student_of(run_dir, k - 1)}"


def _round_cfg(cfg: DistillConfig, k: int, run_dir: Path) -> DistillConfig:
    out = run_dir if k == cfg.rounds else _student_of(run_dir, k)
    return dataclasses.replace(cfg, out=str(out), teacher=_teacher_of(cfg, run_dir, k), rounds=1,
                               refine_teacher=False, predictions=cfg.predictions if k == 1 else None)


def _refine_cfg(cfg: DistillConfig, k: int, run_dir: Path) -> DistillConfig:
    """The distillation that makes round k's teacher: the previous teacher's encoder learns from the labels and
    from round k-1's student."""
    previous = cfg.teacher if k == 2 else f"run:{run_dir / ROUNDS_DIR / f'teacher-{k - 1}'}"
    return dataclasses.replace(cfg, out=str(run_dir / ROUNDS_DIR / f"teacher-{k}"), student=previous, size=None,
                               teacher=f"run:{_student_of(run_dir, k - 1)}", rounds=1, refine_teacher=False,
                               lr_encoder=cfg.refine_lr_encoder, predictions=None, attn_distance=0.0,
                               consistency=0.0, head_init="fresh")  # as measured: the refined teacher's head anew


def run_rounds(cfg: DistillConfig, on_progress: Callable[[dict], None] | None = None,
               on_status: Callable[[str], None] | None = None,
               on_teacher_progress: Callable[[int, int], None] | None = None) -> dict:
    """Every round in turn (module docstring); the last round's summary, with ``rounds``: each round's run
    directory, teacher and validation."""
    if cfg.rounds < 1:
        raise DistillError(f"--rounds must be >= 1, got {cfg.rounds}")
    cfg.validate()  # every round's settings are refused before round 1 trains
    if cfg.rounds == 1:
        return run_distill(cfg, on_progress, on_status, on_teacher_progress)
    status = on_status or (lambda m: None)
    run_dir = Path(cfg.out)
    if not cfg.resume and (run_dir / ROUNDS_DIR).exists():
        raise DistillError(f"{run_dir} already holds collaborative rounds; pass --resume to continue them, or choose "
                           "a new --out")
    rounds, result = [], {}
    for k in range(1, cfg.rounds + 1):
        if cfg.refine_teacher and k >= 2:
            tc = _refine_cfg(cfg, k, run_dir)
            if _finished(Path(tc.out)):
                status(f"teacher of round {k}: refined already ({tc.out})")
                val = _kept_val(Path(tc.out))
            else:
                status(f"teacher of round {k}: refining {tc.student} on the labels + {tc.teacher} -> {tc.out}")
                val = run_distill(tc, None, on_status, on_teacher_progress).get("val")
            rounds.append({"round": k, "refined_teacher": tc.out, "from": tc.student, "val": val})
        rc = _round_cfg(cfg, k, run_dir)
        out = Path(rc.out)
        if k < cfg.rounds and _finished(out):
            status(f"round {k} of {cfg.rounds}: finished already ({out})")
            rounds.append({"round": k, "run_dir": str(out), "teacher": rc.teacher, "val": _kept_val(out)})
            continue
        status(f"round {k} of {cfg.rounds}: teacher {rc.teacher} -> {out}")
        result = run_distill(rc, on_progress, on_status, on_teacher_progress)
        rounds.append({"round": k, "run_dir": str(out), "teacher": rc.teacher, "val": result.get("val")})
    result["rounds"] = rounds
    return result
