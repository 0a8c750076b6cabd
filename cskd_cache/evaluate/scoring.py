"""Score image files with a trained `IAAScorer`: the shared engine of `cskd evaluate` and `cskd predict`.

Each file is decoded in a DataLoader worker (`images.load_rgb`: EXIF-rotated, alpha over white) and put through
the model's eval transform, `eval_tensor`: the shortest-side centre square, rendered by `data.views.render` at
``input_cfg["size"]`` with its interpolation, mean and std. It is `data.transforms.eval_tensor` itself, the view
`cskd finetune` / `cskd distill` validate on, so a score here is bit-for-bit what the run's validation saw.

A file that cannot be read (missing, not an image, corrupt, truncated, too large) never stops a run: it gets an
``error`` string (``reason: detail``) and NaN scores, and the caller decides how to report it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import DEFAULT_MAX_PIXELS, BadImage, load_rgb
from ..data.transforms import EVAL_VIEW, eval_tensor

__all__ = ["EVAL_VIEW", "ImageFiles", "Scores", "eval_tensor", "load_eval_tensor", "score_files"]


def load_eval_tensor(path: str | os.PathLike, input_cfg: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """`eval_tensor` of a file; raises BadImage / OSError like `load_rgb`."""
    return eval_tensor(load_rgb(path, max_pixels), input_cfg)


def _error(exc: BaseException) -> str:
    if isinstance(exc, BadImage):
        return f"{exc.reason}: {exc.detail}"
    if isinstance(exc, FileNotFoundError):
        return "missing: no such file"
    if isinstance(exc, IsADirectoryError):
        return "unreadable: is a directory"
    return f"unreadable: {type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


class ImageFiles(Dataset):
    """Yields ``{"i", "image"}`` for a readable file and ``{"i", "error"}`` for any other."""

    def __init__(self, paths: Sequence[str | os.PathLike], input_cfg: dict, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = [str(p) for p in paths]
        self.cfg = input_cfg
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"i": i, "image": load_eval_tensor(self.paths[i], self.cfg, self.max_pixels)}
        except (BadImage, OSError) as e:
            return {"i": i, "error": _error(e)}


def _collate(items: list[dict]) -> dict:
    ok = [it for it in items if "image" in it]
    return {"i": [it["i"] for it in ok], "image": torch.stack([it["image"] for it in ok]) if ok else None,
            "errors": [(it["i"], it["error"]) for it in items if "error" in it]}


@dataclass
class Scores:
    """Per input path, in input order: ``score`` (N,) float64 on the model's native scale, ``std`` (N,) and
    ``dist`` (N, K) for a distribution head (None for a scalar head); NaN rows where ``errors[i]`` is set."""

    paths: list[str]
    score: np.ndarray
    std: np.ndarray | None
    dist: np.ndarray | None
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    @property
    def n_ok(self) -> int:
        return int(self.ok.sum())

    @property
    def n_failed(self) -> int:
        return len(self.paths) - self.n_ok

    def failed(self) -> list[tuple[str, str]]:
        return [(p, e) for p, e in zip(self.paths, self.errors) if e is not None]


def score_files(scorer, paths: Sequence[str | os.PathLike], batch_size: int = 32, num_workers: int = 2,
                device: str | torch.device | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                on_progress: Callable[[int, int], None] | None = None) -> Scores:
    """Score every path with ``scorer`` (an `IAAScorer`, already on ``device``; default: where its weights are).

    Decoding runs in ``num_workers`` processes (0 = in this one); ``on_progress(done, total)`` after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    paths = [str(p) for p in paths]
    n = len(paths)
    if device is None:
        device = next(scorer.model.parameters()).device
    dist_head = scorer.head_kind == "distribution"
    score = np.full(n, np.nan)
    std = np.full(n, np.nan) if dist_head else None
    dist = np.full((n, int(scorer.meta["head"]["bins"])), np.nan) if dist_head else None
    errors: list[str | None] = [None] * n
    if on_progress:
        on_progress(0, n)
    if n == 0:
        return Scores(paths, score, std, dist, errors)
    loader = DataLoader(ImageFiles(paths, scorer.input_cfg, max_pixels), batch_size=batch_size, shuffle=False,
                        num_workers=min(num_workers, max(1, -(-n // batch_size))), collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda",
                        persistent_workers=False)
    done = 0
    for batch in loader:
        for i, e in batch["errors"]:
            errors[i] = e
        if batch["image"] is not None:
            out = scorer.score(batch["image"].to(device, non_blocking=True))
            idx = np.asarray(batch["i"])
            score[idx] = out["score"].double().cpu().numpy()
            if dist_head:
                std[idx] = out["std"].double().cpu().numpy()
                dist[idx] = out["dist"].double().cpu().numpy()
        done += len(batch["i"]) + len(batch["errors"])
        if on_progress:
            on_progress(done, n)
    return Scores(paths, score, std, dist, errors)
