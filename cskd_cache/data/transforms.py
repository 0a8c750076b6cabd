"""The eval view and the mild augmentations that Stage II training and every scorer share.

The eval view is the shortest-side centre square (`views.eval_box` with ``crop_pct`` 1.0, ``resize_mode``
shortest), resized to the model's input size: the same geometry as a CLIP teacher's view 0 minus its crop
margin, so a whole-image label still describes nearly all the pixels. Validation, `cskd evaluate`, `cskd predict`
and `cskd export`'s parity check all use it (`eval_tensor`), so a score is bit-for-bit what validation saw.

The mild augmentation (`augment_box`) is a random resized crop keeping 80-100 % of a box's area (aspect 3/4 to
4/3), then a horizontal flip with p = 0.5: applied inside the eval view of a disk image (``augment``) or inside a
cached view (``jitter``).
"""

from __future__ import annotations

import numpy as np
import torch

from .views import eval_box, random_resized_crop, render

__all__ = ["EVAL_VIEW", "AUG_SCALE", "AUG_RATIO", "eval_view_box", "eval_tensor", "augment_box"]

EVAL_VIEW = {"resize_mode": "shortest", "crop_pct": 1.0}
AUG_SCALE = (0.8, 1.0)
AUG_RATIO = (3 / 4, 4 / 3)


def eval_view_box(input_cfg: dict, width: int, height: int) -> np.ndarray:
    """The eval view of a width x height image as a cache-style view ``[x0, y0, x1, y1, flip=0]``."""
    return np.array([*eval_box({"size": input_cfg["size"], **EVAL_VIEW}, width, height), 0.0], dtype=np.float32)


def eval_tensor(img, input_cfg: dict) -> torch.Tensor:
    """The exact (3, H, W) input a trained IAA model is validated and scored on (module docstring)."""
    return render(img, eval_view_box(input_cfg, *img.size), input_cfg)


def augment_box(box: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random resized crop (`AUG_SCALE`, `AUG_RATIO`) inside ``box`` and a coin-flip mirror, as a view."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    bw, bh = max(1, round((x1 - x0) * width)), max(1, round((y1 - y0) * height))
    left, top, w, h = random_resized_crop(rng, bw, bh, AUG_SCALE, AUG_RATIO)
    fx, fy = (x1 - x0) / bw, (y1 - y0) / bh
    flip = float(rng.random() < 0.5)
    return np.array([x0 + left * fx, y0 + top * fy, x0 + (left + w) * fx, y0 + (top + h) * fy, flip], np.float32)
