"""IAA evaluation metrics in plain numpy (as pyiqa keeps SRCC/PLCC in one small module).

srcc / plcc
    Spearman and Pearson correlation. Ties get average ranks (scipy.stats.spearmanr's convention); AVA
    means tie often, so the convention matters. PLCC here is on raw predictions, as IAA papers report it;
    IQA papers sometimes fit a 4-parameter logistic first (pyiqa's ``fit_scale``), which we do not.
binary_accuracy
    Agreement of ``score >= threshold`` between truth and prediction (AVA: 5.0).
emd
    Earth mover's distance between K-bin distributions, r = 2 on the CDFs (NIMA), averaged over samples.
bootstrap_ci
    Seeded percentile bootstrap over images, for any ``fn(y_true, y_pred) -> float``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size < 2:
        raise ValueError(f"need at least 2 samples, got {t.size}")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("y_true and y_pred must be finite (found NaN or inf)")
    return t, p


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = avg[group]
    return ranks


def _pearson(t: np.ndarray, p: np.ndarray) -> float:
    t, p = t - t.mean(), p - p.mean()
    den = np.sqrt((t * t).sum() * (p * p).sum())
    # a constant input has no defined correlation; NaN (as scipy) rather than a misleading 0
    return float(np.clip((t * p).sum() / den, -1.0, 1.0)) if den > 0 else float("nan")


def plcc(y_true, y_pred) -> float:
    return _pearson(*_pair(y_true, y_pred))


def srcc(y_true, y_pred) -> float:
    t, p = _pair(y_true, y_pred)
    return _pearson(rankdata(t), rankdata(p))


def binary_accuracy(y_true, y_pred, threshold: float = 5.0) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean((t >= threshold) == (p >= threshold)))


def mae(y_true, y_pred) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def emd(dist_true, dist_pred, r: float = 2.0) -> float:
    """Mean over samples of (mean_k |CDF_true - CDF_pred|^r)^(1/r); rows are renormalised to sum to 1."""
    a = np.atleast_2d(np.asarray(dist_true, dtype=np.float64))
    b = np.atleast_2d(np.asarray(dist_pred, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"distributions differ in shape: {a.shape} vs {b.shape}")
    a = a / a.sum(axis=1, keepdims=True)
    b = b / b.sum(axis=1, keepdims=True)
    d = np.abs(np.cumsum(a, axis=1) - np.cumsum(b, axis=1)) ** r
    return float(np.mean(d.mean(axis=1) ** (1.0 / r)))


def resamples(n_items: int, n: int, rng: np.random.Generator, groups=None):
    """Index arrays of ``n`` bootstrap resamples: of the items, or (``groups``: one label per item) of whole
    groups, every item of a drawn group taken together."""
    if groups is None:
        for _ in range(n):
            yield rng.integers(0, n_items, n_items)
        return
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.nonzero(codes == g)[0] for g in range(int(codes.max()) + 1)] if n_items else []
    for _ in range(n):
        drawn = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[g] for g in drawn]) if len(drawn) else np.zeros(0, np.int64)


def bootstrap_ci(fn: Callable, y_true, y_pred, n: int = 1000, alpha: float = 0.05,
                 seed: int = 0, groups=None) -> tuple[float, float]:
    """Percentile interval of fn over n resamples of the samples (rows), drawn with a seeded generator. With
    ``groups`` (one label per row, e.g. the source photo of each degraded version) whole groups are resampled,
    so rows that are not independent move together and the interval is not optimistic."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} vs {len(p)}")
    if groups is not None and len(groups) != len(t):
        raise ValueError(f"{len(groups)} group labels for {len(t)} rows")
    rng = np.random.default_rng(seed)
    # one resample at a time: an (n, N) index matrix for AVA's 20k test images would be 160 MB
    stats = np.array([fn(t[i], p[i]) for i in resamples(len(t), n, rng, groups)], dtype=np.float64)
    stats = stats[np.isfinite(stats)]  # a resample of tied values has no correlation
    if stats.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def evaluate_predictions(y_true, y_pred, threshold: float | None = None, dist_true=None, dist_pred=None,
                         n_boot: int = 0, alpha: float = 0.05, seed: int = 0, groups=None) -> dict:
    """All metrics as plain floats (JSON-ready): n, srcc, plcc, mae, acc (with a threshold), emd (with both
    distributions) and, when n_boot > 0, srcc_ci / plcc_ci as [lo, hi] (resampling whole ``groups`` when given)."""
    t, p = _pair(y_true, y_pred)
    out: dict = {"n": int(t.size), "srcc": srcc(t, p), "plcc": plcc(t, p), "mae": mae(t, p)}
    if threshold is not None:
        out["acc"] = binary_accuracy(t, p, threshold)
    if dist_true is not None and dist_pred is not None:
        out["emd"] = emd(dist_true, dist_pred)
    if n_boot > 0:
        out["srcc_ci"] = list(bootstrap_ci(srcc, t, p, n_boot, alpha, seed, groups))
        out["plcc_ci"] = list(bootstrap_ci(plcc, t, p, n_boot, alpha, seed, groups))
    return out
