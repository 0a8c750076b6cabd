"""Synthetic photographs for tests: smooth gradients plus noise, so crops and resizes are non-trivial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(80, 200, 3)
    img = base + rng.normal(0, 18, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, seed: int = 0, sub: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = 64 + 17 * (i % 5), 48 + 23 * (i % 3)
        d = folder / f"set{i % 2}" if sub else folder
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:03d}.{'jpg' if i % 2 else 'png'}"
        photo(w, h, seed * 1000 + i).save(p, quality=92) if p.suffix == ".jpg" else photo(w, h, seed * 1000 + i).save(p)
        paths.append(p)
    return paths


def standardise_head(teacher, images: list[Image.Image]):
    """Rescale a toy teacher's linear ``head`` so its embeddings of ``images`` (calibration photos, 32 px, the toy
    teachers' normalisation) have zero mean and unit std per dimension: a random head's embeddings share one
    direction, which would make every image look alike to cosine losses and kNN metrics."""
    import torch

    xs = [(torch.from_numpy(np.asarray(im.resize((32, 32), Image.BILINEAR), np.float32) / 255).permute(2, 0, 1)
           - 0.5) / 0.25 for im in images]
    with torch.no_grad():
        e = teacher.extract(torch.stack(xs))["embed"]
        mean, std = e.mean(0), e.std(0)
        teacher.head.weight /= std[:, None]
        teacher.head.bias.sub_(mean).div_(std)
    return teacher
