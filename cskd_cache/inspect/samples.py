"""Procedural sample photographs, so the quickstart and demos run offline on a fresh machine.

They are not aesthetic data: smooth skies, horizons, discs and texture at varied sizes, orientations and
file formats, enough to exercise decoding, views and caching end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZES = [(640, 480), (480, 640), (800, 450), (512, 512), (1024, 683), (360, 540)]


def sample_photo(index: int, seed: int = 0, scale: float = 1.0) -> Image.Image:
    """Photo ``index`` of ``seed``; ``scale`` < 1 draws it smaller (cheap to make by the hundred thousand)."""
    rng = np.random.default_rng(seed * 100_003 + index)
    w, h = (max(8, round(d * scale)) for d in SIZES[index % len(SIZES)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    horizon = rng.uniform(0.3, 0.7) * h + 20 * np.sin(xx / w * rng.uniform(1, 6))
    t = np.clip(yy / horizon, 0, 1)[..., None]
    sky = top * (1 - t) + bottom * t
    ground = rng.uniform(0, 255, 3) * (0.6 + 0.4 * (yy / h))[..., None]
    img = np.where((yy < horizon)[..., None], sky, ground)
    img += rng.normal(0, rng.uniform(2, 12), img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(1, 5)):
        r = rng.uniform(0.03, 0.15) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
    if rng.uniform() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))
    return pil


def write_samples(out: str | Path, n: int = 16, seed: int = 0) -> list[Path]:
    """Write n sample photos (JPEG and PNG) under out/; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = out / f"sample_{i:04d}.{'png' if i % 4 == 3 else 'jpg'}"
        img = sample_photo(i, seed)
        img.save(p, quality=90) if p.suffix == ".jpg" else img.save(p)
        paths.append(p)
    return paths
