"""Trained students on disk: what `cskd align` leaves in its run directory for the later stages.

RUN_DIR/student.json        {"spec", "size_override", "input_cfg", "pooled_dim", "grid_dim", "grid_size", ...}
RUN_DIR/student.safetensors the encoder's weights only (the alignment heads are training scaffolding)

`load_encoder(RUN_DIR)` and the spec `run:RUN_DIR` rebuild the architecture from ``spec`` with random weights
(nothing is fetched) and load these weights into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..cache.manifest import default_file_mode, write_json
from .trust import check_spec_from_file

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
    from safetensors.torch import load_model

    from .students import build_student

    run_dir = Path(os.path.expanduser(str(run_dir)))
    meta_path, weights = run_dir / STUDENT_JSON, run_dir / STUDENT_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{run_dir}: no {STUDENT_JSON} + {STUDENT_WEIGHTS} here; point at the --out of a "
                                "finished `cskd align` run")
    meta = json.loads(meta_path.read_text())
    check_spec_from_file(meta.get("spec"), meta_path, trust_code)
    encoder = build_student(meta["spec"], pretrained_ok=False, size=meta.get("size_override"), trust_code=trust_code)
    load_model(encoder.model, str(weights), strict=True)
    if list(encoder.input_cfg["size"]) != list(meta["input_cfg"]["size"]):
        raise ValueError(f"{run_dir}: rebuilt student expects input {encoder.input_cfg['size']}, the run trained "
                         f"at {meta['input_cfg']['size']}")
    encoder.input_cfg = dict(meta["input_cfg"])
    encoder.size_override = meta.get("size_override")
    return encoder.to(device).eval()
