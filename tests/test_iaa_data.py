"""Dataset readers on small synthetic files that copy the real on-disk formats (see docs/datasets.md).

The last tests parse the real label files in ../shared/data/labels when that folder exists; they are
skipped elsewhere, and the rest never need it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cskd_cache.labels import LabelSet, load_labels
from cskd_cache.labels.labelset import hash_unit, seeded_split, val_or_train

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "labels"


def touch(folder: Path, names) -> None:
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def votes(i: int) -> list[int]:
    rng = np.random.default_rng(i)
    return [int(v) for v in rng.integers(0, 40, 10)]


def write_ava_txt(root: Path, ids: list[str], nested: bool = True) -> Path:
    base = root / "AVA_dataset" if nested else root
    base.mkdir(parents=True, exist_ok=True)
    lines = [" ".join([str(n + 1), i, *map(str, votes(n)), "1", "15", "957"]) for n, i in enumerate(ids)]
    (base / "AVA.txt").write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture
def ava_root(tmp_path):
    ids = [str(100000 + 7 * n) for n in range(60)]
    base = write_ava_txt(tmp_path, ids)
    (base / "aesthetics_image_lists").mkdir()
    (base / "aesthetics_image_lists" / "generic_test.jpgl").write_text("\n".join(ids[:15]) + "\n")
    touch(tmp_path / "images", [f"{i}.jpg" for i in ids[2:]])  # the first two (test) images are missing
    return tmp_path, ids


# ---- AVA -------------------------------------------------------------------------------------------------

def test_ava_official_layout_parses_votes_and_official_test_split(ava_root, caplog):
    root, ids = ava_root
    with caplog.at_level(logging.WARNING):
        ls = load_labels(f"ava:{root}", val_fraction=0.2, seed=1)
    assert (ls.name, ls.scale, ls.bins, ls.threshold) == ("ava", (1.0, 10.0), 10, 5.0)
    assert len(ls) == 58 and sorted(ls.missing) == sorted(str(root / "images" / f"{i}.jpg") for i in ids[:2])
    by_key = {lb.key: lb for lb in ls.labels}
    v = np.array(votes(5), dtype=float)
    assert np.allclose(by_key[ids[5]].dist, v / v.sum())
    assert by_key[ids[5]].score == pytest.approx((v / v.sum()) @ np.arange(1, 11))
    assert by_key[ids[5]].path == str(root / "images" / f"{ids[5]}.jpg")
    assert {lb.key for lb in ls.split("test").labels} == set(ids[2:15])
    assert ls.split("test").missing == ls.missing and ls.split("train").missing == []
    train_val = ls.split("train").keys() + ls.split("val").keys()
    assert sorted(train_val) == sorted(ids[15:]) and len(ls.split("val")) > 0
    assert ls.dists().shape == (58, 10) and np.allclose(ls.dists().sum(1), 1)
    # missing images are reported once, as one summary line
    warnings = [r for r in caplog.records if "no image on disk" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 60" in warnings[0].getMessage()
    assert "2 of 60" in ls.missing_summary()


def test_ava_root_level_layout_and_unrated_images(tmp_path):
    ids = ["11", "12", "13"]
    write_ava_txt(tmp_path, ids, nested=False)
    txt = tmp_path / "AVA.txt"
    txt.write_text(txt.read_text() + "4 14 0 0 0 0 0 0 0 0 0 0 0 0 0\n")  # nobody voted: no label
    (tmp_path / "aesthetics_image_lists").mkdir()
    (tmp_path / "aesthetics_image_lists" / "generic_test.jpgl").write_text("12\n")
    ls = load_labels(f"ava:{tmp_path}", check_images=False)
    assert ls.keys() == ids and ls.missing == [] and ls.split("test").keys() == ["12"]


def test_ava_tanet_csv_layout(tmp_path):
    header = "image_id,score2,score3,score4,score5,score6,score7,score8,score9,score10,score11,tag1,tag2,tag3\n"
    (tmp_path / "tanet_ava_test.csv").write_text(header + "687050,1,5,6,51,117,78,29,10,6,1,12,30,873\n")
    (tmp_path / "tanet_ava_val.csv").write_text(header + "591979,0,1,2,13,45,44,16,0,1,1,15,28,738\n"
                                                         "1,10,0,0,0,0,0,0,0,0,0,0,0,1\n")
    ls = load_labels(f"ava:{tmp_path}", image_root=str(tmp_path / "imgs"), check_images=False)
    assert ls.counts() == {"train": 0, "val": 2, "test": 1}
    lb = {x.key: x for x in ls.labels}
    assert lb["1"].score == 1.0 and lb["1"].dist[0] == 1.0  # score2 is the count of rating 1
    assert lb["687050"].score == pytest.approx(np.dot([1, 5, 6, 51, 117, 78, 29, 10, 6, 1], range(1, 11)) / 304)
    assert lb["1"].path == str(tmp_path / "imgs" / "1.jpg")


def test_ava_without_labels_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="AVA.txt.*tanet_ava"):
        load_labels(f"ava:{tmp_path}")


# ---- seeded splits ---------------------------------------------------------------------------------------

def test_val_split_is_stable_under_row_order_and_added_rows(tmp_path):
    ids = [str(n) for n in range(200)]
    a = tmp_path / "a"
    write_ava_txt(a, ids, nested=False)
    (a / "aesthetics_image_lists").mkdir()
    (a / "aesthetics_image_lists" / "generic_test.jpgl").write_text("0\n")
    b = tmp_path / "b"
    b.mkdir()
    (b / "aesthetics_image_lists").mkdir()
    (b / "aesthetics_image_lists" / "generic_test.jpgl").write_text("0\n")
    lines = (a / "AVA.txt").read_text().splitlines()
    extra = "999 extra " + " ".join(["3"] * 10) + " 0 0 1"
    (b / "AVA.txt").write_text("\n".join([extra] + lines[::-1]) + "\n")
    la = load_labels(f"ava:{a}", val_fraction=0.1, seed=3, check_images=False)
    lb = load_labels(f"ava:{b}", val_fraction=0.1, seed=3, check_images=False)
    split_a = {x.key: x.split for x in la.labels}
    split_b = {x.key: x.split for x in lb.labels}
    assert all(split_b[k] == s for k, s in split_a.items())
    assert 5 <= sum(s == "val" for s in split_a.values()) <= 40
    other = load_labels(f"ava:{a}", val_fraction=0.1, seed=4, check_images=False)
    assert {x.key: x.split for x in other.labels} != split_a


def test_hash_split_fractions():
    keys = [f"img_{n}.jpg" for n in range(4000)]
    assert 0 <= hash_unit("x", 0) < 1 and hash_unit("x", 0) == hash_unit("x", 0) != hash_unit("x", 1)
    val = np.mean([val_or_train(k, 0.05, 0) == "val" for k in keys])
    assert 0.035 < val < 0.065
    three = [seeded_split(k, 0.05, 0) for k in keys]
    assert 0.13 < three.count("test") / 4000 < 0.17 and 0.035 < three.count("val") / 4000 < 0.065
    # a larger val share takes images from train only: the test set never moves
    wider = [seeded_split(k, 0.2, 0) for k in keys]
    assert [k for k, s in zip(keys, three) if s == "test"] == [k for k, s in zip(keys, wider) if s == "test"]


# ---- TAD66K, KonIQ, SPAQ ---------------------------------------------------------------------------------

def test_tad66k_merge_csvs(tmp_path):
    merge = tmp_path / "dataset" / "merge"
    merge.mkdir(parents=True)
    train = [f"user{n}_{1000 + n}.jpg" for n in range(40)]
    (merge / "train.csv").write_text("image,score\n" + "".join(f"{k},{2 + n / 10:.2f}\n" for n, k in enumerate(train)))
    (merge / "test.csv").write_text("image,score\nhs_yin152947873.jpg,1.9\n43751877@N085618633908.jpg,9.46\n")
    touch(tmp_path / "images", train + ["hs_yin152947873.jpg"])
    ls = load_labels(f"tad66k:{tmp_path}", val_fraction=0.25)
    assert (ls.scale, ls.bins, ls.threshold) == ((1.0, 10.0), None, 5.0)
    assert ls.split("test").keys() == ["hs_yin152947873.jpg"] and len(ls.missing) == 1
    assert len(ls.split("train")) + len(ls.split("val")) == 40 and len(ls.split("val")) > 0
    assert ls.split("test").scores().tolist() == [1.9]
    with pytest.raises(ValueError, match="no score distributions"):
        ls.dists()


KONIQ_ROWS = [("10004473376.jpg", "0.0,0.0,0.238095238095,0.695238095238,0.0666666666667", 77.38, "training", 0),
              ("10007357496.jpg", "0.0,0.03125,0.46875,0.489583333333,0.0104166666667", 68.73, "test", 2),
              ("10007903636.jpg", "0.0104166666667,0.0,0.208333333333,0.760416666667,0.0208333333333", 78.63,
               "validation", 1)]


def test_koniq_distributions_sets_csv(tmp_path):
    body = "".join(f"{k},{d},105,{m},0.52,{s}\n" for k, d, m, s, _ in KONIQ_ROWS)
    (tmp_path / "koniq10k_distributions_sets.csv").write_text("image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set\n" + body)
    touch(tmp_path / "1024x768", [r[0] for r in KONIQ_ROWS])
    ls = load_labels(f"koniq:{tmp_path}")
    assert (ls.scale, ls.bins, ls.threshold) == ((1.0, 100.0), 5, 50.0)
    assert [lb.split for lb in ls.labels] == ["train", "test", "val"]
    assert ls.scores().tolist() == [77.38, 68.73, 78.63] and np.allclose(ls.dists().sum(1), 1)
    assert np.all((ls.normalised_score() >= 0) & (ls.normalised_score() <= 1))


def test_koniq_pyiqa_meta_info_csv(tmp_path):
    body = "".join(f"{k},{m},0.52,{sp},{d},105\n" for k, d, m, _, sp in KONIQ_ROWS)
    (tmp_path / "meta_info_KonIQ10kDataset.csv").write_text("img_name,mos,std,split,c1,c2,c3,c4,c5,c_total\n" + body)
    ls = load_labels(f"koniq:{tmp_path}", check_images=False)
    assert [lb.split for lb in ls.labels] == ["train", "test", "val"] and ls.dists().shape == (3, 5)


def test_spaq_meta_info_with_repeated_header(tmp_path):
    header = ("Image name,MOS,Brightness,Colorfulness,Contrast,Noisiness,Sharpness,Animal,Cityscape,Human,"
              "Indoor scene,Landscape,Night scene,Plant,Still-life,Others,Focal length,F-number,Exposure time,ISO,"
              "Brightness,Flash,Time0,Time1\n")
    rows = "".join(f"{n:05d}.jpg,{n % 97}.5,47.43,55.57,55.71,37.86,42.57,0.0,0.33,0.0,0.0,0.0,0.33,0.0,0.33,0.0,"
                   f"4.2,1.7,0.1,200,-1.21,0,-0.96,-0.25\n" for n in range(1, 301))
    (tmp_path / "meta_info_SPAQDataset.csv").write_text(header + rows)
    touch(tmp_path / "TestImage", [f"{n:05d}.jpg" for n in range(1, 301)])
    ls = load_labels(f"spaq:{tmp_path}", seed=0)
    assert (ls.scale, ls.bins, ls.threshold) == ((0.0, 100.0), None, 50.0)
    assert ls.labels[0].key == "00001.jpg" and ls.labels[0].score == 1.5 and not ls.missing
    c = ls.counts()
    assert c["test"] > 20 and c["val"] > 3 and c["train"] > 200


# ---- AADB, PARA (formats from their public documentation) ------------------------------------------------

def test_aadb_lists_prefer_test_new(tmp_path):
    lab = tmp_path / "imgListFiles_label"
    lab.mkdir()
    (lab / "imgListTrainRegression_score.txt").write_text("farm1_255_19452343093_8ee7e5e375_b.jpg 0.6\na.jpg 0.2\n")
    (lab / "imgListValidationRegression_score.txt").write_text("b.jpg 0.4\n")
    (lab / "imgListTestRegression_score.txt").write_text("old.jpg 0.5\n")
    (lab / "imgListTestNewRegression_score.txt").write_text("c.jpg 0.8\n\n")
    ls = load_labels(f"aadb:{tmp_path}", check_images=False)
    assert (ls.scale, ls.threshold) == ((0.0, 1.0), 0.5)
    assert ls.counts() == {"train": 2, "val": 1, "test": 1} and ls.split("test").keys() == ["c.jpg"]
    assert ls.labels[0].path == str(tmp_path / "datasetImages_originalSize" / "farm1_255_19452343093_8ee7e5e375_b.jpg")


def para_csv(path: Path, rows: list[tuple[str, str, float]], with_votes: bool) -> None:
    levels = [f"{v:.1f}" for v in np.arange(1, 5.01, 0.5)]
    head = ["sessionId", "imageName", "aestheticScore_mean", "aestheticScore_std", "qualityScore_mean"]
    head += [f"aestheticScore_{v}" for v in levels] if with_votes else []
    lines = [",".join(head)]
    for n, (s, i, m) in enumerate(rows):
        vals = [s, i, str(m), "0.5", "3.1"] + ([str((n + k) % 4) for k in range(9)] if with_votes else [])
        lines.append(",".join(vals))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_para_giaa_csvs_with_votes(tmp_path):
    train = [(f"session{n % 3}", f"iaa_pub{n}_.jpg", 3.0 + n / 100) for n in range(30)]
    para_csv(tmp_path / "annotation" / "PARA-GiaaTrain.csv", train, True)
    para_csv(tmp_path / "annotation" / "PARA-GiaaTest.csv", [("session9", "iaa_pub99_.jpg", 2.5)], True)
    touch(tmp_path / "imgs", [f"{s}/{i}" for s, i, _ in train])
    ls = load_labels(f"para:{tmp_path}", val_fraction=0.3)
    assert (ls.scale, ls.bins, ls.threshold) == ((1.0, 5.0), 9, 3.0)
    assert ls.missing == [str(tmp_path / "imgs" / "session9" / "iaa_pub99_.jpg")]
    assert ls.labels[0].key == "session0/iaa_pub0_.jpg" and ls.dists().shape == (30, 9)
    assert len(ls.split("val")) > 0 and len(ls.split("test")) == 0 and len(ls.split("test").missing) == 1


def test_para_without_vote_columns(tmp_path):
    para_csv(tmp_path / "PARA-GiaaTrain.csv", [("s", "a.jpg", 3.5)], False)
    para_csv(tmp_path / "PARA-GiaaTest.csv", [("s", "b.jpg", 2.5)], False)
    ls = load_labels(f"para:{tmp_path}", check_images=False)
    assert ls.bins is None and ls.scores().tolist() == [3.5, 2.5]


# ---- generic csv / jsonl ---------------------------------------------------------------------------------

def test_csv_scores_with_split_column(tmp_path):
    (tmp_path / "labels.csv").write_text("path,score,split\nimgs/a.jpg,2.0,train\nimgs/b.jpg,6.0,Validation\n"
                                         "imgs/c.jpg,4.0,test\n")
    touch(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    ls = load_labels(f"csv:{tmp_path / 'labels.csv'}")
    assert ls.name == "labels" and [lb.split for lb in ls.labels] == ["train", "val", "test"]
    assert (ls.scale, ls.threshold, ls.bins) == ((2.0, 6.0), 4.0, None)
    assert ls.labels[0].path == str(tmp_path / "imgs" / "a.jpg") and ls.labels[0].key == "imgs/a.jpg"
    assert ls.normalised_score().tolist() == [0.0, 1.0, 0.5]


@pytest.mark.parametrize("cols,row", [
    ("path,dist", 'x.jpg,"[1, 0, 3]"'),
    ("path,dist", "x.jpg,1;0;3"),
    ("path,d1,d2,d3", "x.jpg,1,0,3"),
])
def test_csv_dist_forms(tmp_path, cols, row):
    (tmp_path / "l.csv").write_text(f"{cols}\n{row}\n")
    ls = load_labels(f"csv:{tmp_path / 'l.csv'}", image_root=str(tmp_path / "elsewhere"), check_images=False)
    lb = ls.labels[0]
    assert np.allclose(lb.dist, [0.25, 0, 0.75]) and lb.score == pytest.approx(2.5)
    assert (ls.bins, ls.scale) == (3, (1.0, 3.0)) and lb.path == str(tmp_path / "elsewhere" / "x.jpg")
    assert lb.split in ("train", "val", "test")


def test_jsonl_with_absolute_paths_and_seeded_split(tmp_path):
    recs = [{"path": str(tmp_path / f"{n}.png"), "dist": [n % 3 + 1, 1, 2, 0, 1], "key": f"k{n}"} for n in range(100)]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    touch(tmp_path, [f"{n}.png" for n in range(99)])
    ls = load_labels(f"jsonl:{tmp_path / 'l.jsonl'}", seed=2)
    assert ls.bins == 5 and len(ls) == 99 and ls.missing == [str(tmp_path / "99.png")]
    assert {lb.split for lb in ls.labels} == {"train", "val", "test"}
    again = load_labels(f"jsonl:{tmp_path / 'l.jsonl'}", seed=2)
    assert [lb.split for lb in again.labels] == [lb.split for lb in ls.labels]


@pytest.mark.parametrize("text,match", [
    ("path,score,split\na.jpg,1,holdout\n", "unknown split 'holdout'"),
    ("path,split\na.jpg,train\n", "needs a 'score' or a 'dist'"),
    ("score\n3\n", "no 'path'"),
    ("path,dist\na.jpg,1;x\n", "neither a JSON list"),
    ("path,dist\na.jpg,0;0\n", "not a distribution"),
])
def test_csv_errors_name_the_row(tmp_path, text, match):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_labels(f"csv:{tmp_path / 'l.csv'}", check_images=False)


# ---- spec and LabelSet -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("/data/AVA", "write NAME:PATH"),
    ("ava:", "write NAME:PATH"),
    ("imagenet:/data", "unknown dataset 'imagenet'.*ava:ROOT.*csv:FILE"),
])
def test_bad_spec_raises_value_error_naming_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        load_labels(spec)


def test_missing_path_and_bad_val_fraction(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labels(f"koniq:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="val_fraction"):
        load_labels(f"koniq:{tmp_path}", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="koniq10k_distributions_sets.csv"):
        load_labels(f"koniq:{tmp_path}")


def test_labelset_rejects_unknown_split_and_duplicate_keys(tmp_path):
    (tmp_path / "l.csv").write_text("path,score\na.jpg,1\na.jpg,2\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_labels(f"csv:{tmp_path / 'l.csv'}", check_images=False)
    with pytest.raises(ValueError, match="unknown split"):
        LabelSet("x", [], (0.0, 1.0), None, 0.5).split("holdout")


# ---- the real label files, when the shared data folder is present ---------------------------------------

def real(path: str) -> Path:
    p = REAL / path
    if not p.exists():
        pytest.skip(f"real label file {p} not present")
    return p


def test_real_ava_tanet_csvs():
    root = real("ava/tanet_ava_test.csv").parent
    ls = load_labels(f"ava:{root}", check_images=False)
    assert ls.counts() == {"train": 0, "val": 12775, "test": 12776}
    s = ls.scores()
    assert 1 < s.min() and s.max() < 10 and 5.2 < s.mean() < 5.6 and np.allclose(ls.dists().sum(1), 1)
    # no images there: every row is reported missing, nothing raises
    assert len(load_labels(f"ava:{root}").missing) == 25551


def test_real_tad66k_merge():
    root = real("tad66k/dataset/merge/train.csv").parents[2]
    ls = load_labels(f"tad66k:{root}", check_images=False)
    assert len(ls.split("test")) == 14079 and len(ls.split("train")) + len(ls.split("val")) == 52248
    s = ls.scores()
    assert 1 <= s.min() and s.max() <= 10


def test_real_koniq_distributions_sets():
    root = real("koniq/koniq10k_distributions_sets.csv").parent
    ls = load_labels(f"koniq:{root}", check_images=False)
    assert ls.counts() == {"train": 7058, "val": 1000, "test": 2015}
    assert 1 <= ls.scores().min() and ls.scores().max() <= 100 and ls.dists().shape == (10073, 5)


def test_real_pyiqa_koniq_and_spaq_meta_info():
    root = real("pyiqa_meta_info/meta_info_SPAQDataset.csv").parent
    spaq = load_labels(f"spaq:{root}", check_images=False)
    assert len(spaq) == 11125 and 0 <= spaq.scores().min() and spaq.scores().max() <= 100
    koniq = load_labels(f"koniq:{real('pyiqa_meta_info/meta_info_KonIQ10kDataset.csv').parent}", check_images=False)
    assert koniq.counts() == {"train": 7058, "val": 1000, "test": 2015}
