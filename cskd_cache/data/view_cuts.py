"""What a view store holds for one view: the view's box cut from the decoded image, JPEG-coded.

One function for both writers (`cskd extract --store-views`, which cuts while it decodes for the teacher, and
`cskd cache add-views`, which decodes again), so a store's bytes do not depend on which one wrote it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["STORE_FILTER", "cut_view", "encode_jpeg", "cut_views", "jpeg_rows"]

# The sharpest of PIL's antialiasing filters, so that the second resize (to the student's size, at training time)
# loses as little as possible to the first.
STORE_FILTER = Image.Resampling.LANCZOS


def cut_view(img: Image.Image, box, size: int) -> Image.Image:
    """The pixels of a view's box (normalised ``x0, y0, x1, y1``; the flip is not applied), resized so the short
    side is ``size`` or the box's own, whichever is smaller."""
    w, h = img.size
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    bw, bh = (x1 - x0) * w, (y1 - y0) * h
    scale = min(1.0, size / max(1e-9, min(bw, bh)))
    out = (max(1, round(bw * scale)), max(1, round(bh * scale)))
    return img.resize(out, STORE_FILTER, box=(x0 * w, y0 * h, x1 * w, y1 * h))


def encode_jpeg(img: Image.Image, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return np.frombuffer(buf.getvalue(), np.uint8)


def cut_views(img: Image.Image, boxes, size: int, quality: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Every view of one image: (JPEG bytes per view, (V, 2) int32 stored width and height)."""
    crops = [cut_view(img, box, size) for box in boxes]
    return [encode_jpeg(c, quality) for c in crops], np.array([c.size for c in crops], np.int32)


def jpeg_rows(codes: list[list[np.ndarray]]) -> np.ndarray:
    """Per image, its views' JPEG bytes -> the (images, V) object array a store shard's ``jpeg`` dataset takes."""
    out = np.empty((len(codes), len(codes[0]) if codes else 0), dtype=object)
    for j, views in enumerate(codes):
        for v, code in enumerate(views):
            out[j, v] = code
    return out
