"""`cskd extract --attention-stats`: the teacher's per-view attention statistics, stored once and read back.

The stored numbers must be the ones `cskd attention` computes: with one view (view 0 is the teacher's own eval
transform, which is what `measure` feeds it) the cache's rows averaged equal a fresh measurement of the same
teacher over the same images. `cskd attention --cache` then reads them without building the teacher, and
`cskd distill --attn-reference teacher` turns them into the constraint's reference profile.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from _iaa_task import make_images, write_labels
from cskd_cli.main import app
from typer.testing import CliRunner

import cskd_cache.models.teachers as teachers_mod
from cskd_cache.cache.reader import open_cache
from cskd_cache.errors import CacheError, EvaluateError
from cskd_cache.inspect.attention import (
    depth_matched,
    distance_matrix,
    load_attention_model,
    measure,
    run_attention,
)
from cskd_cache.stages.distill import DistillConfig, DistillError, run_distill
from cskd_cache.stages.extract import ExtractConfig, run_extract

runner = CliRunner()
pytestmark = [pytest.mark.filterwarnings("ignore:.*RANDOM weights"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_name):
    d = tmp_path_factory.mktemp("attn_stats")
    paths, scores = make_images(d / "imgs", 30)
    write_labels(d / "labels.csv", paths, scores, splits=[("train", "train", "train", "val", "test")[i % 5]
                                                          for i in range(30)])
    spec = f"open_clip:{tiny_clip_name}@none"
    run_extract(ExtractConfig(teacher=spec, out=str(d / "one"), images=[str(d / "imgs")], views=1, num_workers=0,
                              shard_size=16, attention_stats=True))
    run_extract(ExtractConfig(teacher=spec, out=str(d / "two"), images=[str(d / "imgs")], views=2, num_workers=0,
                              attention_stats=True))
    return d, spec


def test_stored_statistics_equal_a_fresh_measurement_of_the_same_views(setup):
    d, spec = setup
    cache = open_cache(d / "one")
    info = cache.manifest["storage"]["attention_stats"]
    dist, ent = cache.read_all("attn_distance"), cache.read_all("attn_entropy")
    assert dist.shape == ent.shape == (30, 1, info["num_layers"], info["num_heads"]) == (30, 1, 2, 2)
    assert len(cache.shards) == 2  # rows come from both shards, in row order
    assert info["uniform_distance"] == pytest.approx(float(distance_matrix((4, 4), (16, 16)).double().mean()))
    fresh = measure(load_attention_model(spec), [cache.row(i).path for i in range(len(cache))], batch_size=7)
    for layer in fresh["layers"]:
        i = layer["layer"]
        assert dist[:, 0, i].mean(0) == pytest.approx(layer["distance"], rel=1e-4)
        assert ent[:, 0, i].mean(0) == pytest.approx(layer["entropy"], rel=1e-4)
    # per image too, not only on average: one image measured alone
    one = measure(load_attention_model(spec), [cache.row(3).path])
    assert dist[3, 0, 1] == pytest.approx(one["layers"][1]["distance"], rel=1e-4)
    # a second view is another crop: its statistics are stored too and differ from view 0's
    two = open_cache(d / "two").read_all("attn_distance")
    assert two.shape == (30, 2, 2, 2) and not np.allclose(two[:, 0], two[:, 1])
    assert two[:, 0] == pytest.approx(dist[:, 0], rel=1e-4)


def test_a_cnn_teacher_is_refused_before_anything_is_written(tmp_path):
    make_images(tmp_path / "imgs", 3)
    with pytest.raises(CacheError, match="--attention-stats: .*drop --attention-stats"):
        run_extract(ExtractConfig(teacher="timm:test_resnet@none", out=str(tmp_path / "cache"),
                                  images=[str(tmp_path / "imgs")], num_workers=0, attention_stats=True))
    assert not (tmp_path / "cache").exists()


def test_attention_reads_the_cache_without_running_the_teacher(setup, tmp_path, monkeypatch):
    d, spec = setup
    measured = run_attention([spec], d / "imgs", tmp_path / "measured", max_images=None)["models"][0]

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was built: stored statistics should have been read")

    monkeypatch.setattr(teachers_mod, "build_teacher", no_teacher)
    res = runner.invoke(app, ["attention", "--cache", str(d / "one"), "--out", str(tmp_path / "stored")])
    assert res.exit_code == 0, res.output
    stored = json.loads((tmp_path / "stored" / "attention.json").read_text())["models"][0]
    assert stored["source"] == "cache" and stored["images"] == 30 and stored["num_layers"] == 2
    for a, b in zip(stored["layers"], measured["layers"]):
        assert a["distance"] == pytest.approx(b["distance"], rel=1e-4)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
    assert (tmp_path / "stored" / "attention_distance.png").stat().st_size > 0


def test_attention_cache_without_statistics_is_one_line(setup, tmp_path):
    d, spec = setup
    run_extract(ExtractConfig(teacher=spec, out=str(tmp_path / "plain"), images=[str(d / "imgs")], num_workers=0))
    res = runner.invoke(app, ["attention", "--cache", str(tmp_path / "plain"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "extract --attention-stats" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "attention.json").exists()
    with pytest.raises(EvaluateError, match="needs --images"):
        run_attention([spec], None, tmp_path / "o2")


def test_depth_matching_by_relative_depth():
    assert depth_matched([1.0, 3.0], 3) == pytest.approx([1.0, 2.0, 3.0])
    assert depth_matched([0.0, 1.0, 2.0, 3.0, 4.0], 2) == pytest.approx([0.0, 4.0])
    assert depth_matched([2.0, 4.0], 1) == [3.0]


def test_distill_keeps_the_teachers_profile_rescaled_to_the_student(setup, tmp_path):
    d, _ = setup
    base = dict(cache=str(d / "two"), labels=f"csv:{d / 'labels.csv'}", teacher="cache-head", student="timm:test_vit",
                size=32, attn_distance=1.0, attn_reference="teacher", batch_size=4, num_workers=0, max_steps=2,
                teacher_steps=5, labels_outside_cache=False)
    run_distill(DistillConfig(out=str(tmp_path / "run"), **base))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cache = open_cache(d / "two")
    info = cache.manifest["storage"]["attention_stats"]
    teacher = cache.read_all("attn_distance").astype(np.float64).mean(axis=(0, 1, 3)) / info["uniform_distance"]
    # test_vit: 6 blocks; at 32 px its 16 px patches make a 2x2 grid
    student_uniform = float(distance_matrix((2, 2), (16, 16)).double().mean())
    want = [v * student_uniform for v in depth_matched(list(teacher), 6)]
    assert saved["resolved"]["attn_reference"] == pytest.approx(want, rel=1e-5)
    assert saved["attn_reference"] == "teacher"
    # a cache without statistics: refused before the run directory exists
    run_extract(ExtractConfig(teacher=f"open_clip:{cache.manifest['teacher']['spec'].split(':', 1)[1]}",
                              out=str(tmp_path / "plain"), images=[str(d / "imgs")], num_workers=0))
    with pytest.raises(DistillError, match="holds no attention statistics"):
        run_distill(DistillConfig(out=str(tmp_path / "refused"), **{**base, "cache": str(tmp_path / "plain")}))
    assert not (tmp_path / "refused").exists()
