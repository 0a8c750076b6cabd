"""`cskd neighbors`: index policy (faiss Flat/IVF, torch fallback), the kNN probe, near-duplicates, sheets, HTML.

The cache comes from `block_teacher` below, a py: teacher whose embedding is the image's 8x8 colour layout with
its mean removed, over images built from coarse random colour blocks. That makes the ground truth known:
images of one "style" (a shared base layout, 60 % of the signal) have cosine about 0.7, unrelated images about
0, and a resized, re-encoded copy of an image about 1. Scores are a function of the style, so a kNN regressor in
this space must rank test images well, and only the copies can pass a 0.95 near-duplicate threshold.
"""

from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest
import torch
from cskd_cli.main import app
from PIL import Image
from typer.testing import CliRunner

from cskd_cache.evaluate.knn_index import build_index, neighbours_excluding_self
from cskd_cache.inspect.contact_sheet import PLACEHOLDER, thumbnail
from cskd_cache.inspect.neighbors import knn_probe
from cskd_cache.models.runs import save_encoder
from cskd_cache.models.scorer import build_head, save_iaa_model
from cskd_cache.models.students import build_student
from cskd_cache.stages.extract import ExtractConfig, run_extract

runner = CliRunner()
STYLES, PER_STYLE = 4, 8
STYLE_SCORE = [2.0, 4.0, 6.0, 8.0]


class BlockTeacher(torch.nn.Module):
    preprocess_cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                      "resize_mode": "squash"}

    def extract(self, x, layers=()):
        grid = torch.nn.functional.avg_pool2d(x, 4)  # (B, 3, 8, 8)
        flat = grid.flatten(1)
        return {"embed": flat - flat.mean(1, keepdim=True), "tokens": grid.permute(0, 2, 3, 1), "prefix": None}


def block_teacher():
    return BlockTeacher().eval()


def block_image(rng, base=None):
    cells = rng.uniform(0, 255, (8, 8, 3))
    if base is not None:
        cells = 0.6 * base + 0.4 * cells
    return Image.fromarray(cells.astype(np.uint8)).resize((64, 64), Image.NEAREST)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """imgs/: 4 styles x 8 images, labelled (style score + noise), style-wise split 5 train / 3 test;
    copies/: resized JPEG copies of imgs/s0_0 (train; its copy is labelled test -> cross-split) and s1_0
    (unlabelled copy -> cross-source only)."""
    d = tmp_path_factory.mktemp("nb")
    rng = np.random.default_rng(0)
    (d / "imgs").mkdir()
    (d / "copies").mkdir()
    rows = []
    for s in range(STYLES):
        base = rng.uniform(0, 255, (8, 8, 3))
        for i in range(PER_STYLE):
            name = f"s{s}_{i}.png"
            block_image(rng, base).save(d / "imgs" / name)
            rows.append((f"imgs/{name}", STYLE_SCORE[s] + rng.normal(0, 0.3), "train" if i < 5 else "test"))
    for name in ("s0_0", "s1_0"):
        Image.open(d / "imgs" / f"{name}.png").resize((60, 60), Image.BICUBIC).save(d / "copies" / f"{name}.jpg",
                                                                                      quality=95)
    rows.append(("copies/s0_0.jpg", rows[0][1], "test"))
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "split"])
        w.writerows(rows)
    run_extract(ExtractConfig(teacher="py:test_neighbors:block_teacher", out=str(d / "cache"),
                              images=[str(d / "imgs"), str(d / "copies")], tokens=False, num_workers=0,
                              device="cpu"))
    return d


def invoke(*args):
    return runner.invoke(app, ["neighbors", *map(str, args)])


# --- the index -------------------------------------------------------------------------------------------------


def random_rows(n=400, d=24, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_torch_fallback_equals_faiss_flat():
    pytest.importorskip("faiss")
    x, q = random_rows(), random_rows(50, seed=1)
    f, t = build_index(x, backend="faiss"), build_index(x, backend="torch")
    assert (f.backend, f.kind, f.exact) == ("faiss", "flat", True) and t.backend == "torch"
    fs, fi = f.search(q, 10)
    ts, ti = t.search(q, 10)
    np.testing.assert_array_equal(fi, ti)
    np.testing.assert_allclose(fs, ts, atol=1e-5)
    np.testing.assert_array_equal(neighbours_excluding_self(f, 7)[1], neighbours_excluding_self(t, 7)[1])
    for a, b in zip(f.range_pairs(0.5), t.range_pairs(0.5)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    i, j, s = t.range_pairs(0.5)
    assert len(i) > 0 and (i < j).all() and (s >= 0.5).all()
    # complete: every pair above the threshold, checked by brute force
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    assert len(i) == int((np.triu(sim, 1) >= 0.5).sum())


def test_ivf_is_forced_on_small_data_and_exhaustive_probing_is_exact():
    pytest.importorskip("faiss")
    x, q = random_rows(), random_rows(50, seed=1)
    flat = build_index(x, backend="faiss")
    ivf = build_index(x, backend="faiss", ivf_threshold=100, nprobe=4, seed=3)
    assert ivf.kind == "ivf" and ivf.nlist == 80 and ivf.nprobe == 4 and not ivf.exact  # 4 * sqrt(400) cells
    approx = ivf.search(q, 10)[1]
    assert approx.shape == (50, 10)
    np.testing.assert_array_equal(approx, build_index(x, backend="faiss", ivf_threshold=100, nprobe=4,
                                                      seed=3).search(q, 10)[1])  # seeded: reproducible
    full = build_index(x, backend="faiss", ivf_threshold=100, nlist=10, nprobe=10)
    assert full.exact
    np.testing.assert_array_equal(full.search(q, 10)[1], flat.search(q, 10)[1])


def test_without_faiss_torch_runs_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    idx = build_index(random_rows(30), backend="auto")
    assert idx.backend == "torch" and "faiss not installed" in idx.note
    assert neighbours_excluding_self(idx, 3)[1].shape == (30, 3)
    with pytest.raises(ValueError, match="faiss is not installed"):
        build_index(random_rows(30), backend="faiss")


def test_self_is_excluded_even_behind_an_exact_duplicate():
    x = random_rows(20)
    x[5] = x[4]
    for backend in ("torch", "faiss"):
        if backend == "faiss":
            pytest.importorskip("faiss")
        _, ids = neighbours_excluding_self(build_index(x, backend=backend), 3)
        assert all(i not in row for i, row in enumerate(ids))
        assert ids[4, 0] == 5 and ids[5, 0] == 4


def test_knn_probe_is_a_similarity_weighted_mean():
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [1, 0.1]], dtype=np.float32)
    train, scores = np.array([0, 1, 2, 3]), np.array([1.0, 3.0, 9.0, 100.0])
    test = np.array([4, 4])
    res = knn_probe(feats, train, scores, test, np.array([1.0, 2.0]), k=3, threshold=None, n_boot=0,
                    index_kwargs={"backend": "torch"})
    q = feats[4] / np.linalg.norm(feats[4])
    cos = (feats[:3] / np.linalg.norm(feats[:3], axis=1, keepdims=True)) @ q  # the three nearest: rows 0, 1, 2
    expected = (cos * scores[:3]).sum() / cos.sum()
    assert res["predictions"] == pytest.approx([expected, expected], rel=1e-5)
    assert (res["k"], res["train"], res["test"]) == (3, 4, 2)
    # negative similarities weigh nothing: the far row -1,0 with score 100 never pulls the mean
    res = knn_probe(feats, train, scores, np.array([4, 4]), np.array([1.0, 2.0]), k=4, threshold=None, n_boot=0,
                    index_kwargs={"backend": "torch"})
    assert res["predictions"][0] == pytest.approx(expected, rel=1e-5)


def test_missing_image_thumbnail_is_a_grey_placeholder(tmp_path):
    img, ok = thumbnail(str(tmp_path / "gone.jpg"), "gone.jpg", 64)
    assert not ok and img.size == (64, 64) and img.getpixel((63, 63)) == PLACEHOLDER
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    assert thumbnail(str(tmp_path / "bad.jpg"), "bad.jpg", 64)[1] is False


# --- the command -----------------------------------------------------------------------------------------------


def check_page(out):
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs
    for ref in refs:
        assert not ref.startswith("/") and "://" not in ref, ref
        from urllib.parse import unquote
        assert (out / unquote(ref)).resolve().is_file(), ref
    return page


def test_cli_with_labels(data, tmp_path):
    out = tmp_path / "out"
    res = invoke("--cache", data / "cache", "--labels", f"csv:{data / 'labels.csv'}", "--out", out, "--k", "4",
                 "--queries", "3", "--n-boot", "200", "--device", "cpu", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    r = json.loads((out / "neighbors.json").read_text())
    assert r["rows"] == 34 and r["index"]["kind"] == "flat" and r["index"]["backend"] == "faiss"
    assert r["features"]["source"] == "cache" and r["features"]["dim"] == 192
    assert r["labels"]["linked"] == 33 and r["labels"]["unlinked"] == 0
    probe = r["probe"]
    assert (probe["train"], probe["test"], probe["k"]) == (20, 13, 4)
    # style decides the score and the neighbourhood: the training-free probe ranks test images almost perfectly
    assert probe["srcc"] > 0.8 and probe["plcc"] > 0.8
    assert probe["srcc_ci"][0] <= probe["srcc"] <= probe["srcc_ci"][1]

    dup = r["duplicates"]
    assert dup["pairs"] == 2 and dup["cross_source"] == 2 and dup["cross_split"] == 1
    assert dup["by_split_pair"] == {"-/train": 1, "test/train": 1}
    with open(out / "duplicates.csv") as f:
        pairs = list(csv.DictReader(f))
    assert {tuple(sorted((p["key_a"], p["key_b"]))) for p in pairs} == {("s0_0.jpg", "s0_0.png"),
                                                                         ("s1_0.jpg", "s1_0.png")}
    assert all(float(p["cosine"]) >= 0.95 for p in pairs)
    assert {p["cross_split"] for p in pairs} == {"True", "False"}

    assert len(r["queries"]) == 3 and all(len(q["neighbors"]) == 4 for q in r["queries"])
    for q in r["queries"]:
        assert q["row"] not in [nb["row"] for nb in q["neighbors"]]
        sims = [nb["similarity"] for nb in q["neighbors"]]
        assert sims == sorted(sims, reverse=True)
    sheets = sorted(p.name for p in (out / "sheets").iterdir())
    assert sheets == ["duplicates.png", "query-000.png", "query-001.png", "query-002.png"]
    assert Image.open(out / "sheets" / "query-000.png").size[0] >= 5 * 128  # query + 4 neighbours
    assert r["missing_images_in_sheets"] == 0
    check_page(out)
    assert "kNN probe" in res.output and not list(out.glob(".*tmp*"))


def test_cli_without_labels_and_with_missing_images(data, tmp_path):
    # Move the images: the cache still points at data/, so every thumbnail is a placeholder, never a crash.
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(data / "cache", moved / "cache")
    out = tmp_path / "out"
    img_root = tmp_path / "nowhere"
    res = invoke("--cache", moved / "cache", "--out", out, "--queries", "2", "--k", "3", "--backend", "torch",
                 "--cache-image-root", f"{data}={img_root}", "--device", "cpu")
    assert res.exit_code == 0, res.output
    r = json.loads((out / "neighbors.json").read_text())
    assert r["probe"] is None and r["labels"] is None and r["index"]["backend"] == "torch"
    assert r["duplicates"]["pairs"] == 2 and r["duplicates"]["by_split_pair"] == {}
    assert r["missing_images_in_sheets"] == 2 * 4 + 2 * 2  # 2 query sheets of 4, 2 duplicate pairs
    check_page(out)


def test_cli_model_features_and_forced_ivf(data, tmp_path):
    run = tmp_path / "run"
    enc = build_student("timm:test_resnet", size=32)
    save_encoder(enc, run)
    out = tmp_path / "out"
    res = invoke("--cache", data / "cache", "--model", run, "--out", out, "--queries", "1", "--k", "3",
                 "--ivf-threshold", "10", "--nprobe", "2", "--labels", f"csv:{data / 'labels.csv'}", "--n-boot", "0",
                 "--device", "cpu", "--num-workers", "0", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    r = json.loads((out / "neighbors.json").read_text())
    assert r["features"]["source"] == "model" and r["features"]["dim"] == enc.pooled_dim
    assert r["features"]["input_size"] == [32, 32]
    assert r["index"]["kind"] == "ivf" and r["index"]["nlist"] == round(4 * 34 ** 0.5) and not r["index"]["exact"]
    assert r["probe"]["test"] == 13 and "srcc" in r["probe"]

    # The same encoder inside a finetune/distill run (iaa_model.*) gives the same feature space.
    iaa = tmp_path / "iaa"
    save_iaa_model(iaa, enc, build_head("scalar", enc.pooled_dim), {"kind": "scalar", "in_dim": enc.pooled_dim},
                   {"name": "labels", "scale": [1.0, 10.0], "bins": None, "threshold": 5.0})
    out2 = tmp_path / "out2"
    res = invoke("--cache", data / "cache", "--model", iaa, "--out", out2, "--queries", "1", "--k", "3",
                 "--ivf-threshold", "10", "--nprobe", "2", "--device", "cpu", "--num-workers", "0", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    r2 = json.loads((out2 / "neighbors.json").read_text())
    assert r2["features"]["run"] == "iaa" and r2["features"]["dim"] == enc.pooled_dim
    a, b = r["queries"][0]["neighbors"], r2["queries"][0]["neighbors"]
    assert [nb["row"] for nb in a] == [nb["row"] for nb in b]
    assert [nb["similarity"] for nb in a] == pytest.approx([nb["similarity"] for nb in b], abs=1e-5)


def test_cli_bad_inputs(data, tmp_path):
    out = tmp_path / "out"
    res = invoke("--cache", tmp_path / "nocache", "--out", out)
    assert res.exit_code == 1 and "nocache" in res.output
    other = tmp_path / "other.csv"
    other.write_text("path,score\nelsewhere/a.jpg,3\nelsewhere/b.jpg,4\n")
    res = invoke("--cache", data / "cache", "--out", out, "--labels", f"csv:{other}")
    assert res.exit_code == 1 and "none of its 2 labels" in res.output
    res = invoke("--cache", data / "cache", "--out", out, "--dup-threshold", "0")
    assert res.exit_code == 2
    res = invoke("--cache", data / "cache", "--out", out, "--model", tmp_path, "--device", "cpu")
    assert res.exit_code == 1 and "student.json" in res.output
    assert not out.exists()


def test_collapsed_features_keep_memory_bounded_count_every_pair_and_say_so(tmp_path):
    """Nearly identical embeddings (a collapsed encoder): nearly every pair passes the threshold. Every pair is
    counted and written to duplicates.csv; only --max-pairs of them are kept for the page; one line says why."""
    from _imgs import make_images

    from cskd_cache.inspect.neighbors import NeighborsConfig, run_neighbors

    make_images(tmp_path / "imgs", 120)
    run_extract(ExtractConfig(teacher="py:test_neighbors:collapsed_teacher", out=str(tmp_path / "cache"),
                              images=[str(tmp_path / "imgs")], num_workers=0))
    said = []
    r = run_neighbors(NeighborsConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "out"), queries=1,
                                      max_pairs=25, num_workers=0, device="cpu"), on_status=said.append)
    n = 120
    dup = r["duplicates"]
    assert dup["pairs"] == n * (n - 1) // 2 and dup["listed"] == 25 and dup["collapsed"] and dup["share"] == 1.0
    with open(tmp_path / "out" / "duplicates.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == dup["pairs"] and len({(x["row_a"], x["row_b"]) for x in rows}) == dup["pairs"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<tr>") < 25 + 40  # the page lists the 25 kept pairs (at most 50), not 7,140
    assert any("features look collapsed" in m for m in said), said
    assert not list((tmp_path / "out").glob(".*tmp*"))


def collapsed_teacher():
    """A toy teacher whose embeddings barely depend on the image: a large constant plus a tiny image term."""
    from toy_teacher import make

    t = make()
    with torch.no_grad():
        t.head.weight.mul_(1e-4)
        t.head.bias.fill_(1.0)
    return t


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_range_pair_blocks_stay_small_when_every_pair_passes(backend):
    """A collapsed encoder: every pair passes. The blocks together give every pair once, and no block hands on
    more than 8 x max_block_pairs, whatever rows x n is."""
    from cskd_cache.evaluate.knn_index import build_index

    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    n = 600
    x = 1.0 + 1e-4 * rng.standard_normal((n, 8)).astype(np.float32)
    index = build_index(x, backend=backend)
    blocks = list(index.iter_range_pairs(0.9, max_block_pairs=2000))
    got = {(int(a), int(b)) for i, j, _ in blocks for a, b in zip(i, j)}
    assert got == {(a, b) for a in range(n) for b in range(a + 1, n)}
    assert sum(len(i) for i, _, _ in blocks) == len(got)
    # each block of b rows found b x n pairs (self included), half of them handed on
    assert max(len(i) for i, _, _ in blocks) <= 8 * 2000 and len(blocks) > 100
