"""cskd_cache.models.teachers: spec parsing and the Teacher output contract (offline, CPU, random-init models)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cskd_cache.models.teachers import EncoderSpec, Teacher, build_teacher, load_object, parse_spec


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _quiet_build(spec, **kw) -> Teacher:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_teacher(spec, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- parse_spec

def test_parse_good_specs(tiny_clip_name, tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    assert parse_spec(f"open_clip:{tiny_clip_name}") == EncoderSpec(
        "open_clip", tiny_clip_name, None, f"open_clip:{tiny_clip_name}")
    assert parse_spec(f"open_clip:{tiny_clip_name}@none").pretrained is None
    assert parse_spec("open_clip:ViT-B-32@openai").pretrained == "openai"
    assert parse_spec("open_clip:ViT-B-32@openai").weights_path is None
    s = parse_spec(f"  open_clip:{tiny_clip_name}@{ckpt}  ")
    assert (s.kind, s.pretrained, s.weights_path, s.raw) == ("open_clip", str(ckpt), str(ckpt), s.raw.strip())
    assert parse_spec("timm:test_vit").pretrained is None
    assert parse_spec("timm:test_vit@NONE").pretrained is None
    assert parse_spec("timm:test_vit@true").pretrained == "true"
    assert parse_spec(f"timm:test_resnet@{ckpt}").weights_path == str(ckpt)
    assert parse_spec("py:pkg.mod:make") == EncoderSpec("py", "pkg.mod:make", None, "py:pkg.mod:make")


def test_the_suite_cannot_reach_the_network():
    """conftest's guard: the hub tags named above are parsed, never fetched (a fetch would fail here)."""
    import socket

    with pytest.raises(AssertionError, match="tests must run offline"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("spec, needle", [
    ("", "malformed"),
    ("ViT-B-32", "malformed"),
    ("openclip:ViT-B-32", "open_clip"),  # unknown scheme, suggests the right one
    ("open_clip:@openai", "missing model name"),
    ("open_clip:ViT-B-3", "ViT-B-32"),  # closest names
    ("open_clip:ViT-B-3", "open_clip.list_models()"),  # the fix
    ("open_clip:ViT-B-32@/no/such/file.pt", "does not exist"),
    ("open_clip:ViT-B-32@no_such_tag", "laion2b_s34b_b79k"),  # lists the known tags
    ("timm:test_vitt", "test_vit"),
    ("timm:test_vit@/no/such/model.pth", "does not exist"),
    ("timm:test_vit@no_such_tag", "unknown timm pretrained tag"),
    ("py:justmodule", "py:package.module:factory"),
    ("py:mod:make@w.pt", "malformed py spec"),
    ("py:bad-name:make", "malformed py spec"),
])
def test_parse_bad_specs(spec, needle):
    with pytest.raises(ValueError) as info:
        parse_spec(spec)
    msg = str(info.value)
    assert needle in msg and repr(spec) in msg and "\n" not in msg


def test_load_object(tmp_path, monkeypatch):
    assert load_object("os.path:join") is __import__("os").path.join
    assert load_object("cskd_cache.models.teachers:EncoderSpec.weights_path") is EncoderSpec.weights_path
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        load_object("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        load_object("os.path:nope")
    with pytest.raises(ValueError, match="malformed"):
        load_object("os.path.join")
    (tmp_path / "broken_mod_xyz.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="boom"):
        load_object("broken_mod_xyz:f")


# ---------------------------------------------------------------- open_clip

def _block_outputs(visual, x):
    """Raw (B, 1 + h*w, C) output of every block, computed by hand so it shares no code with
    forward_intermediates."""
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    t = visual.ln_pre(torch.cat([cls, t], dim=1) + visual.positional_embedding)
    outs = []
    for block in visual.transformer.resblocks:
        t = block(t)
        outs.append(t)
    return outs


def test_open_clip_tiny_outputs(tiny_clip_checkpoint):
    name, _, model = tiny_clip_checkpoint
    with pytest.warns(UserWarning, match="meaningless"):
        teacher = build_teacher(f"open_clip:{name}@none")
    teacher.model.load_state_dict(model.visual.state_dict())  # compare against the fixture's weights
    x = torch.randn(3, 3, 64, 64)
    out = teacher(x, layers=(0, -1))
    assert out["embed"].shape == (3, 32) and out["embed"].dtype == torch.float32
    assert out["tokens"].shape == (3, 4, 4, 64) and out["prefix"].shape == (3, 1, 64)
    assert set(out["layers"]) == {0, -1} and out["layers"][0].shape == (3, 4, 4, 64)
    assert (teacher.embed_dim, teacher.token_dim, teacher.grid) == (32, 64, (4, 4))
    assert (teacher.num_prefix_tokens, teacher.num_blocks) == (1, 2)

    with torch.no_grad():
        torch.testing.assert_close(out["embed"], F.normalize(model.encode_image(x), dim=-1), atol=1e-5, rtol=0)
        model.visual.output_tokens = True  # open_clip then returns (pooled, ln_post(x)[:, 1:])
        _, ref_tokens = model.visual(x)
        model.visual.output_tokens = False
        torch.testing.assert_close(out["tokens"], ref_tokens.reshape(3, 4, 4, 64), atol=1e-5, rtol=0)
        first, last = _block_outputs(model.visual, x)
        torch.testing.assert_close(out["layers"][0], first[:, 1:].reshape(3, 4, 4, 64), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["layers"][-1], last[:, 1:].reshape(3, 4, 4, 64), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["prefix"], model.visual.ln_post(last[:, :1]), atol=1e-5, rtol=0)
    assert not torch.equal(out["layers"][0], out["layers"][-1])


def test_open_clip_loads_checkpoint(tiny_clip_checkpoint):
    name, path, model = tiny_clip_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # real weights: no random-init warning
        teacher = build_teacher(f"open_clip:{name}@{path}")
    assert teacher.weights_sha256 == _sha(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x)["embed"], F.normalize(model.encode_image(x), dim=-1),
                                   atol=1e-5, rtol=0)
    d = teacher.describe()
    json.dumps(d)
    assert d["weights_sha256"] == _sha(path) and d["pretrained"] == path and d["kind"] == "open_clip"
    assert {"torch", "open_clip", "timm"} <= d["versions"].keys()
    with pytest.raises(ValueError, match="does not exist"):
        build_teacher(f"open_clip:{name}@{path}.missing.pt")


def test_open_clip_wrong_checkpoint_is_value_error(tiny_clip_name, tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        build_teacher(f"open_clip:{tiny_clip_name}@{bad}")


def test_open_clip_preprocess_is_library_transform(tiny_clip_name):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    teacher = _quiet_build(f"open_clip:{tiny_clip_name}@none")
    pp = teacher.model.preprocess_cfg
    ref = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    assert repr(teacher.preprocess) == repr(ref) == teacher.preprocess_cfg["repr"]
    _, _, oc_val = open_clip.create_model_and_transforms(tiny_clip_name)
    assert repr(teacher.preprocess) == repr(oc_val)
    cfg = teacher.preprocess_cfg
    assert cfg["size"] == [64, 64] and pp["size"] in (64, (64, 64))
    assert cfg["mean"] == pytest.approx(list(pp["mean"])) and cfg["std"] == pytest.approx(list(pp["std"]))
    assert cfg["resize_mode"] == pp["resize_mode"] and cfg["interpolation"] == pp["interpolation"]
    assert teacher.preprocess(Image.new("RGB", (90, 70), (10, 200, 30))).shape == (3, 64, 64)
    json.dumps(cfg)


def test_open_clip_timm_tower(tmp_path):
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "avg",
                          "timm_proj": "linear", "image_size": 160},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cskd-test-timm-tower.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    teacher = _quiet_build("open_clip:cskd-test-timm-tower@none")
    model = open_clip.create_model("cskd-test-timm-tower").eval()
    model.visual.load_state_dict(teacher.model.state_dict())
    x = torch.randn(2, 3, 160, 160)
    out = teacher(x, layers=(-2,))
    assert out["tokens"].shape == (2, 10, 10, 64) and out["prefix"].shape == (2, 1, 64)
    assert out["layers"][-2].shape == (2, 10, 10, 64) and teacher.embed_dim == 32
    with torch.no_grad():
        torch.testing.assert_close(out["embed"], F.normalize(model.encode_image(x), dim=-1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- timm

def test_timm_vit(tmp_path):
    import timm

    ref = timm.create_model("test_vit").eval()
    path = tmp_path / "model.pth"
    torch.save(ref.state_dict(), path)
    teacher = build_teacher(f"timm:test_vit@{path}")
    assert teacher.weights_sha256 == _sha(path)
    x = torch.randn(2, 3, 160, 160)
    out = teacher(x, layers=(0, -1))
    assert out["embed"].shape == (2, 64) and out["tokens"].shape == (2, 10, 10, 64)
    assert out["prefix"].shape == (2, 1, 64) and teacher.num_prefix_tokens == 1
    assert out["layers"][0].shape == (2, 10, 10, 64) and teacher.num_blocks == len(ref.blocks)
    with torch.no_grad():
        feats = ref.forward_features(x)
        torch.testing.assert_close(out["tokens"], feats[:, 1:].reshape(2, 10, 10, 64), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["prefix"], feats[:, :1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["embed"], F.normalize(ref.forward_head(feats, pre_logits=True), dim=-1),
                                   atol=1e-5, rtol=0)
        inter = ref.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        torch.testing.assert_close(out["layers"][0], inter.permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert teacher.preprocess_cfg["size"] == [160, 160] and teacher.preprocess_cfg["crop_pct"] == 0.95
    data_cfg = timm.data.resolve_model_data_config(ref)
    assert repr(teacher.preprocess) == repr(timm.data.create_transform(**data_cfg, is_training=False))
    with pytest.raises(ValueError, match="out of range"):
        teacher(x, layers=(len(ref.blocks),))


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_timm_cnn(name):
    import timm

    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = build_teacher(f"timm:{name}@none")
    ref = timm.create_model(name).eval()
    ref.load_state_dict(teacher.model.state_dict())
    x = torch.randn(2, 3, 160, 160)
    out = teacher(x, layers=(1, -1))
    assert out["prefix"] is None and teacher.num_prefix_tokens == 0
    with torch.no_grad():
        feats = ref.forward_features(x)
        torch.testing.assert_close(out["tokens"], feats.permute(0, 2, 3, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["embed"], F.normalize(ref.forward_head(feats, pre_logits=True), dim=-1),
                                   atol=1e-5, rtol=0)
    assert teacher.grid == tuple(feats.shape[-2:]) and out["layers"][1].ndim == 4
    assert out["layers"][1].shape[1] > out["layers"][-1].shape[1]  # earlier stage = finer grid


def test_timm_student_role_is_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_teacher("timm:test_resnet", role="student")


# ---------------------------------------------------------------- py

PY_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    preprocess_cfg = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 0.875}
    tokens_format = "NCHW"
    num_blocks = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def extract(self, x, layers=()):
        a = self.conv(x)
        b = self.conv2(a)
        feats = {0: a, 1: b, -1: b, -2: a}
        return {"embed": b.mean((2, 3)) * 10, "tokens": b, "layers": {i: feats[i] for i in layers}}


def make():
    return Tiny()


def make_squash():
    m = Tiny()
    m.preprocess_cfg = {"size": [32, 48], "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    return m


class NoExtract(nn.Module):
    preprocess_cfg = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def make_bad():
    return NoExtract()


def make_not_module():
    return object()
'''


@pytest.fixture
def py_module(tmp_path, monkeypatch):
    (tmp_path / "cskd_test_mymod.py").write_text(PY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cskd_test_mymod"
    sys.modules.pop("cskd_test_mymod", None)


def test_py_teacher(py_module):
    teacher = build_teacher(f"py:{py_module}:make")
    x = torch.randn(2, 3, 32, 32)
    out = teacher(x, layers=(0, -1))
    assert out["embed"].shape == (2, 8)
    torch.testing.assert_close(out["embed"].norm(dim=-1), torch.ones(2))
    assert out["tokens"].shape == (2, 4, 4, 8) and out["prefix"] is None
    assert out["layers"][0].shape == (2, 4, 4, 8) and set(out["layers"]) == {0, -1}
    assert (teacher.grid, teacher.token_dim, teacher.num_blocks) == ((4, 4), 8, 2)
    assert not teacher.model.conv.weight.requires_grad and not teacher.training
    cfg = teacher.preprocess_cfg
    assert cfg["size"] == [32, 32] and cfg["resize_mode"] == "shortest" and cfg["interpolation"] == "bicubic"
    assert "Resize(size=36" in cfg["repr"] and "CenterCrop(size=[32, 32])" in cfg["repr"]  # floor(32 / 0.875)
    assert teacher.preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    json.dumps(teacher.describe())


def test_py_teacher_squash(py_module):
    teacher = build_teacher(f"py:{py_module}:make_squash")
    assert teacher.preprocess(Image.new("RGB", (100, 20))).shape == (3, 32, 48)
    assert teacher.grid == (4, 6)


@pytest.mark.parametrize("factory, needle", [
    ("make_bad", "extract"), ("make_not_module", "torch.nn.Module"), ("nope", "no attribute")])
def test_py_teacher_errors(py_module, factory, needle):
    with pytest.raises(ValueError, match=needle):
        build_teacher(f"py:{py_module}:{factory}")


# ---------------------------------------------------------------- general

def test_teacher_stays_frozen(tiny_clip_name):
    teacher = _quiet_build(f"open_clip:{tiny_clip_name}@none")
    wrapper = torch.nn.Sequential(teacher)
    wrapper.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    assert not teacher(x)["embed"].requires_grad


def test_import_without_cli_deps():
    code = ("import sys; sys.modules['typer'] = None; sys.modules['rich'] = None; "
            "import cskd_cache.models.teachers as t; assert 'open_clip' not in sys.modules; print(t.build_teacher)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
