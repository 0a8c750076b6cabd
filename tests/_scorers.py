"""Tiny trained-IAA-model folders for tests, written with the real on-disk contract (`save_iaa_model`).

The head gets larger random weights than its default init so scores spread over the scale: with near-uniform
distributions every image would score ~the middle and rank metrics would be meaningless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cskd_cache.models.scorer import build_head, save_iaa_model
from cskd_cache.models.students import build_student


def make_model(run_dir: Path, spec: str = "timm:test_vit", kind: str = "distribution", bins: int | None = 10,
               scale=(1.0, 10.0), size: int | None = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    enc = build_student(spec, pretrained_ok=False, size=size)
    head = build_head(kind, enc.pooled_dim, bins)
    torch.nn.init.normal_(head.fc.weight, std=0.5 if kind == "distribution" else 0.05)
    save_iaa_model(run_dir, enc, head, {"kind": kind, "bins": bins, "in_dim": enc.pooled_dim},
                   {"name": "toy", "scale": list(scale), "bins": bins, "threshold": (scale[0] + scale[1]) / 2})
    return Path(run_dir)
