import pytest
import torch

from cskd_cache.models.scorer import build_head, load_iaa_model, save_iaa_model
from cskd_cache.models.students import build_student

SPEC = "timm:test_vit"


@pytest.mark.parametrize("kind,bins,scale", [("distribution", 10, (1, 10)), ("distribution", 5, (1, 100)),
                                             ("scalar", None, (0, 1))])
def test_save_load_round_trip_and_native_scale(tmp_path, kind, bins, scale):
    torch.manual_seed(0)
    enc = build_student(SPEC, pretrained_ok=False)
    head = build_head(kind, enc.pooled_dim, bins)
    save_iaa_model(tmp_path, enc, head, {"kind": kind, "bins": bins, "in_dim": enc.pooled_dim},
                   {"name": "toy", "scale": list(scale), "bins": bins, "threshold": 5.0})
    scorer = load_iaa_model(tmp_path)
    x = torch.randn(3, 3, *enc.input_cfg["size"])
    enc.eval(), head.eval()
    with torch.no_grad():
        ref = head(enc(x)[0])
    out = scorer.score(x)
    lo, hi = scale
    assert torch.all(out["score"] >= lo) and torch.all(out["score"] <= hi) if kind == "distribution" else True
    if kind == "distribution":
        p = ref.softmax(-1)
        mean = p @ torch.arange(1, bins + 1, dtype=torch.float32)
        torch.testing.assert_close(out["score"], lo + (mean - 1) * (hi - lo) / (bins - 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["dist"], p, atol=1e-6, rtol=0)
        assert out["std"].shape == (3,)
    else:
        torch.testing.assert_close(out["score"], lo + ref * (hi - lo), atol=1e-5, rtol=0)
        assert out["dist"] is None


def test_missing_run_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cskd finetune"):
        load_iaa_model(tmp_path)


def test_saved_model_files_follow_the_umask(tmp_path):
    import os
    import stat

    enc = build_student(SPEC, pretrained_ok=False)
    old = os.umask(0o022)
    try:
        save_iaa_model(tmp_path, enc, build_head("scalar", enc.pooled_dim), {"kind": "scalar", "in_dim": enc.pooled_dim},
                       {"name": "toy", "scale": [0, 1], "bins": None, "threshold": 0.5})
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}
