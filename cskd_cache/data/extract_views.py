"""Decode each image once and cut all of its views from that one decode (the extractor's reader stage)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import BadImage, load_rgb
from .sources import Item
from .view_cuts import cut_views
from .views import ViewPolicy, eval_box, render, sample_views


class ExtractViews(Dataset):
    """Yields, per image, its V views as one (V, 3, H, W) tensor, or the reason it was skipped.

    View 0 goes through the teacher's own eval transform, so cached view-0 features are exactly what the
    model produces on its documented preprocessing; views 1.. are seeded random-resized crops whose boxes are
    returned so a student can rebuild them.
    """

    def __init__(self, items: Sequence[Item], preprocess: Callable, preprocess_cfg: dict, policy: ViewPolicy,
                 max_pixels: int, store: tuple[int, int] | None = None):
        self.store = store  # (size, quality): also cut each view for the view store, from this same decode
        self.items = list(items)
        self.preprocess = preprocess
        self.cfg = preprocess_cfg
        self.policy = policy
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        try:
            img = load_rgb(it.path, self.max_pixels)
        except BadImage as e:
            return {"i": i, "ok": False, "reason": e.reason, "detail": e.detail}
        except OSError as e:  # vanished or unreadable since planning: skip it, never crash the run
            return {"i": i, "ok": False, "reason": "unreadable", "detail": f"{type(e).__name__}: {e.strerror or e}"}
        w, h = img.size
        boxes = sample_views(self.policy, view_key(it), w, h, eval_box(self.cfg, w, h))
        views = [self.preprocess(img)] + [render(img, box, self.cfg) for box in boxes[1:]]
        out = {"i": i, "ok": True, "views": torch.stack(views), "boxes": boxes,
               "size": np.array([w, h], dtype=np.int32)}
        if self.store is not None:
            out["jpeg"], out["jpeg_shape"] = cut_views(img, boxes, *self.store)
        return out


def view_key(item: Item) -> str:
    """What seeds an image's random views: stable across runs, processes and source order."""
    return f"{item.source}/{item.key}"


def collate(samples: list[dict]) -> list[dict]:
    # Skips travel with the batch; stacking happens in the writer, which knows which rows survived.
    return samples
