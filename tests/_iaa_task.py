"""A learnable synthetic IAA task for the finetune/distill tests, and the tiny models that learn it.

Images are smooth colour gradients (as `_imgs.photo`, without its noise) at a random brightness, plus Gaussian pixel
noise of std sigma; the label is the noise level, score = 10 - 9 * sigma / SIGMA_MAX on 1..10, with a 10-bin
distribution around it (`proxy_quality.score_dist`). Brightness varies independently of the score and dominates a
random network's features, so an untrained model ranks the images by a nuisance (val SRCC near 0), while noise is
something a tiny CNN learns in a few hundred steps on CPU.

`noise_teacher` is a py: feature-cache teacher (the user-teacher interface of cskd_cache.models.teachers): a seeded
random CNN whose embedding head is centred and scaled on unrelated calibration photos (as tests/test_align.py
does), so cached embeddings differ per image and carry the noise level. `tiny_student` is a py: student.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from _imgs import standardise_head

from cskd_cache.inspect.proxy_quality import score_dist

SIGMA_MAX = 40.0
SPLIT_CYCLE = ("train", "train", "train", "val", "test")


def noisy_image(i: int, sigma: float, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed * 10_000 + i)
    w, h = 32 + 4 * (i % 3), 32 + 3 * (i % 2)  # near the models' 32 px, so resizing keeps the noise
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(60, 140, 3) + rng.uniform(20, 90)
    img = base + rng.normal(0, sigma, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """n PNGs with evenly spread, shuffled noise levels; returns (paths, scores on 1..10)."""
    folder.mkdir(parents=True, exist_ok=True)
    sigmas = np.random.default_rng(seed).permutation(np.linspace(0, SIGMA_MAX, n))
    paths = []
    for i, s in enumerate(sigmas):
        p = folder / f"im{i:03d}.png"
        noisy_image(i, float(s), seed).save(p)
        paths.append(p)
    return paths, 10 - 9 * sigmas / SIGMA_MAX


def write_labels(csv_path: Path, paths: list[Path], scores: np.ndarray, dist: bool = True,
                 splits: list[str] | None = None) -> Path:
    """A csv:FILE label file (path relative to the file, score or dist, split)."""
    splits = splits or [SPLIT_CYCLE[i % len(SPLIT_CYCLE)] for i in range(len(paths))]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "dist" if dist else "score", "split"])
        for p, s, sp in zip(paths, scores, splits):
            # relative to the label file, as datasets ship them; symlinks are kept, not resolved
            rel = os.path.relpath(os.path.abspath(p), os.path.abspath(csv_path.parent))
            value = ";".join(f"{v:.6f}" for v in score_dist(float(s))) if dist else f"{s:.4f}"
            w.writerow([str(rel), value, sp])
    return csv_path


class NoiseTeacher(nn.Module):
    """Random zero-sum (high-pass) 3x3 filters, ReLU, 4x4 average pool: features of local texture energy,
    which is what pixel noise raises, next to the brightness and colour that the biases pass through."""

    preprocess_cfg = {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                      "interpolation": "bilinear", "crop_pct": 1.0}
    num_blocks = 1

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            self.stem.weight -= self.stem.weight.mean((1, 2, 3), keepdim=True)
        self.head = nn.Linear(16, 16)

    def extract(self, x, layers=()):
        a = nn.functional.adaptive_avg_pool2d(torch.relu(self.stem(x)), 4)
        return {"embed": self.head(a.mean((2, 3))), "tokens": a.permute(0, 2, 3, 1), "prefix": None, "layers": {}}


def noise_teacher() -> NoiseTeacher:
    torch.manual_seed(0)
    # calibration photos: other seeds and brightness than any test image
    calibration = [noisy_image(s, SIGMA_MAX * (s % 7) / 6, seed=99) for s in range(48)]
    return standardise_head(NoiseTeacher().eval(), calibration)


class TinyStudent(nn.Module):
    """A py: student: one strided conv, ReLU, global mean (pooled) and the grid."""

    input_cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)

    def forward_features(self, x):
        g = torch.relu(self.conv(x))
        return g.mean((2, 3)), g


def tiny_student() -> TinyStudent:
    return TinyStudent()
