"""The proxy quality set: graded degradations get worse with level, labels follow, splits never leak."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from _imgs import make_images, photo
from PIL import Image

from cskd_cache.inspect.proxy_quality import (
    KINDS,
    LEVELS,
    _rng,
    build_proxy_set,
    degrade,
    level_score,
    main,
    score_dist,
    summarise,
)
from cskd_cache.labels import load_labels


def _img(seed: int = 0) -> Image.Image:
    return photo(96, 72, seed)


def _arr(im) -> np.ndarray:
    if isinstance(im, bytes):
        im = Image.open(io.BytesIO(im)).convert("RGB")
    return np.asarray(im, dtype=np.float64)


def _high_freq(a: np.ndarray) -> float:
    g = a.mean(-1)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.mean(lap ** 2))


def _version(im, kind, level, seed=0):
    return degrade(im, kind, level, _rng(seed, "x", kind, level))


def test_blur_removes_high_frequencies_with_level():
    im = _img()
    energy = [_high_freq(_arr(im))] + [_high_freq(_arr(_version(im, "blur", lv)[0])) for lv in range(1, LEVELS + 1)]
    assert all(a > b for a, b in zip(energy, energy[1:])), energy


def test_jpeg_files_shrink_with_level():
    im = _img()
    sizes = [len(_version(im, "jpeg", lv)[0]) for lv in range(1, LEVELS + 1)]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes


def test_noise_difference_grows_with_level():
    im = _img(1)
    ref = _arr(im)
    std = [float(np.std(_arr(_version(im, "noise", lv)[0]) - ref)) for lv in range(1, LEVELS + 1)]
    assert all(a < b for a, b in zip(std, std[1:])), std


@pytest.mark.parametrize("kind", ["exposure", "colour"])
def test_exposure_and_colour_differences_grow_with_level(kind):
    # the direction (brighter/darker; desaturation/which cast) is drawn per version: the same draw at every
    # level keeps one direction, and the change from pristine must grow with the level along it
    im = _img(2)
    ref = _arr(im)
    seen = set()
    for seed in range(8):
        outs = [degrade(im, kind, lv, np.random.default_rng(seed)) for lv in range(1, LEVELS + 1)]
        seen.add(outs[0][1].split("=")[0] + ("-" if "gain=0" in outs[0][1] else ""))
        diff = [float(np.abs(_arr(o) - ref).mean()) for o, _ in outs]
        assert all(a < b for a, b in zip(diff, diff[1:])), (seed, [p for _, p in outs], diff)
    assert len(seen) == 2  # both directions were exercised


def test_scores_decrease_with_level_and_dists_follow():
    scores = [level_score(lv) for lv in range(LEVELS + 1)]
    assert scores[0] == 10.0 and 1.0 <= scores[-1] <= 2.0
    assert all(a > b for a, b in zip(scores, scores[1:]))
    means = [float(score_dist(s) @ np.arange(1, 11)) for s in scores]
    assert all(a > b for a, b in zip(means, means[1:]))
    for s in scores:
        d = score_dist(s)
        assert d.shape == (10,) and abs(d.sum() - 1) < 1e-9 and (d >= 0).all()
    with pytest.raises(ValueError):
        level_score(6)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    srcs = make_images(root / "src", 20, seed=3)
    labels = build_proxy_set(srcs, root / "out", per_image=3, seed=7, size=48)
    return root, srcs, labels


def test_build_writes_every_version_with_labels(built):
    root, srcs, labels = built
    rows = _rows(labels)
    assert list(rows[0]) == ["path", "score", "dist", "split", "source", "kind", "level", "param"]
    assert len(rows) == len(srcs) * 4
    for r in rows:
        assert (labels.parent / r["path"]).is_file()
        level = int(r["level"])
        assert float(r["score"]) == pytest.approx(level_score(level))
        assert (r["kind"] == "pristine") == (level == 0)
        assert r["kind"] in ("pristine", *KINDS) and 0 <= level <= LEVELS
        assert len(r["dist"].split(";")) == 10
    # every source: one pristine + 3 distinct (kind, level) versions, all at the working size (shorter side 48)
    by_src = {}
    for r in rows:
        by_src.setdefault(r["source"], []).append(r)
    for versions in by_src.values():
        assert sum(v["kind"] == "pristine" for v in versions) == 1
        assert len({(v["kind"], v["level"]) for v in versions}) == 4
        sizes = {Image.open(labels.parent / v["path"]).size for v in versions}
        assert len(sizes) == 1 and min(sizes.pop()) == 48
    # scores fall with level inside every source
    for versions in by_src.values():
        ordered = sorted(versions, key=lambda v: int(v["level"]))
        assert [float(v["score"]) for v in ordered] == sorted((float(v["score"]) for v in ordered), reverse=True)


def test_split_by_source_without_leakage(built):
    _, srcs, labels = built
    rows = _rows(labels)
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["source"], r["split"]) == r["split"], f"{r['source']} is in two splits"
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 2, "test": 4}


def test_deterministic_bytes(built, tmp_path):
    root, srcs, labels = built
    again = build_proxy_set(list(reversed(srcs)), tmp_path / "again", per_image=3, seed=7, size=48, workers=2)
    assert again.read_bytes() == labels.read_bytes()
    for r in _rows(labels):
        assert (again.parent / r["path"]).read_bytes() == (labels.parent / r["path"]).read_bytes(), r["path"]
    other = build_proxy_set(srcs, tmp_path / "other", per_image=3, seed=8, size=48)
    assert other.read_bytes() != labels.read_bytes()


def test_unlabelled_extras_are_train_only_new_pairs_and_leave_labels_unchanged(built, tmp_path):
    root, srcs, labels = built
    out = build_proxy_set(srcs, tmp_path / "extra", per_image=3, seed=7, size=48, unlabelled_per_image=5)
    # the labelled set is byte-identical to a build without extras: adding unlabelled data moves no label
    assert out.read_bytes() == labels.read_bytes()
    for r in _rows(labels):
        assert (out.parent / r["path"]).read_bytes() == (labels.parent / r["path"]).read_bytes(), r["path"]
    rows, extra = _rows(labels), _rows(out.parent / "unlabelled.csv")
    assert list(extra[0]) == ["path", "source", "kind", "level", "param"]
    split_of = {r["source"]: r["split"] for r in rows}
    train = {s for s, sp in split_of.items() if sp == "train"}
    assert {e["source"] for e in extra} == train  # no version of a val/test photo is ever in the pool
    assert len(extra) == 5 * len(train)
    assert sorted(p.name for p in (out.parent / "unlabelled").iterdir()) == sorted(e["path"][11:] for e in extra)
    labelled_pairs = {(r["source"], r["kind"], r["level"]) for r in rows}
    for e in extra:
        assert (e["source"], e["kind"], e["level"]) not in labelled_pairs
        pristine = out.parent / "images" / f"{e['source']}__pristine.png"
        assert Image.open(out.parent / e["path"]).size == Image.open(pristine).size
    assert len({(e["source"], e["kind"], e["level"]) for e in extra}) == len(extra)
    with pytest.raises(ValueError, match="unlabelled_per_image"):
        build_proxy_set(srcs, tmp_path / "too-many", per_image=3, unlabelled_per_image=23)
    # a rebuild without extras leaves neither the last build's list nor its images behind, and one with fewer
    # versions per photo keeps exactly the files its labels name
    build_proxy_set(srcs, tmp_path / "extra", per_image=3, seed=7, size=48)
    assert not (out.parent / "unlabelled.csv").exists() and not (out.parent / "unlabelled").exists()
    fewer = build_proxy_set(srcs, tmp_path / "extra", per_image=1, seed=7, size=48)
    assert sorted(f"images/{p.name}" for p in (out.parent / "images").iterdir()) == sorted(
        r["path"] for r in _rows(fewer))


def test_content_variant_mixes_a_per_group_preference_into_every_score(built, tmp_path):
    root, srcs, labels = built
    out = build_proxy_set(srcs, tmp_path / "content", per_image=3, seed=7, size=48, content_weight=0.5,
                          content_groups=4)
    groups = {r["source"]: (int(r["group"]), float(r["preference"])) for r in _rows(out.parent / "content.csv")}
    names = sorted(groups)
    # contiguous blocks of the sorted names (5 sources each), one preference per block, the 4 values 1, 4, 7, 10
    assert [groups[n][0] for n in names] == [i // 5 for i in range(20)]
    assert sorted({p for _, p in groups.values()}) == [1.0, 4.0, 7.0, 10.0]
    assert len({groups[n] for n in names}) == 4
    plain = {r["path"]: r for r in _rows(labels)}
    for r in _rows(out):
        quality = level_score(int(r["level"]))
        assert float(r["score"]) == pytest.approx(0.5 * quality + 0.5 * groups[r["source"]][1], abs=0.006)
        assert r["split"] == plain[r["path"]]["split"] and r["kind"] == plain[r["path"]]["kind"]
        # the images themselves are those of the quality-only build: only the labels change
        assert (out.parent / r["path"]).read_bytes() == (labels.parent / r["path"]).read_bytes()
    # a source's scores still fall with level, but a pristine photo of a disliked group can rank below a
    # degraded photo of a liked one: content matters
    rows = _rows(out)
    pristine_low = min(float(r["score"]) for r in rows if r["kind"] == "pristine")
    degraded_high = max(float(r["score"]) for r in rows if r["kind"] != "pristine")
    assert pristine_low < degraded_high
    again = build_proxy_set(srcs, tmp_path / "content", per_image=3, seed=7, size=48)  # rebuilt without content
    assert again.read_bytes() == labels.read_bytes() and not (again.parent / "content.csv").exists()
    with pytest.raises(ValueError, match="content_weight must be in"):
        build_proxy_set(srcs, tmp_path / "bad", content_weight=1.5)


def test_labels_parse_through_load_labels(built):
    _, srcs, labels = built
    rows = _rows(labels)
    ls = load_labels("csv:" + str(labels))
    assert len(ls) == len(rows) and not ls.missing
    assert ls.bins == 10 and ls.scale == (1.0, 10.0)
    by_path = {str(labels.parent / r["path"]): r for r in rows}
    for lb in ls.labels:
        r = by_path[lb.path]
        assert lb.split == r["split"] and lb.score == pytest.approx(float(r["score"]))
        np.testing.assert_allclose(lb.dist, [float(v) for v in r["dist"].split(";")], atol=1e-5)
    assert ls.counts() == {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}


def test_bad_arguments_and_bad_sources(tmp_path):
    srcs = make_images(tmp_path / "src", 3, sub=False)
    with pytest.raises(ValueError, match="kinds"):
        build_proxy_set(srcs, tmp_path / "o", kinds=("blur", "sharpen"))
    with pytest.raises(ValueError, match="per_image"):
        build_proxy_set(srcs, tmp_path / "o", per_image=26)
    with pytest.raises(ValueError, match="unique"):
        build_proxy_set(srcs + [srcs[0]], tmp_path / "o")
    broken = tmp_path / "src" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    labels = build_proxy_set(srcs + [broken], tmp_path / "o", per_image=1, size=32)
    assert {r["source"] for r in _rows(labels)} == {p.stem for p in srcs}
    assert "broken.jpg" in (tmp_path / "o" / "skipped.txt").read_text()


def test_module_entry_point(tmp_path, capsys):
    make_images(tmp_path / "src", 6, seed=1)
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--n", "4", "--per-image", "2",
                 "--size", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 images from 4 source photos" in out and "train" in out and "level:" in out
    assert summarise(tmp_path / "out" / "labels.csv").splitlines()[0].endswith("12 images from 4 source photos")


def test_cli_proxy_set_and_its_errors(tmp_path):
    from cskd_cli.main import app
    from typer.testing import CliRunner

    src = tmp_path / "src"
    make_images(src, 3)
    r = CliRunner().invoke(app, ["proxy-set", "--src", str(src), "--out", str(tmp_path / "p"), "--per-image", "2"])
    assert r.exit_code == 0, r.output
    assert len(load_labels(f"csv:{tmp_path / 'p' / 'labels.csv'}")) == 9
    r = CliRunner().invoke(app, ["proxy-set", "--src", str(src), "--out", str(tmp_path / "u"), "--per-image", "2",
                                 "--unlabelled-per-image", "3"])
    assert r.exit_code == 0, r.output
    n_train = sum(row["split"] == "train" for row in _rows(tmp_path / "u" / "labels.csv")) // 3
    assert f"unlabelled: {3 * n_train} images" in r.output
    r = CliRunner().invoke(app, ["proxy-set", "--src", str(src), "--out", str(tmp_path / "v"), "--per-image", "2",
                                 "--unlabelled-per-image", "24"])
    assert r.exit_code == 1 and "unlabelled_per_image" in r.output
    r = CliRunner().invoke(app, ["proxy-set", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "q")])
    assert r.exit_code == 1 and "not a folder" in r.output and not (tmp_path / "q").exists()
