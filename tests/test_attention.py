"""`cskd attention`: recomputed probabilities equal the models' own, hand-computed statistics, the command end to end.

Models are random-init and offline: timm's ``test_vit`` (160 px, 16 px patches -> 10x10 grid, CLS token, 6 blocks,
2 heads) and the tiny open_clip ViT of conftest.py (64 px, 4x4 grid, 2 blocks, nn.MultiheadAttention).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from _imgs import make_images
from cskd_cli.main import app
from typer.testing import CliRunner

from cskd_cache.inspect.attention import (
    NotAttentionModel,
    UnsupportedAttention,
    attention_probs,
    attention_stats,
    distance_matrix,
    from_module,
    load_attention_model,
    measure,
    select_images,
)
from cskd_cache.models.runs import save_encoder
from cskd_cache.models.students import build_student

runner = CliRunner()




pytestmark = [pytest.mark.filterwarnings("ignore:.*RANDOM weights"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("attn_imgs")
    make_images(d, 5)
    return d


def mean_pair_distance(h: int, w: int, ph: float, pw: float) -> float:
    """Mean over all ordered (query, key) patch pairs, self included, of their pixel distance: uniform attention."""
    cells = list(itertools.product(range(h), range(w)))
    total = sum(math.hypot((r1 - r2) * ph, (c1 - c2) * pw) for (r1, c1), (r2, c2) in itertools.product(cells, cells))
    return total / len(cells) ** 2


# --- probabilities: the recomputation against each library's own ---------------------------------------------


def test_timm_probs_equal_timms_unfused_attention():
    model = load_attention_model("timm:test_vit")
    theirs, ours = [], []
    for blk in model.module.blocks:
        blk.attn.fused_attn = False  # timm's manual path: its softmax output goes through attn_drop
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: theirs.append(o.detach().clone()))
        blk.attn.register_forward_pre_hook(lambda m, a: ours.append(attention_probs(m, a[0])))
    model.forward(torch.randn(2, 3, 160, 160))
    assert len(theirs) == len(ours) == 6
    for a, b in zip(theirs, ours):
        assert a.shape == b.shape == (2, 2, 101, 101)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_open_clip_probs_equal_torch_need_weights(tiny_clip_name):
    model = load_attention_model(f"open_clip:{tiny_clip_name}")
    assert model.family == "open_clip" and len(model.sites) == 2
    assert (model.grid, model.patch_size, model.num_prefix_tokens) == ((4, 4), (16, 16), 1)
    pairs = []

    def capture(mha, args):
        x = args[0]
        # torch's own probabilities; calling forward directly skips this very hook
        _, w = torch.nn.MultiheadAttention.forward(mha, x, x, x, need_weights=True, average_attn_weights=False)
        pairs.append((w.detach().clone(), attention_probs(mha, x if mha.batch_first else x.transpose(0, 1))))

    handles = [s.register_forward_pre_hook(capture) for s in model.sites]
    model.forward(torch.randn(3, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(pairs) == 2
    for theirs, ours in pairs:
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_open_clip_own_attention_module(qk_norm):
    # open_clip's unfused branch cannot run on 4-D tensors (torch.bmm), so check the probabilities through the
    # module's real (fused) output: probs @ v, merged heads, out_proj must reproduce it.
    from open_clip.transformer import Attention

    attn = Attention(32, num_heads=4, qk_norm=qk_norm).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        if qk_norm:  # non-trivial norm weights, so leaving the norm out would show
            attn.ln_q.weight.uniform_(0.5, 2.0)
            attn.ln_k.bias.normal_()
        probs = attention_probs(attn, x)
        v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)[2]
        v = v.reshape(2, 7, 4, 8).transpose(1, 2)
        rebuilt = attn.out_proj((probs @ v).transpose(1, 2).reshape(2, 7, 32))
        torch.testing.assert_close(rebuilt, attn(x), atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 4, 7, 7)


# --- statistics: hand-computed cases ----------------------------------------------------------------------------


def test_distance_matrix_is_pixel_geometry():
    d = distance_matrix((2, 3), (8, 4))  # non-square patches: rows 8 px apart, columns 4 px
    assert d.shape == (6, 6)
    assert float(d[0, 0]) == 0
    assert float(d[0, 1]) == pytest.approx(4)
    assert float(d[0, 3]) == pytest.approx(8)
    assert float(d[0, 5]) == pytest.approx(math.hypot(8, 8))


def test_identity_attention_has_distance_and_entropy_zero_after_dropping_prefix():
    # Every patch query gives 0.3 to the CLS token and 0.7 to itself; CLS attends uniformly (it is no query here).
    t, p = 9, 1
    probs = torch.zeros(2, 3, p + t, p + t)
    probs[:, :, 0, :] = 1 / (p + t)
    for q in range(t):
        probs[:, :, p + q, 0] = 0.3
        probs[:, :, p + q, p + q] = 0.7
    s = attention_stats(probs, p, distance_matrix((3, 3), (16, 16)))
    assert torch.all(s["distance"] == 0) and torch.all(s["entropy"] == 0)
    torch.testing.assert_close(s["prefix_mass"], torch.full((2, 3), 0.3))


def test_identity_attention_through_a_real_vit(images, monkeypatch):
    # Every token attends only to itself: the statistics of the whole pipeline (hooks, prefix removal,
    # averaging over images) must be exactly 0.
    import cskd_cache.models.attention_stats as attention  # where the hooks recompute the probabilities

    def identity(module, x):
        return torch.eye(x.shape[1]).expand(x.shape[0], module.num_heads, -1, -1)

    monkeypatch.setattr(attention, "attention_probs", identity)
    rec = measure(load_attention_model("timm:test_vit"), select_images(images, 3))
    for layer in rec["layers"]:
        assert layer["distance"] == [0.0, 0.0] and layer["entropy"] == [0.0, 0.0]
        assert layer["prefix_mass"] == [0.0, 0.0]


def test_half_self_half_right_neighbour():
    # Queries in the first of two columns split their patch attention evenly between themselves and the patch to
    # their right (16 px away); the second column attends to itself. Prefix mass is renormalised away.
    probs = torch.zeros(1, 1, 5, 5)  # 1 prefix + 2x2 grid
    probs[0, 0, 1:, 0] = 0.5
    for q in (0, 2):  # left column
        probs[0, 0, 1 + q, 1 + q] = probs[0, 0, 1 + q, 2 + q] = 0.25
    for q in (1, 3):
        probs[0, 0, 1 + q, 1 + q] = 0.5
    s = attention_stats(probs, 1, distance_matrix((2, 2), (16, 16)))
    assert float(s["distance"]) == pytest.approx((8 + 0 + 8 + 0) / 4)
    assert float(s["entropy"]) == pytest.approx((math.log(2) * 2) / 4)
    assert float(s["prefix_mass"]) == pytest.approx(0.5)


def test_uniform_attention_in_a_real_vit(images):
    # Zero the q and k projections: every logit is equal, every attention row uniform.
    model = load_attention_model("timm:test_vit")
    with torch.no_grad():
        for blk in model.module.blocks:
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * dim] = 0
            blk.attn.qkv.bias[: 2 * dim] = 0
    rec = measure(model, select_images(images, None), batch_size=2)
    assert rec["images"] == 5 and rec["num_layers"] == 6 and rec["num_heads"] == 2
    expected = mean_pair_distance(10, 10, 16, 16)
    assert rec["uniform_distance"] == pytest.approx(expected)
    for layer in rec["layers"]:
        assert layer["entropy"] == pytest.approx([math.log(100)] * 2, abs=1e-5)
        assert layer["distance"] == pytest.approx([expected] * 2, rel=1e-5)
        assert layer["prefix_mass"] == pytest.approx([1 / 101] * 2, rel=1e-4)


def test_uniform_attention_in_open_clip(tiny_clip_name, images):
    model = load_attention_model(f"open_clip:{tiny_clip_name}")
    with torch.no_grad():
        for mha in model.sites:
            width = mha.embed_dim
            mha.in_proj_weight[: 2 * width] = 0
            mha.in_proj_bias[: 2 * width] = 0
    rec = measure(model, select_images(images, None))
    for layer in rec["layers"]:
        assert layer["entropy"] == pytest.approx([math.log(16)] * 2, abs=1e-5)
        assert layer["distance"] == pytest.approx([mean_pair_distance(4, 4, 16, 16)] * 2, rel=1e-5)


def test_register_tokens_are_prefix_tokens(images):
    # A timm ViT with 4 registers + CLS: uniform attention puts 5/21 of each patch's mass on the prefix, and the
    # patch-to-patch statistics are those of the 4x4 grid alone.
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, reg_tokens=4)
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight[:64] = 0
            blk.attn.qkv.bias[:64] = 0
    from cskd_cache.models.teachers import make_preprocess_cfg, py_transform

    transform = py_transform(make_preprocess_cfg(64, "shortest", 1.0, "bicubic", [0.5] * 3, [0.25] * 3))
    model = from_module(vit, transform, 64, "test:reg4")
    assert model.num_prefix_tokens == 5 and model.grid == (4, 4)
    rec = measure(model, select_images(images, 2))
    for layer in rec["layers"]:
        assert layer["prefix_mass"] == pytest.approx([5 / 21] * 2, rel=1e-5)
        assert layer["entropy"] == pytest.approx([math.log(16)] * 2, abs=1e-5)
        assert layer["distance"] == pytest.approx([mean_pair_distance(4, 4, 16, 16)] * 2, rel=1e-5)


def test_attention_kinds_that_cannot_be_recomputed_are_refused():
    with pytest.raises(UnsupportedAttention, match="RelPosAttention"):
        load_attention_model("timm:test_vit_relpos")  # relative position bias: recomputing q.k would be wrong
    with pytest.raises(NotAttentionModel, match="only ViT-family models have attention"):
        load_attention_model("timm:test_resnet")


def test_hooks_leave_the_model_unchanged(images):
    model = load_attention_model("timm:test_vit")
    x = torch.randn(1, 3, 160, 160)
    before = model.forward(x)
    measure(model, select_images(images, 2))
    assert all(not s._forward_pre_hooks for s in model.sites)
    torch.testing.assert_close(model.forward(x), before)


# --- the command ---------------------------------------------------------------------------------------------


def check_outputs(out, n_models):
    data = json.loads((out / "attention.json").read_text())
    assert data["format"] == "cskd-attention" and len(data["models"]) == n_models
    for name in ("attention_distance.png", "attention_entropy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    for m in data["models"]:
        t = m["grid"][0] * m["grid"][1]
        assert len(m["layers"]) == m["num_layers"]
        for layer in m["layers"]:
            assert len(layer["distance"]) == len(layer["entropy"]) == m["num_heads"]
            assert all(0 <= e <= math.log(t) + 1e-6 for e in layer["entropy"])
            assert all(0 <= d <= max(m["input_size"]) * 1.5 for d in layer["distance"])
    return data


def test_cli_compare_open_clip_and_an_aligned_run(tmp_path, images, tiny_clip_name):
    # An aligned-run directory exactly as `cskd align` writes it (weights untrained; the format is what matters).
    run = tmp_path / "run"
    save_encoder(build_student("timm:test_vit", size=96), run)
    out = tmp_path / "out"
    res = runner.invoke(app, ["attention", "--compare", f"open_clip:{tiny_clip_name}@none", f"run:{run}",
                              "--images", str(images), "--out", str(out), "--max-images", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = check_outputs(out, 2)
    oc, st = data["models"]
    assert (oc["num_layers"], oc["num_heads"], oc["grid"], oc["images"]) == (2, 2, [4, 4], 3)
    assert st["family"] == "run/timm" and st["input_size"] == [96, 96] and st["grid"] == [6, 6]
    assert st["num_layers"] == 6 and st["images"] == 3
    assert "cskd attention" in res.output


def test_cli_timm_vit(tmp_path, images):
    out = tmp_path / "out"
    res = runner.invoke(app, ["attention", "--model", "timm:test_vit", "--images", str(images), "--out", str(out),
                              "--max-images", "2", "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (m,) = check_outputs(out, 1)["models"]
    assert (m["num_layers"], m["num_heads"], m["grid"], m["patch_size"]) == (6, 2, [10, 10], [16, 16])
    assert m["uniform_entropy"] == pytest.approx(math.log(100))


def test_cli_cnn_is_a_clear_error_and_writes_nothing(tmp_path, images):
    out = tmp_path / "out"
    res = runner.invoke(app, ["attention", "--model", "timm:test_efficientnet", "--images", str(images),
                              "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1
    assert "timm:test_efficientnet" in res.output and "only ViT-family models have attention" in res.output
    assert not out.exists()


def test_cli_usage_errors(tmp_path, images):
    res = runner.invoke(app, ["attention", "--images", str(images), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no model" in res.output
    res = runner.invoke(app, ["attention", "--model", "timm:test_vit", "--images", str(tmp_path / "nowhere"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nowhere" in res.output
    res = runner.invoke(app, ["attention", "--model", f"run:{tmp_path}", "--images", str(images),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "student.json" in res.output
