"""`cskd distill --rounds N`: collaborative rounds, each round's student the next round's teacher.

Round 1 distils from ``--teacher`` as a single `cskd distill` would. Round k + 1 distils a fresh student (the
same ``--student`` spec: the aligned encoder, not the previous student) from round k's student, a finished
distill run, through ``run:`` and its predictions cache: computed once on every cached view, fingerprinted and
reused like any run teacher's. Rounds 1 .. N-1 are whole run directories under RUN_DIR/rounds/round-K/ (config,
metrics, checkpoints, iaa_model.*), so every round's metrics are kept; round N is RUN_DIR itself, and the
returned summary lists every round's validation.

The variant the defaults follow: the student is re-initialised every round and only the teacher changes (the
self-training / noisy-student loop, Xie et al. 2020). Refining the teacher itself on labels + pseudo-labels
(``--refine-teacher``, which the issue names) is not implemented: it needs pseudo-labelled finetune data, and
the cheap variant has to earn its place on the benchmarks first.

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


def _round_cfg(cfg: DistillConfig, k: int, run_dir: Path) -> DistillConfig:
    out = run_dir if k == cfg.rounds else run_dir / ROUNDS_DIR / f"round-{k}"
    teacher = cfg.teacher if k == 1 else f"run:{run_dir / ROUNDS_DIR / f'round-{k - 1}'}"
    return dataclasses.replace(cfg, out=str(out), teacher=teacher, rounds=1,
                               predictions=cfg.predictions if k == 1 else None)


def run_rounds(cfg: DistillConfig, on_progress: Callable[[dict], None] | None = None,
               on_status: Callable[[str], None] | None = None,
               on_teacher_progress: Callable[[int, int], None] | None = None) -> dict:
    """Every round in turn (module docstring); the last round's summary, with ``rounds``: each round's run
    directory, teacher and validation."""
    if cfg.rounds < 1:
        raise DistillError(f"--rounds must be >= 1, got {cfg.rounds}")
    if cfg.rounds == 1:
        return run_distill(cfg, on_progress, on_status, on_teacher_progress)
    status = on_status or (lambda m: None)
    run_dir = Path(cfg.out)
    if not cfg.resume and (run_dir / ROUNDS_DIR).exists():
        raise DistillError(f"{run_dir} already holds collaborative rounds; pass --resume to continue them, or choose "
                           "a new --out")
    rounds, result = [], {}
    for k in range(1, cfg.rounds + 1):
        rc = _round_cfg(cfg, k, run_dir)
        out = Path(rc.out)
        if k < cfg.rounds and _finished(out):
            status(f"round {k} of {cfg.rounds}: finished already ({out})")
            summary = json.loads((out / "iaa_model.json").read_text(encoding="utf-8")).get("val") or {}
            rounds.append({"round": k, "run_dir": str(out), "teacher": rc.teacher, "val": summary})
            continue
        status(f"round {k} of {cfg.rounds}: teacher {rc.teacher} -> {out}")
        result = run_distill(rc, on_progress, on_status, on_teacher_progress)
        rounds.append({"round": k, "run_dir": str(out), "teacher": rc.teacher, "val": result.get("val")})
    result["rounds"] = rounds
    return result
