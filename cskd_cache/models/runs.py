"""The one loader of run directories: every ``run:`` spec, ``--model RUN_DIR`` and `load_encoder` comes here.

An align run leaves its student:

    RUN_DIR/student.json        {"spec", "size_override", "input_cfg", "pooled_dim", "grid_dim", "grid_size", ...}
    RUN_DIR/student.safetensors the encoder's weights only (the alignment heads are training scaffolding)

a finetune/distill run its scorer (`scorer`: iaa_model.json + iaa_model.safetensors). `build_encoder` turns any
encoder spec into a trainable encoder (``run:`` here, ``timm:``/``py:`` in `students`); `load_encoder` reads an
align run's student; `load_run_encoder` the image encoder of either kind of run. Architectures are rebuilt from
the recorded spec with random weights (nothing is fetched) and the weights loaded strictly; a ``py:`` spec found
in a run directory is imported only with ``trust_code`` (`trust`). This module sits above `students` and
`scorer` and neither imports it, so no loader depends on another in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MissingFile, ModelError
from ..files import default_file_mode, read_json, write_json
from .scorer import IAA_JSON, IAA_WEIGHTS, load_iaa_model
from .students import build_student, rebuild_student, size_hw
from .weights import load_weights

__all__ = ["STUDENT_JSON", "STUDENT_WEIGHTS", "save_encoder", "load_encoder", "load_run_encoder", "build_encoder",
           "run_dir_of", "run_score_head"]

STUDENT_JSON = "student.json"
STUDENT_WEIGHTS = "student.safetensors"


def save_encoder(encoder, run_dir: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``encoder`` (a StudentEncoder) to RUN_DIR so that `load_encoder` rebuilds it exactly."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STUDENT_WEIGHTS + ".tmp")
    save_model(encoder.model, str(tmp))
    os.chmod(tmp, default_file_mode())  # safetensors writes owner-only files; a run's student is shared
    os.replace(tmp, run_dir / STUDENT_WEIGHTS)
    write_json(run_dir / STUDENT_JSON, {**encoder.describe(), "size_override": encoder.size_override,
                                            **(extra or {})})


def load_encoder(run_dir: str | os.PathLike, device: str | torch.device = "cpu", trust_code: bool = False):
    """The trained student of a `cskd align` run (a StudentEncoder in eval mode, without the heads). A ``py:``
    spec in its student.json is imported only with ``trust_code`` (`trust`)."""

    run_dir = Path(os.path.expanduser(str(run_dir)))
    meta_path, weights = run_dir / STUDENT_JSON, run_dir / STUDENT_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise MissingFile(f"{run_dir}: no {STUDENT_JSON} + {STUDENT_WEIGHTS} here; point at the --out of a "
                                "finished `cskd align` run")
    encoder = rebuild_student(read_json(meta_path, ModelError, "re-run the `cskd align`"), meta_path, trust_code)
    load_weights(encoder.model, str(weights), "student")
    return encoder.to(device).eval()


def run_dir_of(spec: str | os.PathLike) -> Path:
    """``run:DIR`` or a bare DIR -> DIR (``~`` expanded)."""
    text = str(spec)
    return Path(os.path.expanduser(text[4:] if text.startswith("run:") else text))


def build_encoder(spec: str, pretrained_ok: bool = True, size: int | list[int] | None = None,
                  trust_code: bool = False):
    """A trainable encoder (StudentEncoder, train mode) from any encoder spec: ``run:RUN_DIR`` (an align run's
    student, or the encoder of a finetune/distill run without its head, at the input size it was trained at) or
    ``timm:``/``py:`` (`students.build_student`)."""
    raw = spec.strip() if isinstance(spec, str) else ""
    if not raw.startswith("run:"):
        return build_student(raw, pretrained_ok=pretrained_ok, size=size, trust_code=trust_code)
    run_dir = run_dir_of(raw)
    if not (run_dir / STUDENT_JSON).is_file() and (run_dir / IAA_JSON).is_file():
        encoder = load_iaa_model(run_dir, trust_code=trust_code).model.encoder.student
    else:
        encoder = load_encoder(run_dir, trust_code=trust_code)
    # Its weights learnt one input size; a matching request is a no-op, a different one would silently change
    # what the aligned features mean.
    trained = list(encoder.input_cfg["size"])
    if size is not None and size_hw(size) != trained:
        raise ModelError(f"a run: student keeps the input size it was trained at ({trained[0]}x{trained[1]}), not "
                         f"{'x'.join(map(str, size_hw(size)))}; leave the input size unset")
    return encoder.train()


def run_score_head(spec: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(score-head weights, iaa_model.json) of a ``run:`` spec naming a finetune/distill run, the head that
    `build_encoder` leaves behind; None for any other spec (an align run, ``timm:``, ``py:``). Read from the
    safetensors file by name, so nothing in the run directory runs."""
    from safetensors import SafetensorError, safe_open

    raw = spec.strip() if isinstance(spec, str) else ""
    if not raw.startswith("run:"):
        return None
    run_dir = run_dir_of(raw)
    weights = run_dir / IAA_WEIGHTS
    if (run_dir / STUDENT_JSON).is_file() or not (run_dir / IAA_JSON).is_file() or not weights.is_file():
        return None  # not a scorer run (or an incomplete one, which `build_encoder` reports)
    meta = read_json(run_dir / IAA_JSON, ModelError, "re-run the training")
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k[len("head."):]: f.get_tensor(k) for k in f.keys() if k.startswith("head.")}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{weights}: unreadable ({' '.join(str(e).split())[:200]}); the run directory is damaged, "
                         "re-run the training") from None
    return state, meta


def load_run_encoder(run_dir: str | os.PathLike, device: str | torch.device = "cpu", trust_code: bool = False):
    """(encoder, info): the image encoder of a finished run, called as ``encoder(x) -> (pooled, grid)`` with an
    ``input_cfg`` and ``model`` attribute. An align run (student.json) via `load_encoder`, a finetune/distill run
    (iaa_model.json) via `scorer.load_iaa_model`'s encoder. ``run:DIR`` is accepted for DIR."""
    run_dir = run_dir_of(run_dir)
    if (run_dir / STUDENT_JSON).is_file():
        return load_encoder(run_dir, device=device, trust_code=trust_code), {"model": str(run_dir), "run": "align"}
    if (run_dir / IAA_JSON).is_file():
        scorer = load_iaa_model(run_dir, device=device, trust_code=trust_code)
        return scorer.model.encoder, {"model": str(run_dir), "run": "iaa"}
    raise MissingFile(f"{run_dir}: neither {STUDENT_JSON} (a `cskd align` run) nor {IAA_JSON} (a "
                      "`cskd finetune`/`cskd distill` run) here; point at a finished run directory")
