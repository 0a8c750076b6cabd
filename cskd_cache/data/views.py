"""Views of an image: the policy that samples them, seeded crop boxes, and exact re-rendering.

A view is 5 floats ``[x0, y0, x1, y1, flip]``: a crop box normalised to the (EXIF-transposed)
original image size, and a horizontal flip applied after cropping. Storing views in normalised
coordinates lets a student re-render exactly the teacher's view at its own input size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

__all__ = [
    "ViewPolicy",
    "eval_box",
    "view_seed",
    "sample_views",
    "render_view",
    "to_tensor",
    "render_tensor",
    "render",
    "random_resized_crop",
    "draft_target",
]

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ViewPolicy:
    """How many views per image and how the random ones (all but the first) are drawn."""

    n_views: int = 1
    # Lower bound 0.25, not torchvision's 0.08: aesthetic quality depends on composition, and a
    # crop of 8% of the image mostly loses it, so the teacher's score would describe another picture.
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        # Coerce JSON/YAML/numpy inputs to plain int/float/tuple so equal policies compare equal.
        try:
            scale = tuple(float(v) for v in self.scale)
            ratio = tuple(float(v) for v in self.ratio)
            flip_p = float(self.flip_p)
        except (TypeError, ValueError):
            raise ConfigError(
                f"scale/ratio must be pairs of numbers and flip_p a number, "
                f"got scale={self.scale!r} ratio={self.ratio!r} flip_p={self.flip_p!r}"
            ) from None
        for name in ("n_views", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool | float) or not hasattr(value, "__index__"):
                raise ConfigError(f"{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "flip_p", flip_p)
        if self.n_views < 1:
            raise ConfigError(f"n_views must be >= 1, got {self.n_views}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] < math.inf:
            raise ConfigError(f"ratio must satisfy 0 < ratio[0] <= ratio[1] (finite), got {ratio}")
        if not 0 <= flip_p <= 1:
            raise ConfigError(f"flip_p must be in [0, 1], got {flip_p}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists)."""
        return {"n_views": self.n_views, "scale": list(self.scale), "ratio": list(self.ratio),
                "flip_p": self.flip_p, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        """Inverse of to_dict; missing keys take defaults, unknown keys are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ViewPolicy keys: {sorted(unknown)}")
        return cls(**d)


def eval_box(preprocess_cfg: dict, width: int, height: int) -> tuple[float, float, float, float]:
    """Normalised region of a width x height image that the model's eval transform sees."""
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode in ("squash", "longest"):  # squash keeps everything; longest pads, so nothing is cut
        return (0.0, 0.0, 1.0, 1.0)
    if mode != "shortest":
        raise ConfigError(f"unknown resize_mode {mode!r} (expected 'shortest', 'squash' or 'longest')")
    size_h, size_w = preprocess_cfg["size"]
    crop_pct = preprocess_cfg.get("crop_pct") or 1.0
    resize_to = math.floor(max(size_h, size_w) / crop_pct)
    scale = resize_to / min(width, height)
    crop_w, crop_h = size_w / scale / width, size_h / scale / height  # as fractions of the image
    x0, y0 = (1 - crop_w) / 2, (1 - crop_h) / 2
    return (max(0.0, x0), max(0.0, y0), min(1.0, x0 + crop_w), min(1.0, y0 + crop_h))


def view_seed(seed: int, view_key: str) -> int:
    """64-bit RNG seed for one image: a pure function of the policy seed and the key."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{view_key}".encode()).digest()[:8], "little")


def random_resized_crop(rng: np.random.Generator, width: int, height: int,
                         scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, with numpy randomness; returns (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: centre crop, clamped to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def sample_views(policy: ViewPolicy, view_key: str, width: int, height: int,
                 first_box: Sequence[float]) -> np.ndarray:
    """(n_views, 5) float32 views; row 0 is ``first_box`` unflipped, the rest random crops.

    Deterministic in (policy.seed, view_key) only, so any process, in any order, gets the same views.
    """
    out = np.empty((policy.n_views, 5), dtype=np.float32)
    out[0] = (*first_box, 0.0)
    rng = np.random.Generator(np.random.PCG64(view_seed(policy.seed, view_key)))
    for k in range(1, policy.n_views):
        left, top, w, h = random_resized_crop(rng, width, height, policy.scale, policy.ratio)
        flip = rng.random() < policy.flip_p  # drawn even when flip_p is 0 so boxes do not depend on it
        out[k] = (left / width, top / height, (left + w) / width, (top + h) / height, float(flip))
    return out


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def render_view(img: Image.Image, view: Sequence[float], size: int | Sequence[int],
                interpolation: str = "bicubic") -> Image.Image:
    """Crop ``view``'s box from ``img`` and resize it to ``size`` (int or (H, W)), then maybe flip."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {interpolation!r}; one of {sorted(INTERPOLATIONS)}")
    x0, y0, x1, y1, flip = (float(v) for v in view)
    h, w = _hw(size)
    W, H = img.size
    # One resize with a float box: sub-pixel exact, and filters use real pixels outside the box
    # instead of the clamped edge a crop-then-resize would see.
    out = img.resize((w, h), INTERPOLATIONS[interpolation], box=(x0 * W, y0 * H, x1 * W, y1 * H))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip >= 0.5 else out


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 (3, H, W) tensor, /255 then (x - mean) / std, as torchvision ToTensor + Normalize."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div_(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def render_tensor(img: Image.Image, view: Sequence[float], size: int | Sequence[int], interpolation: str,
                  mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """render_view then to_tensor: the exact input a model sees for this view."""
    return to_tensor(render_view(img, view, size, interpolation), mean, std)


def draft_target(input_cfg: dict, boxes, keep: float = 1.0):
    """For draft decoding (`images.load_rgb`'s ``draft``): a function of the full image size giving the smallest
    decoded size at which every one of ``boxes``, shrunk to ``keep`` of its side (a jitter inside it), still has
    one source pixel per input pixel of a model with ``input_cfg``."""
    h, w = _hw(input_cfg["size"])
    fw = keep * min(float(b[2]) - float(b[0]) for b in boxes)
    fh = keep * min(float(b[3]) - float(b[1]) for b in boxes)
    return lambda width, height: (w / max(1e-6, fw), h / max(1e-6, fh))


def render(img: Image.Image, view: Sequence[float], input_cfg: dict) -> torch.Tensor:
    """This box of this image at this model's input size and normalisation: the one way every stage (extract,
    align, finetune, distill, teacher predictions, scoring) turns a view into the tensor a model sees."""
    c = input_cfg
    return render_tensor(img, view, c["size"], c["interpolation"], c["mean"], c["std"])
