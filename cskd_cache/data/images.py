"""Robust image decoding: every file either becomes an 8-bit RGB image as a viewer shows it, or a BadImage.

The feature cache walks large, messy image folders; one bad file must never crash a run, and the
reason it was skipped has to be recorded in a form that can be counted (``BadImage.reason``).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import CacheError, DataError

__all__ = ["DEFAULT_MAX_PIXELS", "BadImage", "load_rgb", "file_digest", "quick_check", "ImageChanged", "RowImages",
           "image_changed"]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit

# Our explicit width*height check in load_rgb replaces PIL's global guard. PIL's version warns
# (DecompressionBombWarning) between 1x and 2x its limit and only errors above 2x, and its limit
# is process-global, so a per-call `max_pixels` is impossible with it. Setting it to None once
# here is idempotent and means PIL never warns or raises on size behind our back.
Image.MAX_IMAGE_PIXELS = None

REASONS = ("empty", "not-an-image", "corrupt", "truncated", "too-large")

# Leading bytes of formats we can decode: a file that starts like an image but that PIL cannot
# identify is a damaged image ("corrupt"), not some other kind of file ("not-an-image").
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
)


class BadImage(DataError):
    """A file that cannot be turned into an image; ``reason`` is one of REASONS."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")

    def __reduce__(self):  # keep it picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason, self.detail))


def _looks_like_image(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(m) for m in _MAGIC)


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """High bit-depth / float grayscale to L by scaling, since PIL's convert("L") clips at 255."""
    a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    mn, mx = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I"):
        # Integer grayscale is 16-bit data in practice (PNG/TIFF/PGM). Scale by the bit depth, not
        # by the image's own range, so a dark image stays dark; rescale only what cannot be 16-bit.
        lo, hi = (0.0, 65535.0) if mn >= 0 and mx <= 65535 else (mn, mx)
    elif mn >= 0 and mx <= 1:  # "F": floats are conventionally [0, 1] ...
        lo, hi = 0.0, 1.0
    elif mn >= 0 and mx <= 255:  # ... or [0, 255]; anything else is min-max scaled
        lo, hi = 0.0, 255.0
    else:
        lo, hi = mn, mx
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit_gray(im)
    if im.mode == "La":  # premultiplied; PIL has no direct La -> RGBA conversion
        im = im.convert("LA")
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")  # also resolves P/L/RGB colour-key and palette transparency
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # always a new, detached image, even when already RGB


def _classify(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError | MemoryError):
        return "too-large"
    # "image file is truncated" = pixel data ran out; PIL's header-level "Truncated File Read"
    # means a segment length points past EOF, which random garbage triggers too, so it stays "corrupt".
    if isinstance(exc, EOFError) or str(exc).startswith("image file is truncated"):
        return "truncated"
    return "corrupt"


class ImageChanged(CacheError):
    """A file's bytes are not those the cache row was extracted from (wrong --cache-image-root, replaced file)."""


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, digest: str | None = None,
             row: int | None = None, draft=None) -> Image.Image:
    """Decode ``path`` to a fully loaded RGB image, EXIF-rotated, alpha composited over white.

    Raises BadImage for any undecodable file. A missing or unreadable path is not a bad image and
    raises the usual OSError (FileNotFoundError, PermissionError). With ``digest`` (the sha256 a cache stored
    for cache row ``row``) the bytes are hashed as they are read and ImageChanged is raised when they differ:
    the hash costs 4-5% of an ImageNet-size decode (benchmarks/integrity.py), and it is what stops a remapped
    image root from silently pairing other photos with the cached targets.

    ``draft``: a function of the oriented (width, height) giving the smallest (width, height) the caller needs; a
    JPEG is then decoded at the largest 1/2, 1/4 or 1/8 scale that is still at least that big (libjpeg's DCT
    scaling, PIL's draft mode: 3-4x faster on a photo 4x the target). The result's ``info["original_size"]`` is
    the full oriented size either way, so crop boxes are computed as for a full decode.
    """
    if os.path.getsize(path) == 0:
        raise BadImage(path, "empty", "file has 0 bytes")
    if digest is None:
        with open(path, "rb") as f:
            return _decode(f, path, max_pixels, draft)
    data = Path(path).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise image_changed(path, row, got, digest)
    return _decode(io.BytesIO(data), path, max_pixels, draft)


def image_changed(path, row, got: str, want: str) -> ImageChanged:
    return ImageChanged(f"{path}: not the image cache row {row} was extracted from (sha256 {got[:12]}..., the cache "
                        f"stored {want[:12]}...); --cache-image-root probably maps to other images "
                        "with the same names: fix the mapping, or re-extract the cache from these images")


class RowImages:
    """`load_rgb` for cache rows: a row's file is checked against the digest the cache stored the first time this
    process reads it (DataLoader workers each keep their own record)."""

    def __init__(self, digests, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.digests, self.max_pixels = digests, max_pixels
        self.checked: set[int] = set()

    def load(self, path: str | os.PathLike, row: int, draft=None) -> Image.Image:
        img = load_rgb(path, self.max_pixels, digest=None if row in self.checked else self.digests[row], row=row,
                       draft=draft)
        self.checked.add(row)
        return img


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS = (5, 6, 7, 8)


def _swaps(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112) in _SWAPS
    except Exception:  # noqa: BLE001 - unreadable EXIF is ignored by exif_transpose too
        return False


def _apply_draft(im: Image.Image, draft, swap: bool) -> None:
    w, h = im.size
    need_w, need_h = draft(h, w) if swap else draft(w, h)
    if swap:
        need_w, need_h = need_h, need_w
    if need_w * 2 <= w and need_h * 2 <= h:  # only when at least a 1/2 scale fits: otherwise a full decode
        im.draft(None, (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))


def _decode(f, path, max_pixels: int, draft=None) -> Image.Image:
    """The body of load_rgb on an open binary file (a real file or the bytes already read and hashed)."""
    head = f.read(16)
    f.seek(0)
    try:
        im = Image.open(f)
    except Image.UnidentifiedImageError:
        if _looks_like_image(head):
            raise BadImage(path, "corrupt", "starts like an image but its header cannot be parsed") from None
        raise BadImage(path, "not-an-image", "format not recognised") from None
    except Exception as e:  # noqa: BLE001 - any PIL failure is a property of the file
        raise BadImage(path, _classify(e), f"{type(e).__name__}: {e}") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:  # from the header alone, before any pixel is decoded
            raise BadImage(path, "too-large", f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
        if w <= 0 or h <= 0:
            raise BadImage(path, "corrupt", f"invalid size {w}x{h}")
        full = None  # the shown (EXIF-oriented) size of a full decode, when draft mode may shrink this one
        if draft is not None and im.format == "JPEG":  # a JPEG's EXIF is in its header; a PNG's may follow IDAT
            swap = _swaps(im)
            full = (h, w) if swap else (w, h)
            _apply_draft(im, draft, swap)
        try:
            im.load()
        except Exception as e:  # noqa: BLE001
            raise BadImage(path, _classify(e), f"{type(e).__name__}: {e}") from None
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - broken EXIF is ignored by viewers; pixels are fine
            oriented = im
        try:
            out = _to_rgb(oriented)
        except Exception as e:  # noqa: BLE001 - e.g. an exotic mode PIL cannot convert
            raise BadImage(path, "corrupt", f"cannot convert mode {oriented.mode}: {e}") from None
        if full is None:
            full = out.size
        elif oriented is im:  # broken EXIF: shown unrotated, as viewers do
            full = (w, h)
        out.info["original_size"] = full
        return out


def quick_check(path: str | os.PathLike) -> tuple[str, str] | None:
    """(reason, detail) for a file that is certainly no whole image, from its first and last bytes only (~50 us):
    empty, not an image, or a JPEG/PNG cut short (no end-of-image marker near its end). None otherwise, which is
    not a promise that it decodes. Training runs it over their labelled images before the first step, so that a
    truncated download is skipped and counted instead of stopping a run mid-epoch."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty", "file has 0 bytes"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError as e:
        return "unreadable", f"{type(e).__name__}: {e.strerror or e}"
    if not _looks_like_image(head):
        return None  # formats without a magic number we know are left to the decoder
    if head.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in tail:
        return "truncated", "JPEG without an end-of-image marker"
    if head.startswith(b"\x89PNG") and b"IEND" not in tail[-64:]:
        return "truncated", "PNG without an IEND chunk"
    return None


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of the file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
