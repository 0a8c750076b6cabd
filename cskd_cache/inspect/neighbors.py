"""`cskd neighbors`: nearest neighbours in a feature space, a training-free kNN probe for IAA, near-duplicates.

Features: the cache's L2-normalised embeddings of view 0 (the teacher's eval view), or, with ``model``, the pooled
features of a trained encoder (an aligned run's student, or the encoder of a finetune/distill run) computed on
the fly on each row's view 0 rebuilt at the model's input size (`align_data.AlignDataset`), so feature spaces
can be compared on the same rows. The index is `knn_index.build_index` (FAISS Flat / IVF / GPU, torch fallback).

kNN-regression probe (needs labels, linked to cache rows by `label_link.link_labels`): each linked test label's
score is predicted from its k nearest linked *train* labels as the similarity-weighted mean of their scores,
weights ``max(cos, 0)`` (the plain mean if all k weights are 0); SRCC/PLCC/MAE/accuracy with seeded percentile
bootstrap intervals (`metrics.evaluate_predictions`). A labelled image whose copy sits in both splits inflates it:
read it together with the duplicate report.

Near-duplicates: every pair of rows with cosine >= ``dup_threshold``, flagged ``cross_split`` (both rows linked to
labels of different splits) and ``cross_source`` (different cache sources). Byte-identical files never reach
here: `cskd extract` stores them once (duplicates.jsonl of the cache).

Outputs (OUT/):
- ``neighbors.json``: ``{"format": "cskd-neighbors", "version": 1, "cache", "rows", "features": {"source":
  "cache"|"model", "model", "dim", "view": 0}, "index": {kind, backend, device, exact, nlist, nprobe, ...}, "k",
  "labels": {spec, name, linked, by_path, by_content, unlinked, splits} | null, "probe": {k, train, test, n,
  srcc, plcc, mae, acc, srcc_ci, plcc_ci, ...} | {"skipped": reason} | null, "duplicates": {threshold, pairs,
  cross_split, cross_source, rows, by_split_pair, by_source_pair, listed, max_pairs, share, collapsed}, "queries":
  [{row, source, key, score, split,
  sheet, neighbors: [{row, source, key, similarity, score, split}]}], "seed"}``.
- ``duplicates.csv``: one line per pair, every pair, in row order (written as found, so memory stays bounded):
  ``row_a, row_b, cosine, source_a, key_a, source_b, key_b, split_a, split_b, cross_split, cross_source``. The
  counts are exact; the page, the sheet and memory hold only the ``max_pairs`` most similar pairs. When most of
  all pairs pass the threshold (``share`` > 0.5) the features look collapsed (every image alike to the encoder),
  which the summary flags and the command says in one line.
- ``sheets/query-NNN.png``: one contact sheet per query (the query, outlined, then its k neighbours with
  similarity, score and split under each thumbnail; missing images as grey placeholders), and
  ``sheets/duplicates.png`` with the most similar pairs.
- ``index.html``: static page (relative links, no scripts or external resources) with the summary, the probe,
  the duplicate counts and every sheet.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..data.images import DEFAULT_MAX_PIXELS
from ..errors import EvaluateError
from ..evaluate.knn_index import DEFAULT_IVF_THRESHOLD
from ..files import atomic_write_text, default_file_mode, write_json
from ..train.config import CommandConfig

__all__ = ["NeighborsConfig", "NeighborsError", "embed_rows", "knn_probe", "run_neighbors",
           "FORMAT", "VERSION"]

FORMAT = "cskd-neighbors"
VERSION = 1


class NeighborsError(EvaluateError):
    """Bad input to `cskd neighbors`; the message names the file or option and the fix."""


@dataclass
class NeighborsConfig(CommandConfig):
    cache: str
    out: str
    labels: str | None = None
    cache_image_root: list[str] = field(default_factory=list)
    model: str | None = None
    k: int = 10
    queries: int = 12
    dup_threshold: float = 0.95
    max_pairs: int = 10_000
    backend: str = "auto"
    ivf_threshold: int = DEFAULT_IVF_THRESHOLD
    nlist: int | None = None
    nprobe: int = 32
    gpu: bool = True
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 2
    trust_code: bool = False
    no_verify: bool = False
    device: str = "auto"
    thumb: int = 128
    max_pixels: int = DEFAULT_MAX_PIXELS

    command: ClassVar[str] = "neighbors"
    error: ClassVar[type] = NeighborsError
    renamed: ClassVar[dict] = {"image_root": ("cache_image_root", 1)}

    def validate(self) -> None:
        if self.k < 1:
            raise NeighborsError(f"k must be >= 1, got {self.k}")
        if not 0.0 < self.dup_threshold <= 1.0:
            raise NeighborsError(f"dup_threshold must be in (0, 1], got {self.dup_threshold}")
        if self.max_pairs < 1:
            raise NeighborsError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.queries < 0:
            raise NeighborsError(f"queries must be >= 0, got {self.queries}")
        if self.backend not in ("auto", "faiss", "torch"):
            raise NeighborsError(f"backend must be auto, faiss or torch, got {self.backend!r}")
        if self.nprobe < 1 or self.ivf_threshold < 1:
            raise NeighborsError("nprobe and ivf_threshold must be >= 1")


# --- features -----------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_rows(cache, encoder, paths: list[str], batch_size: int = 64, num_workers: int = 2,
               device: str | torch.device = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
               on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(N, C) float32 L2-normalised pooled features of every cache row's view 0 rebuilt at the encoder's size."""
    from torch.utils.data import DataLoader

    from ..cache.paths import check_images
    from ..data.datasets import CachedViews, collate

    n = len(cache)
    check_images(cache, paths, range(n))
    ds = CachedViews(paths, encoder.input_cfg, rows=np.arange(n), boxes=cache.boxes, view=0, max_pixels=max_pixels,
                     digests=cache.digests)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    device = torch.device(device)
    out, done = [], 0
    for batch in loader:
        pooled, _ = encoder(batch["image"].to(device))
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        done += len(batch["row"])
        if on_progress:
            on_progress(done, n)
    return torch.cat(out).numpy()


# --- probe --------------------------------------------------------------------------------------------------


def knn_probe(feats: np.ndarray, train_rows: np.ndarray, train_scores: np.ndarray, test_rows: np.ndarray,
              test_scores: np.ndarray, k: int, threshold: float | None, n_boot: int = 1000, seed: int = 0,
              index_kwargs: dict | None = None) -> dict:
    """Similarity-weighted kNN regression from train rows to test rows (see the module docstring)."""
    from ..evaluate.knn_index import build_index
    from ..evaluate.metrics import evaluate_predictions

    index = build_index(feats[train_rows], **(index_kwargs or {}))
    k = min(int(k), len(train_rows))
    sims, ids = index.search(feats[test_rows], k)
    found = ids >= 0
    w = np.where(found, np.clip(sims, 0.0, None), 0.0).astype(np.float64)
    y = np.where(found, train_scores[np.clip(ids, 0, None)], 0.0)
    wsum = w.sum(1)
    plain = found.sum(1)
    pred = np.where(wsum > 0, (w * y).sum(1) / np.where(wsum > 0, wsum, 1.0),
                    y.sum(1) / np.maximum(plain, 1))
    metrics = evaluate_predictions(test_scores, pred, threshold=threshold, n_boot=n_boot, seed=seed)
    return {"k": k, "train": int(len(train_rows)), "test": int(len(test_rows)),
            "weighting": "max(cos, 0)-weighted mean of the k train scores", "index": index.kind, **metrics,
            "predictions": pred}


# --- the command --------------------------------------------------------------------------------------------


@dataclass
class _Labels:
    spec: str
    labelset: object
    link: object
    row_split: list[str | None]
    row_score: list[float | None]


def _link(cfg: NeighborsConfig, cache, image_root: dict) -> _Labels:
    from ..labels import load_labels
    from ..labels.link import link_labels

    # Images are checked through the cache rows, not at the label paths: a moved dataset still links by path
    # (after --cache-image-root) or by content.
    labelset = load_labels(cfg.labels, check_images=False)
    link = link_labels(labelset, cache, image_root)
    if link.linked == 0:
        raise NeighborsError(f"--labels {cfg.labels}: none of its {len(labelset.labels)} labels matches a row of "
                             f"cache {cache.path} by path or content; check --cache-image-root or the label spec")
    row_split: list[str | None] = [None] * len(cache)
    row_score: list[float | None] = [None] * len(cache)
    for lb, r in zip(labelset.labels, link.rows):
        if r >= 0 and row_split[r] is None:
            row_split[r], row_score[r] = lb.split, float(lb.score)
    return _Labels(cfg.labels, labelset, link, row_split, row_score)


def _probe(cfg: NeighborsConfig, labels: _Labels, feats: np.ndarray, index_kwargs: dict) -> dict:
    ls, rows = labels.labelset, labels.link.rows
    split = np.array([lb.split for lb in ls.labels])
    score = np.array([lb.score for lb in ls.labels], dtype=np.float64)
    train, test = (split == "train") & (rows >= 0), (split == "test") & (rows >= 0)
    if train.sum() < 1 or test.sum() < 2:
        return {"skipped": f"needs linked train and test labels (have {int(train.sum())} train, "
                           f"{int(test.sum())} test)"}
    res = knn_probe(feats, rows[train], score[train], rows[test], score[test], cfg.k, ls.threshold,
                    cfg.n_boot, cfg.seed, index_kwargs)
    res.pop("predictions")
    # A constant prediction has no correlation (NaN); JSON has no NaN, so it becomes null.
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in res.items()}


def _pair_name(a: str | None, b: str | None) -> str:
    a, b = a or "-", b or "-"
    return "/".join(sorted((a, b)))


COLLAPSED_SHARE = 0.5  # more than half of all pairs alike: the encoder no longer tells images apart
_CSV_FIELDS = ["row_a", "row_b", "cosine", "source_a", "key_a", "source_b", "key_b", "split_a", "split_b",
               "cross_split", "cross_source"]


def _codes(values: list) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique names, code per row): pair counts by code, names only for the (few) distinct pairs."""
    names, codes = np.unique(np.asarray([v or "" for v in values], dtype=str), return_inverse=True)
    return names, codes.astype(np.int64)


def _pair_counts(counter: Counter, names: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    lo, hi = np.minimum(a, b), np.maximum(a, b)  # codes follow name order, so (lo, hi) is the sorted pair
    keys, counts = np.unique(lo * len(names) + hi, return_counts=True)
    for key, c in zip(keys.tolist(), counts.tolist()):
        counter[_pair_name(str(names[key // len(names)]), str(names[key % len(names)]))] += c


class _PairStream:
    """Counts every pair, writes it to the CSV, keeps the ``keep`` most similar: memory bounded by one block."""

    def __init__(self, cache, split: list, keep: int, f):
        self.cache, self.keep, self.split = cache, keep, split
        self.split_names, self.split_codes = _codes(split)
        self.source_names, self.source_codes = _codes(cache.sources)
        self.count = self.cross_split = self.cross_source = 0
        self.involved = np.zeros(len(cache), bool)
        self.by_split, self.by_source = Counter(), Counter()
        self.top = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        self.writer = csv.writer(f, lineterminator="\n")
        self.writer.writerow(_CSV_FIELDS)

    def add(self, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> None:
        if not len(i):
            return
        sa, sb = self.split_codes[i], self.split_codes[j]
        has = self.split_names[sa] != ""
        cross = has & (self.split_names[sb] != "") & (sa != sb)
        other = self.source_codes[i] != self.source_codes[j]
        self.count += len(i)
        self.cross_split += int(cross.sum())
        self.cross_source += int(other.sum())
        self.involved[i] = self.involved[j] = True
        _pair_counts(self.by_split, self.split_names, sa, sb)
        _pair_counts(self.by_source, self.source_names, self.source_codes[i], self.source_codes[j])
        c = self.cache
        for n in range(len(i)):
            a, b = int(i[n]), int(j[n])
            self.writer.writerow([a, b, round(float(s[n]), 6), c.sources[a], c.keys[a], c.sources[b], c.keys[b],
                                  self.split[a] or "", self.split[b] or "", bool(cross[n]), bool(other[n])])
        ti, tj, ts = (np.concatenate([x, y]) for x, y in zip(self.top, (i, j, s)))
        if len(ts) > self.keep:
            best = np.argpartition(-ts, self.keep - 1)[:self.keep]
            ti, tj, ts = ti[best], tj[best], ts[best]
        self.top = (ti, tj, ts)

    def pairs(self) -> list[dict]:
        ti, tj, ts = self.top
        c = self.cache
        out = []
        for t in np.lexsort((tj, ti, -ts)):  # most similar first, ties by row
            a, b = int(ti[t]), int(tj[t])
            sa, sb = self.split[a], self.split[b]
            out.append({"row_a": a, "row_b": b, "cosine": round(float(ts[t]), 6), "source_a": c.sources[a],
                        "key_a": c.keys[a], "source_b": c.sources[b], "key_b": c.keys[b], "split_a": sa or "",
                        "split_b": sb or "", "cross_split": bool(sa and sb and sa != sb),
                        "cross_source": c.sources[a] != c.sources[b]})
        return out


def _duplicates(index, cache, labels: _Labels | None, threshold: float, csv_path: Path,
                max_pairs: int = 10_000) -> tuple[list[dict], dict]:
    """(the ``max_pairs`` most similar pairs, exact counts over every pair); every pair goes to ``csv_path``."""
    split = labels.row_split if labels else [None] * len(cache)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        stream = _PairStream(cache, split, max_pairs, f)
        for block in index.iter_range_pairs(threshold):
            stream.add(*block)
    n = len(cache)
    share = stream.count / max(1, n * (n - 1) // 2)
    summary = {"threshold": threshold, "pairs": stream.count, "cross_split": stream.cross_split,
               "cross_source": stream.cross_source, "rows": int(stream.involved.sum()),
               "by_split_pair": dict(sorted(stream.by_split.items())) if labels else {},
               "by_source_pair": dict(sorted(stream.by_source.items())), "exact": index.exact,
               "listed": min(stream.count, max_pairs), "max_pairs": max_pairs, "share": share,
               "collapsed": share > COLLAPSED_SHARE}
    return stream.pairs(), summary


def _row_info(cache, r: int, labels: _Labels | None) -> dict:
    score = labels.row_score[r] if labels else None
    return {"row": int(r), "source": cache.sources[r], "key": cache.keys[r],
            "score": score, "split": labels.row_split[r] if labels else None}


def _caption(info: dict) -> list[str]:
    if info.get("score") is None:
        return [f"split {info['split']}"] if info.get("split") else []
    return [f"score {info['score']:.3g}" + (f" ({info['split']})" if info.get("split") else "")]


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _html(cfg: NeighborsConfig, result: dict, out: Path, paths: list[str], dup_pairs: list[dict],
          dup_sheet: str | None) -> str:
    from .contact_sheet import html_page, image_tag, link, rel_link, table

    idx = result["index"]
    feats = result["features"]
    index = f"{idx['backend']} {idx['kind']} on {idx['device']}"
    if idx["kind"] == "ivf":
        index += f", nlist {idx['nlist']}, nprobe {idx['nprobe']}"
    if idx.get("note"):
        index += f" - {idx['note']}"
    summary = table(["", ""], [
        ["cache", cfg.cache], ["rows", result["rows"]],
        ["features", feats["source"] + (f" ({feats['model']})" if feats.get("model") else " (teacher, view 0)")
         + f", dim {feats['dim']}"],
        ["index", index],
        ["k", result["k"]],
        ["labels", "-" if not result["labels"] else
         f"{result['labels']['spec']}: {result['labels']['linked']} of {result['labels']['total']} linked"],
    ])
    sections = [("Summary", summary)]
    probe = result.get("probe")
    if probe and "skipped" not in probe:
        ci = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]" if v else "-"  # noqa: E731
        sections.append(("kNN-regression probe", table(
            ["k", "train", "test", "SRCC", "95% CI", "PLCC", "95% CI", "MAE", "acc"],
            [[probe["k"], probe["train"], probe["test"], _fmt(probe["srcc"]), ci(probe.get("srcc_ci")),
              _fmt(probe["plcc"]), ci(probe.get("plcc_ci")), _fmt(probe["mae"]), _fmt(probe.get("acc"))]])
            + f"<p class=\"muted\">{probe['weighting']}; bootstrap over test images (n={cfg.n_boot}).</p>"))
    elif probe:
        sections.append(("kNN-regression probe", f"<p>skipped: {probe['skipped']}</p>"))
    d = result["duplicates"]
    body = table(["threshold", "pairs", "cross-split", "cross-source", "rows involved"],
                 [[d["threshold"], d["pairs"], d["cross_split"], d["cross_source"], d["rows"]]])
    if d["by_split_pair"]:
        body += table(["split pair", "pairs"], list(d["by_split_pair"].items()))
    if d["by_source_pair"]:
        body += table(["source pair", "pairs"], list(d["by_source_pair"].items()))
    if dup_sheet:
        body += image_tag(dup_sheet, "most similar pairs")
    if dup_pairs:
        body += table(["cosine", "a", "b", "splits", "flags"], [
            [f"{p['cosine']:.4f}", link(rel_link(paths[p["row_a"]], out), f"{p['source_a']}/{p['key_a']}"),
             link(rel_link(paths[p["row_b"]], out), f"{p['source_b']}/{p['key_b']}"),
             f"{p['split_a'] or '-'} / {p['split_b'] or '-'}",
             ", ".join(f for f in ("cross_split", "cross_source") if p[f])] for p in dup_pairs[:50]])
        body += '<p class="muted">All pairs: <a href="duplicates.csv">duplicates.csv</a>.</p>'
    sections.append(("Near-duplicates", body))
    for n, q in enumerate(result["queries"]):
        rows = [[0, link(rel_link(paths[q["row"]], out), f"{q['source']}/{q['key']}"), "query",
                 _fmt(q["score"]), q["split"] or "-"]]
        rows += [[i + 1, link(rel_link(paths[nb["row"]], out), f"{nb['source']}/{nb['key']}"),
                  f"{nb['similarity']:.4f}", _fmt(nb["score"]), nb["split"] or "-"]
                 for i, nb in enumerate(q["neighbors"])]
        sections.append((f"Query {n + 1}: {q['key']}", image_tag(q["sheet"], q["key"])
                         + table(["#", "image", "cosine", "score", "split"], rows)))
    return html_page(f"cskd neighbors: {Path(cfg.cache).name}", sections)


def _features(cfg: NeighborsConfig, cache, paths: list[str], device, on_progress) -> tuple[np.ndarray, dict]:
    """(N, D) features of every row's view 0: the cached teacher's, or a run's encoder's (computed now)."""
    from ..models.runs import load_run_encoder

    if not cfg.model:
        feats = cache.embed[:, 0].astype(np.float32)
        return feats, {"source": "cache", "model": None, "teacher": cache.manifest["teacher"]["spec"],
                       "dim": int(feats.shape[1]), "view": 0}
    encoder, info = load_run_encoder(cfg.model, device=device, trust_code=cfg.trust_code)
    bar = (lambda d, t: on_progress("embed", d, t)) if on_progress else None
    feats = embed_rows(cache, encoder, paths, cfg.batch_size, cfg.num_workers, device, cfg.max_pixels, bar)
    return feats, {"source": "model", **info, "dim": int(feats.shape[1]), "view": 0,
                   "input_size": list(encoder.input_cfg["size"])}


def _queries(cfg: NeighborsConfig, cache, index, labels: _Labels | None) -> list[dict]:
    """A seeded sample of query rows, each with its k neighbours."""
    from ..evaluate.knn_index import neighbours_excluding_self

    n_q = min(cfg.queries, len(cache))
    q_rows = np.sort(np.random.default_rng(cfg.seed).choice(len(cache), n_q, replace=False)) if n_q else \
        np.zeros(0, np.int64)
    sims, ids = neighbours_excluding_self(index, cfg.k, q_rows)
    queries = []
    for n, r in enumerate(q_rows):
        q = _row_info(cache, int(r), labels)
        q["sheet"] = f"sheets/query-{n:03d}.png"
        q["neighbors"] = [{**_row_info(cache, int(j), labels), "similarity": round(float(s), 6)}
                          for s, j in zip(sims[n], ids[n]) if j >= 0]
        queries.append(q)
    return queries


def _labels_summary(labels: _Labels | None) -> dict | None:
    if not labels:
        return None
    return {"spec": labels.spec, "name": labels.labelset.name, "total": len(labels.labelset.labels),
            "linked": labels.link.linked, "by_path": labels.link.by_path, "by_content": labels.link.by_content,
            "unlinked": len(labels.link.unlinked), "splits": dict(Counter(s for s in labels.row_split if s))}


def _render_sheets(cfg: NeighborsConfig, folder: Path, paths: list[str], queries: list[dict], dup_pairs: list[dict],
                   on_progress) -> tuple[int, str | None]:
    """One contact sheet per query (+ one of the most similar pairs) into ``folder``; (placeholders, dup sheet)."""
    from .contact_sheet import Cell, render_sheet

    total = len(queries) + (1 if dup_pairs else 0)
    placeholders = 0
    for n, q in enumerate(queries):
        cells = [Cell(paths[q["row"]], q["key"], ["query"] + _caption(q), highlight=True)]
        cells += [Cell(paths[nb["row"]], nb["key"], [f"#{i + 1}  cos={nb['similarity']:.3f}"] + _caption(nb))
                  for i, nb in enumerate(q["neighbors"])]
        placeholders += render_sheet([cells], folder / f"query-{n:03d}.png", cfg.thumb,
                                     title=f"query {n + 1}: {q['source']}/{q['key']}",
                                     max_pixels=cfg.max_pixels)["placeholders"]
        if on_progress:
            on_progress("sheets", n + 1, total)
    if not dup_pairs:
        return placeholders, None
    cells = [c for p in dup_pairs[:12] for c in (
        Cell(paths[p["row_a"]], p["key_a"], [f"cos={p['cosine']:.4f}", p["split_a"] or p["source_a"]]),
        Cell(paths[p["row_b"]], p["key_b"], [" ".join(f for f in ("cross_split", "cross_source") if p[f]) or "-",
                                             p["split_b"] or p["source_b"]]))]
    rows = [cells[i:i + 6] for i in range(0, len(cells), 6)]  # three pairs side by side: a grid, not a column
    placeholders += render_sheet(rows, folder / "duplicates.png", cfg.thumb,
                                 title=f"most similar pairs (cos >= {cfg.dup_threshold})",
                                 max_pixels=cfg.max_pixels)["placeholders"]
    if on_progress:
        on_progress("sheets", total, total)
    return placeholders, "sheets/duplicates.png"


def run_neighbors(cfg: NeighborsConfig, on_progress: Callable[[str, int, int], None] | None = None,
                  on_status: Callable[[str], None] | None = None) -> dict:
    """The whole command; returns what neighbors.json holds. Every input is checked before anything is written."""
    from ..cache.paths import parse_image_root, resolve_paths
    from ..cache.reader import open_cache
    from ..evaluate.knn_index import build_index
    from ..files import claim_out_dir
    from ..train.engine import resolve_device

    cfg.validate()
    claim_out_dir(cfg.out, "neighbors.json", "neighbours page", NeighborsError)
    status = on_status or (lambda m: None)
    cache = open_cache(cfg.cache, verify=not cfg.no_verify)
    if len(cache) < 2:
        raise NeighborsError(f"{cfg.cache}: {len(cache)} row(s); neighbours need at least 2")
    image_root = parse_image_root(cfg.cache_image_root)
    paths = resolve_paths(cache, image_root)
    labels = _link(cfg, cache, image_root) if cfg.labels else None
    if labels:
        status(labels.link.summary())
    device = resolve_device(cfg.device)
    feats, features = _features(cfg, cache, paths, device, on_progress)
    index_kwargs = dict(backend=cfg.backend, ivf_threshold=cfg.ivf_threshold, nlist=cfg.nlist, nprobe=cfg.nprobe,
                        seed=cfg.seed, gpu=cfg.gpu, device=str(device))
    index = build_index(feats, **index_kwargs)
    if index.note:
        status(index.note)
    probe = _probe(cfg, labels, feats, index_kwargs) if labels else None
    queries = _queries(cfg, cache, index, labels)

    # Every check is done; from here on only writes. The pairs CSV and the sheets go to temporary names that
    # replace OUT/duplicates.csv and OUT/sheets at the end.
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp, tmp_csv = out / ".sheets.tmp", out / f".duplicates.csv.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        dup_pairs, dup_summary = _duplicates(index, cache, labels, cfg.dup_threshold, tmp_csv, cfg.max_pairs)
        if dup_summary["collapsed"]:
            status(f"{100 * dup_summary['share']:.0f}% of all {len(cache) * (len(cache) - 1) // 2:,} pairs have "
                   f"cosine >= {cfg.dup_threshold}: the features look collapsed (the encoder sees the images as "
                   f"alike), so near-duplicates mean little; duplicates.csv lists all {dup_summary['pairs']:,}, "
                   f"the page the {dup_summary['listed']:,} most similar")
        result = {"format": FORMAT, "version": VERSION, "cache": str(cache.path), "rows": len(cache),
                  "features": features, "index": index.describe(), "k": cfg.k, "labels": _labels_summary(labels),
                  "probe": probe, "duplicates": {**dup_summary, "csv": "duplicates.csv"}, "queries": queries,
                  "seed": cfg.seed, "config": {k: v for k, v in asdict(cfg).items() if k not in ("cache", "out")}}
        result["missing_images_in_sheets"], dup_sheet = _render_sheets(cfg, tmp, paths, queries, dup_pairs,
                                                                       on_progress)
        page = _html(cfg, result, out, paths, dup_pairs, dup_sheet)
        os.chmod(tmp_csv, default_file_mode())
        os.replace(tmp_csv, out / "duplicates.csv")
        if (out / "sheets").exists():
            shutil.rmtree(out / "sheets")
        os.replace(tmp, out / "sheets")
        atomic_write_text(out / "index.html", page)
        write_json(out / "neighbors.json", result)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp_csv.unlink(missing_ok=True)
    return result

