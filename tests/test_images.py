"""cskd_cache.data.images: every file decodes to viewer-faithful RGB or raises BadImage with a reason."""

from __future__ import annotations

import hashlib
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from cskd_cache.data.images import DEFAULT_MAX_PIXELS, BadImage, file_digest, load_rgb


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_with_header_size(path, width: int, height: int) -> None:
    """A syntactically valid PNG whose IHDR declares width x height but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    )


def _expect_bad(path, reason: str, **kw) -> BadImage:
    with pytest.raises(BadImage) as info:
        load_rgb(path, **kw)
    exc = info.value
    assert exc.reason == reason, str(exc)
    assert exc.path == str(path)
    assert str(exc).startswith(f"{path}: {reason}: ")
    assert exc.detail
    return exc


# ---------------------------------------------------------------- bad files


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _expect_bad(p, "empty")


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n" * 10)
    _expect_bad(p, "not-an-image")


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(_noise(128, 128)).save(full, quality=90)
    data = full.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    _expect_bad(p, "truncated")


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(_noise(128, 128)).save(full)
    data = full.read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    _expect_bad(p, "truncated")


def test_corrupt_bytes_with_jpeg_header(tmp_path):
    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000))
    _expect_bad(p, "corrupt")


def test_jpeg_signature_only_is_corrupt_not_unrelated(tmp_path):
    p = tmp_path / "sig.jpg"
    p.write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)
    _expect_bad(p, "corrupt")


def test_corrupt_png_data_stream(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_noise(64, 64)).save(good)
    raw = bytearray(good.read_bytes())
    i = raw.find(b"IDAT")
    raw[i + 20 : i + 60] = b"\x00" * 40  # clobber the zlib stream, keep the file length
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(raw))
    _expect_bad(p, "corrupt")


def test_too_large_by_max_pixels(tmp_path):
    p = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(p)
    exc = _expect_bad(p, "too-large", max_pixels=0)
    assert "max_pixels=0" in exc.detail


def test_too_large_header_is_rejected_before_decoding(tmp_path):
    # 100k x 100k declared: decoding would need 10 GB, PIL's own check would raise
    # DecompressionBombError and warnings must not leak either.
    p = tmp_path / "bomb.png"
    _png_with_header_size(p, 100_000, 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exc = _expect_bad(p, "too-large")
    assert "10000000000" in exc.detail and str(DEFAULT_MAX_PIXELS) in exc.detail


def test_too_large_real_image(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (6000, 6000)).save(p)
    exc = _expect_bad(p, "too-large", max_pixels=10_000_000)
    assert "36000000" in exc.detail and "10000000" in exc.detail


def test_over_pil_default_limit_does_not_warn(tmp_path):
    # 10k x 10k = 1e8 pixels: over PIL's default limit (warning territory) but allowed by ours.
    # The file carries no pixel data, so it fails later as a damaged file, never with a warning.
    p = tmp_path / "hollow.png"
    _png_with_header_size(p, 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImage) as info:
            load_rgb(p, max_pixels=10**8)
    assert info.value.reason in ("truncated", "corrupt")


def test_missing_file_is_not_bad_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "nope.jpg")


def test_bad_image_pickles():
    exc = BadImage("/x/y.jpg", "corrupt", "boom")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.path, back.reason, back.detail, str(back)) == (exc.path, exc.reason, exc.detail, str(exc))


# ---------------------------------------------------------------- modes


def _load_saved(tmp_path, img: Image.Image, name: str, **save_kw) -> Image.Image:
    p = tmp_path / name
    img.save(p, **save_kw)
    out = load_rgb(p)
    assert out.mode == "RGB"
    assert out.size == img.size
    return out


def test_rgb_png_roundtrip_exact(tmp_path):
    a = _noise(16, 24)
    out = _load_saved(tmp_path, Image.fromarray(a), "rgb.png")
    np.testing.assert_array_equal(np.asarray(out), a)


def test_grayscale_l(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = np.asarray(_load_saved(tmp_path, Image.fromarray(a), "l.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], a)


def test_la_composited_over_white(tmp_path):
    la = Image.new("LA", (3, 1))
    la.putpixel((0, 0), (0, 0))  # transparent black -> white
    la.putpixel((1, 0), (0, 255))  # opaque black stays black
    la.putpixel((2, 0), (0, 128))  # half transparent black -> mid grey
    out = np.asarray(_load_saved(tmp_path, la, "la.png"))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert abs(int(out[0, 2, 0]) - 127) <= 1


def test_rgba_composited_over_white(tmp_path):
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))
    im.putpixel((1, 0), (0, 128, 0, 255))
    out = np.asarray(_load_saved(tmp_path, im, "rgba.png"))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 128, 0)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette(tmp_path, transparent):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    kw = {"transparency": 0} if transparent else {}
    out = np.asarray(_load_saved(tmp_path, im, f"p{transparent}.png", **kw))
    assert tuple(out[0, 0]) == ((255, 255, 255) if transparent else (10, 20, 30))
    assert tuple(out[0, 1]) == (200, 100, 50)


def test_palette_gif_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    im.putpixel((1, 0), 1)
    out = np.asarray(_load_saved(tmp_path, im, "p.gif", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 100, 50)


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(_load_saved(tmp_path, im, "cmyk.jpg", quality=95)).astype(int)
    np.testing.assert_allclose(out[8, 8], (255, 0, 0), atol=6)


def test_one_bit(tmp_path):
    a = (np.indices((8, 8)).sum(0) % 2).astype(bool)
    out = np.asarray(_load_saved(tmp_path, Image.fromarray(a), "bits.png"))
    np.testing.assert_array_equal(out[..., 0], np.where(a, 255, 0))


_SIXTEEN = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
_SIXTEEN_8BIT = np.array([[0, 1, 4, 128, 255]], dtype=np.uint8)


def test_16bit_png_scaled_not_clipped(tmp_path):
    im = Image.fromarray(_SIXTEEN)
    assert im.mode == "I;16"
    out = np.asarray(_load_saved(tmp_path, im, "g16.png"))
    np.testing.assert_array_equal(out[..., 0], _SIXTEEN_8BIT)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_high_bit_depth_tiff_modes(tmp_path, mode):
    if mode == "I;16B":
        im = Image.frombytes(mode, (5, 1), _SIXTEEN.astype(">u2").tobytes())
    else:
        im = Image.fromarray(_SIXTEEN.astype(np.int32))
    assert im.mode == mode
    out = np.asarray(_load_saved(tmp_path, im, "g.tiff"))
    np.testing.assert_array_equal(out[..., 0], _SIXTEEN_8BIT)


def test_float_tiff(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert im.mode == "F"
    out = np.asarray(_load_saved(tmp_path, im, "f.tiff"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[...] = (0, 0, 255)
    a[:10, :10] = (255, 0, 0)  # red block in the stored top-left corner
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    out = load_rgb(p)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    # Clockwise rotation moves the top-left corner to the top-right.
    assert arr[5, 15, 0] > 200 and arr[5, 15, 2] < 60
    assert arr[5, 5, 0] < 60 and arr[35, 5, 0] < 60 and arr[35, 15, 0] < 60


def test_result_is_detached_from_file(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_noise(8, 8)).save(p)
    out = load_rgb(p)
    p.unlink()
    assert out.getpixel((0, 0)) is not None and out.copy().size == (8, 8)


# ---------------------------------------------------------------- digest


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_file_digest(tmp_path, chunk):
    data = np.random.default_rng(1).bytes(10_000)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert file_digest(p, chunk=chunk) == hashlib.sha256(data).hexdigest()


def test_file_digest_empty(tmp_path):
    p = tmp_path / "e"
    p.write_bytes(b"")
    assert file_digest(str(p)) == hashlib.sha256(b"").hexdigest()
