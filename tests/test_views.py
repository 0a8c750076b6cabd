"""cskd_cache.data.views: view policy, eval box geometry, seeded crop sampling and exact rendering."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from cskd_cache.data.views import ViewPolicy, eval_box, render_tensor, render_view, sample_views, to_tensor, view_seed

OPEN_CLIP_CFG = {"size": [224, 224], "resize_mode": "shortest", "crop_pct": 1.0,
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
FULL = (0.0, 0.0, 1.0, 1.0)


def _smooth(width: int, height: int) -> Image.Image:
    """Low-frequency colour image: resampling differences stay small, geometry errors do not."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(2 * np.pi * x / width)
    g = 255.0 * y / (height - 1)
    b = 127.5 + 127.5 * np.cos(2 * np.pi * (x + y) / (width + height))
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- ViewPolicy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_views": 0},
        {"n_views": 2.0},
        {"n_views": True},
        {"scale": (0.0, 1.0)},
        {"scale": (0.6, 0.5)},
        {"scale": (0.5, 1.1)},
        {"scale": (math.nan, 1.0)},
        {"scale": (0.5,)},
        {"scale": "ab"},
        {"ratio": (0.0, 1.0)},
        {"ratio": (2.0, 1.0)},
        {"ratio": (1.0, math.inf)},
        {"flip_p": -0.1},
        {"flip_p": 1.5},
        {"flip_p": "half"},
        {"seed": "0"},
        {"seed": 1.0},
    ],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ViewPolicy(**kwargs)


def test_policy_defaults_and_roundtrip():
    p = ViewPolicy(n_views=8, scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_p=0.25, seed=7)
    d = json.loads(json.dumps(p.to_dict()))
    assert d == {"n_views": 8, "scale": [0.3, 0.9], "ratio": [0.5, 2.0], "flip_p": 0.25, "seed": 7}
    q = ViewPolicy.from_dict(d)
    assert q == p and hash(q) == hash(p) and isinstance(q.scale, tuple)
    assert ViewPolicy.from_dict({}) == ViewPolicy()
    assert ViewPolicy().scale == (0.25, 1.0)


def test_policy_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        ViewPolicy.from_dict({"n_views": 2, "sclae": [0.5, 1.0]})


def test_policy_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ViewPolicy().n_views = 3  # type: ignore[misc]


# ---------------------------------------------------------------- eval_box


@pytest.mark.parametrize(
    ("cfg", "wh", "expected"),
    [
        (OPEN_CLIP_CFG, (400, 300), (0.125, 0.0, 0.875, 1.0)),
        (OPEN_CLIP_CFG, (300, 400), (0.0, 0.125, 1.0, 0.875)),
        (OPEN_CLIP_CFG, (256, 256), FULL),
        # timm: Resize(floor(224 / 0.875) = 256) then CenterCrop(224): 224/256 of the short side.
        ({**OPEN_CLIP_CFG, "crop_pct": 0.875}, (400, 300), (0.171875, 0.0625, 0.828125, 0.9375)),
        ({**OPEN_CLIP_CFG, "resize_mode": "squash"}, (400, 300), FULL),
        ({**OPEN_CLIP_CFG, "resize_mode": "longest"}, (400, 300), FULL),
    ],
)
def test_eval_box(cfg, wh, expected):
    assert eval_box(cfg, *wh) == pytest.approx(expected, abs=1e-12)


def test_eval_box_clips_to_image():
    # Non-square target wider than the resized image: the box cannot leave the image.
    box = eval_box({"size": [224, 448], "resize_mode": "shortest", "crop_pct": 1.0}, 300, 300)
    assert box == pytest.approx((0.0, 0.25, 1.0, 0.75))


def test_eval_box_unknown_mode():
    with pytest.raises(ValueError, match="resize_mode"):
        eval_box({**OPEN_CLIP_CFG, "resize_mode": "zoom"}, 10, 10)


# ---------------------------------------------------------------- sample_views


def test_view_seed_is_sha256_of_seed_and_key():
    digest = hashlib.sha256(b"3:a/b.jpg").digest()
    assert view_seed(3, "a/b.jpg") == int.from_bytes(digest[:8], "little")


def test_sample_views_shape_and_first_row():
    box = eval_box(OPEN_CLIP_CFG, 400, 300)
    v = sample_views(ViewPolicy(n_views=5), "k", 400, 300, box)
    assert v.shape == (5, 5) and v.dtype == np.float32
    np.testing.assert_allclose(v[0], [*box, 0.0], atol=1e-7)
    one = sample_views(ViewPolicy(), "k", 400, 300, box)
    assert one.shape == (1, 5)


def test_sample_views_geometry_over_many_keys():
    policy = ViewPolicy(n_views=8, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3))
    W, H = 400, 300
    v = np.concatenate([sample_views(policy, f"img{i}", W, H, FULL)[1:] for i in range(200)])
    x0, y0, x1, y1, flip = v.T
    assert (v[:, :4] >= 0).all() and (v[:, :4] <= 1).all()
    assert (x0 < x1).all() and (y0 < y1).all()
    area = (x1 - x0) * (y1 - y0)
    assert area.min() >= 0.25 - 0.01 and area.max() <= 1.0
    aspect = (x1 - x0) * W / ((y1 - y0) * H)
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert area.max() - area.min() > 0.5  # actually spread over the range, not one crop
    # integer pixel boxes, like torchvision's get_params
    np.testing.assert_allclose(v[:, [0, 2]] * W, np.rint(v[:, [0, 2]] * W), atol=1e-3)
    np.testing.assert_allclose(v[:, [1, 3]] * H, np.rint(v[:, [1, 3]] * H), atol=1e-3)
    assert set(np.unique(flip)) <= {0.0, 1.0}
    assert 0.4 < flip.mean() < 0.6


def test_sample_views_deterministic_and_order_independent():
    p = ViewPolicy(n_views=6, seed=1)
    a1 = sample_views(p, "a", 640, 480, FULL)
    b1 = sample_views(p, "b", 640, 480, FULL)
    b2 = sample_views(p, "b", 640, 480, FULL)
    a2 = sample_views(ViewPolicy(n_views=6, seed=1), "a", 640, 480, FULL)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1[1:], b1[1:])
    assert not np.array_equal(a1[1:], sample_views(ViewPolicy(n_views=6, seed=2), "a", 640, 480, FULL)[1:])


def test_sample_views_does_not_touch_global_rng():
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    sample_views(ViewPolicy(n_views=4), "x", 100, 100, FULL)
    assert np.random.random() == before


def test_sample_views_golden():
    # Pinned output: if this changes, every cached view changes, so the cache format must be bumped.
    v = sample_views(ViewPolicy(n_views=4, seed=0), "img/0001.jpg", 640, 480, (0.125, 0.0, 0.875, 1.0))
    px = np.rint(v[1:] * [640, 480, 640, 480, 1]).astype(int).tolist()
    assert px == [[47, 1, 428, 473, 0], [113, 90, 538, 445, 1], [339, 106, 581, 425, 1]]


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flip_extremes_and_boxes_independent_of_flip_p(flip_p):
    v = sample_views(ViewPolicy(n_views=16, flip_p=flip_p), "k", 320, 240, FULL)
    ref = sample_views(ViewPolicy(n_views=16, flip_p=0.5), "k", 320, 240, FULL)
    assert v[0, 4] == 0.0
    assert (v[1:, 4] == flip_p).all()
    np.testing.assert_array_equal(v[:, :4], ref[:, :4])


def test_fallback_centre_crop_clamped_to_ratio():
    # Full-area square crops never fit a 4:1 image, so all 10 attempts fail.
    v = sample_views(ViewPolicy(n_views=3, scale=(1.0, 1.0), ratio=(1.0, 1.0)), "k", 400, 100, FULL)
    np.testing.assert_allclose(v[1:, :4], [[0.375, 0.0, 0.625, 1.0]] * 2)


# ---------------------------------------------------------------- rendering


def test_render_full_box_equals_resize():
    img = _noise(64, 48)
    out = render_view(img, [*FULL, 0.0], 32)
    assert out.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)))


def test_render_size_is_h_w():
    out = render_view(_noise(64, 48), [*FULL, 0.0], (20, 30), "bilinear")
    assert out.size == (30, 20)


def test_render_matches_manual_crop_resize():
    img = _smooth(200, 100)
    view = [0.25, 0.1, 0.75, 0.9, 0.0]  # (50, 10, 150, 90) in pixels
    out = np.asarray(render_view(img, view, 64)).astype(float)
    manual = np.asarray(img.crop((50, 10, 150, 90)).resize((64, 64), Image.Resampling.BICUBIC)).astype(float)
    assert np.abs(out - manual).mean() < 1.0
    # Same geometry, exactly, with nearest neighbour on an integer box.
    near = render_view(img, view, (80, 100), "nearest")
    np.testing.assert_array_equal(np.asarray(near), np.asarray(img.crop((50, 10, 150, 90))))


def test_render_flip():
    img = _noise(50, 40)
    view = [0.1, 0.2, 0.8, 0.9, 0.0]
    plain = render_view(img, view, 24)
    flipped = render_view(img, [*view[:4], 1.0], 24)
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(ImageOps.mirror(plain)))


@pytest.mark.parametrize("name", ["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"])
def test_render_interpolations(name):
    assert render_view(_noise(30, 20), [*FULL, 0.0], 8, name).size == (8, 8)


def test_render_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        render_view(_noise(8, 8), [*FULL, 0.0], 4, "cubic-ish")


def test_to_tensor_matches_torchvision():
    img = _noise(33, 17)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = to_tensor(img, mean, std)
    ref = TF.normalize(TF.to_tensor(img), mean, std)
    assert ours.dtype == torch.float32 and ours.shape == (3, 17, 33) and ours.is_contiguous()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("wh", [(400, 300), (300, 400)])
def test_eval_view_matches_torchvision_pipeline(crop_pct, wh):
    cfg = {**OPEN_CLIP_CFG, "crop_pct": crop_pct}
    img = _smooth(*wh)
    ours = render_tensor(img, [*eval_box(cfg, *wh), 0.0], 224, "bicubic", cfg["mean"], cfg["std"])
    ref = T.Compose([
        T.Resize(math.floor(224 / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    # correct geometry gives ~0.003; the other crop_pct already gives ~0.07
    assert (ours - ref).abs().mean() < 0.01
