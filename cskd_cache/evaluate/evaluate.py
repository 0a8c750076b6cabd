"""`cskd evaluate`: score one split of a labelled dataset with a trained IAA model and report the IAA metrics.

Metrics (`cskd_cache.evaluate.metrics`): SRCC and PLCC with seeded percentile-bootstrap 95 % intervals, MAE, binary
accuracy at the dataset's threshold, and EMD when the dataset publishes vote distributions and the model has a
distribution head with the same number of bins. Scores are on the dataset's native scale; when the model was
trained on a different scale (another dataset), MAE, accuracy and EMD would compare different units, so only
the rank/linear correlations are reported and ``notes`` says why.

Images are rendered with the model's eval transform (`cskd_cache.evaluate.scoring`). Label rows whose image is not on
disk and files that cannot be decoded are left out of the metrics, counted (``n_missing``, ``n_unreadable``)
and listed (``skipped``); they never stop the run, but fewer than 2 scored images is an error.

Output folder (written to temporary names and renamed, so a file with its final name is complete):

``metrics.json``
    ``n`` (images scored), ``srcc``, ``plcc``, ``mae``, ``acc`` (when the scales match), ``emd`` (see above),
    ``srcc_ci`` / ``plcc_ci`` ([lo, hi], with ``--bootstrap`` > 0), then the context: ``model``, ``labels``
    (the DATASET_SPEC), ``dataset``, ``split``, ``scale``, ``model_scale``, ``threshold``, ``bins``,
    ``model_bins``, ``bootstrap`` ({n, alpha, seed}, + group_by, groups with ``--group-by``: whole groups of keys,
    e.g. the versions of one source photo, are resampled together), ``n_labels`` (rows in the split), ``n_missing``,
    ``n_unreadable``, ``skipped`` ([{key, path, reason}]) and ``notes``.
``predictions.csv``
    ``key,path,true,pred`` for every scored image (full float precision), and ``group`` with ``--group-by``, so a
    later paired comparison (`cskd report`, ``benchmarks/srcc.py``) resamples the same groups.
``scatter.png``
    predicted vs true score with the y = x line and both scores' histograms in the margins; SRCC and PLCC in the
    title.
``confusion.png``
    with a distribution head on a binned dataset: the per-bin confusion (true vs predicted mean score, rounded to
    a bin; each row as shares of its images).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..cache.manifest import atomic_write_text, write_json
from ..errors import EvaluateError
from ..train.config import CommandConfig
from .metrics import evaluate_predictions

__all__ = ["EvalConfig", "EvalResult", "EvaluateError", "run_evaluate", "plot_scatter", "plot_confusion"]

ALPHA = 0.05


@dataclass
class EvalConfig(CommandConfig):
    model: str
    labels: str
    out: str
    split: str = "test"
    label_image_root: str | None = None
    batch_size: int = 32
    num_workers: int = 2
    bootstrap: int = 1000
    group_by: str | None = None  # regex on the label key: its first group (or match) names the source photo
    seed: int = 0
    device: str = "auto"
    trust_code: bool = False

    command: ClassVar[str] = "evaluate"
    error: ClassVar[type] = EvaluateError
    renamed: ClassVar[dict] = {"image_root": ("label_image_root", 1)}


@dataclass
class EvalResult:
    out: Path
    metrics: dict
    notes: list[str] = field(default_factory=list)

    @property
    def skipped_summary(self) -> str:
        """One line for every image left out, or '' when all were scored."""
        m = self.metrics
        if not m["n_missing"] and not m["n_unreadable"]:
            return ""
        first = ", ".join(f"{s['path']} ({s['reason'].split(':')[0]})" for s in m["skipped"][:3])
        more = ", ..." if len(m["skipped"]) > 3 else ""
        return (f"{m['n_missing'] + m['n_unreadable']} of {m['n_labels']} {m['split']} images left out of the metrics "
                f"({m['n_missing']} missing, {m['n_unreadable']} unreadable; first: {first}{more}); "
                f"all listed in {self.out / 'metrics.json'}")


def _same_scale(a, b) -> bool:
    return all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def plot_scatter(y_true: np.ndarray, y_pred: np.ndarray, title: str, path: str | os.PathLike,
                 scale: tuple[float, float] | None = None) -> None:
    """Predicted vs true with the y = x line and each score's histogram in the margins, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(y_true)
    fig = plt.figure(figsize=(6, 6), dpi=110)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top, right = fig.add_subplot(grid[0, 0], sharex=ax), fig.add_subplot(grid[1, 1], sharey=ax)
    # small translucent points: AVA's 20k test images would otherwise be one solid blob
    ax.scatter(y_true, y_pred, s=8 if n <= 2000 else 2, alpha=0.6 if n <= 2000 else 0.15, color="tab:blue",
               edgecolors="none")
    lo = float(min(np.min(y_true), np.min(y_pred), *(scale or ())))
    hi = float(max(np.max(y_true), np.max(y_pred), *(scale or ())))
    pad = 0.02 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.3", lw=1, ls="--", label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("true score")
    ax.set_ylabel("predicted score")
    ax.legend(loc="upper left")
    bins = np.linspace(lo - pad, hi + pad, 31)
    top.hist(y_true, bins=bins, color="0.55")
    right.hist(y_pred, bins=bins, color="tab:blue", orientation="horizontal")
    top.set_ylabel("images", fontsize=8)
    right.set_xlabel("images", fontsize=8)
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_title(title, fontsize=10)
    save_png(fig, Path(path))


def plot_confusion(dist_true: np.ndarray, dist_pred: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """Per-bin confusion of K-bin score distributions: each image's true and predicted mean score rounded to a bin
    (1..K); rows are true bins, cells the share of that row's images (the count in brackets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = dist_true.shape[1]
    values = np.arange(1, k + 1)

    def to_bin(d):
        return np.clip(np.rint(d @ values / np.maximum(d.sum(1), 1e-12)), 1, k).astype(int) - 1

    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (to_bin(dist_true), to_bin(dist_pred)), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5.2), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, f"{share[i, j]:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), values)
    ax.set_yticks(range(k), values)
    ax.set_xlabel("predicted bin (rounded mean score)")
    ax.set_ylabel("true bin (rounded mean score)")
    ax.set_title(title or "per-bin confusion", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true bin's images")
    fig.tight_layout()
    save_png(fig, Path(path))


def _predictions_csv(keys, paths, y_true, y_pred, groups=None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    grouped = groups is not None
    w.writerow(["key", "path", "true", "pred"] + (["group"] if grouped else []))
    for key, path, t, y, *group in zip(keys, paths, y_true, y_pred, *([groups] if grouped else [])):
        w.writerow([key, path, repr(float(t)), repr(float(y)), *group])
    return buf.getvalue()


COLUMN = "column:"


def column_groups(labels, spec: str, source: str) -> dict[str, str]:
    """``--group-by column:NAME``: each label's group is its label-file column NAME (csv:/jsonl: files keep their
    other columns); every row needs a value, or the evaluation stops before scoring."""
    name = spec[len(COLUMN):]
    out = {}
    for lb in labels:
        value = (lb.extra or {}).get(name, "")
        if not value:
            cols = sorted((lb.extra or {}))
            raise EvaluateError(f"--group-by {spec!r}: {source} row {lb.key!r} has no {name!r} value (its other "
                                f"columns: {', '.join(cols) or 'none'}); give every row one, or group by a key "
                                "pattern")
        out[lb.key] = value
    return out


def group_keys(keys: list[str], pattern: str, recorded: dict[str, str] | None = None) -> list[str]:
    """The group of each key: the first capture group of ``pattern`` (or its whole match), searched in the key;
    several images of one source photo (the proxy set's ``NAME__blur3.png``: ``^(.*)__``) then resample together.
    A ``column:NAME`` pattern takes the groups from ``recorded`` (key -> group: the label column, or the ``group``
    column of a grouped evaluation's predictions.csv)."""
    import re

    if pattern.startswith(COLUMN):
        if recorded is None or any(k not in recorded for k in keys):
            raise EvaluateError(f"--group-by {pattern!r}: no recorded group for some keys; evaluate again with "
                                f"--group-by {pattern!r} so predictions.csv carries the group column")
        return [recorded[k] for k in keys]
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise EvaluateError(f"--group-by {pattern!r}: not a regular expression ({e})") from None
    out = []
    for key in keys:
        m = rx.search(key)
        if m is None:
            raise EvaluateError(f"--group-by {pattern!r} does not match the label key {key!r}; give a pattern every "
                                "key matches, e.g. '^(.*)__' for the proxy set's NAME__kind.png")
        out.append(m.group(1) if rx.groups else m.group(0))
    return out


def run_evaluate(cfg: EvalConfig, on_progress: Callable[[int, int], None] | None = None,
                 on_status: Callable[[str], None] | None = None) -> EvalResult:
    """Load the model and the split's labels, score the images, compute the metrics and write cfg.out."""
    from ..labels import load_labels
    from ..models.scorer import load_iaa_model
    from ..train.engine import resolve_device
    from .scoring import score_files

    if cfg.bootstrap < 0:
        raise EvaluateError(f"bootstrap must be >= 0 resamples, got {cfg.bootstrap}")
    from ..files import claim_out_dir

    # refuses a file, or a folder of someone's files; the folder is for metrics.json, predictions.csv, scatter.png
    claim_out_dir(cfg.out, "metrics.json", "evaluation", EvaluateError)
    # The disk check happens while scoring (a missing file is one more skip reason), so every skipped row keeps
    # its key, and the images are looked at once.
    labels = load_labels(cfg.labels, image_root=cfg.label_image_root, check_images=False)
    part = labels.split(cfg.split)
    n_labels = len(part)
    if n_labels == 0:
        raise EvaluateError(f"{cfg.labels}: no {cfg.split!r} labels ({labels.summary()}); pick another --split")
    # a label file without the grouping column is refused before the images are scored
    recorded = column_groups(part.labels, cfg.group_by, cfg.labels) if cfg.group_by and \
        cfg.group_by.startswith(COLUMN) else None
    device = resolve_device(cfg.device)
    scorer = load_iaa_model(cfg.model, device=device, trust_code=cfg.trust_code)
    if on_status:
        on_status(f"{labels.name} {cfg.split}: {n_labels} images to score with {scorer.meta['encoder']['spec']} "
                  f"({scorer.head_kind} head) on {device}")
    scored = score_files(scorer, part.paths(), cfg.batch_size, cfg.num_workers, device, on_progress=on_progress)
    ok = scored.ok
    skipped = [{"key": lb.key, "path": lb.path, "reason": err}
               for lb, err in zip(part.labels, scored.errors) if err is not None]
    n_missing = sum(s["reason"].startswith("missing") for s in skipped)
    if ok.sum() < 2:
        raise EvaluateError(f"{cfg.labels} {cfg.split}: only {int(ok.sum())} of {n_labels} images could be scored "
                            f"({n_missing} missing, {len(skipped) - n_missing} unreadable) and the metrics need at "
                            "least 2; check --label-image-root")

    y_true = part.scores()[ok]
    y_pred = scored.score[ok]
    model_scale = scorer.scale
    model_bins = scorer.meta["head"].get("bins") if scorer.head_kind == "distribution" else None
    notes: list[str] = []
    same_scale = _same_scale(model_scale, labels.scale)
    dist_true = dist_pred = None
    if not same_scale:
        notes.append(f"the model predicts on {model_scale[0]:g}..{model_scale[1]:g} but {labels.name} is scored on "
                     f"{labels.scale[0]:g}..{labels.scale[1]:g}: MAE, accuracy and EMD left out (different units)")
    elif labels.bins and model_bins:
        if int(model_bins) != int(labels.bins):
            notes.append(f"EMD left out: the model has {model_bins} bins, {labels.name} has {labels.bins}")
        else:
            dist_true, dist_pred = part.dists()[ok], scored.dist[ok]
    elif labels.bins and not model_bins:
        notes.append("EMD left out: the model has a scalar head (no distribution)")
    keys = [lb.key for lb, k in zip(part.labels, ok) if k]
    groups = group_keys(keys, cfg.group_by, recorded) if cfg.group_by else None
    m = evaluate_predictions(y_true, y_pred, threshold=labels.threshold if same_scale else None,
                             dist_true=dist_true, dist_pred=dist_pred, n_boot=cfg.bootstrap, alpha=ALPHA,
                             seed=cfg.seed, groups=groups)
    if not same_scale:
        m.pop("mae", None)
    metrics = {**m, "model": str(cfg.model), "labels": cfg.labels, "dataset": labels.name, "split": cfg.split,
               "scale": list(labels.scale), "model_scale": list(model_scale), "threshold": labels.threshold,
               "bins": labels.bins, "model_bins": model_bins, "head": scorer.head_kind,
               "bootstrap": {"n": cfg.bootstrap, "alpha": ALPHA, "seed": cfg.seed,
                             **({"group_by": cfg.group_by, "groups": len(set(groups))} if groups is not None else {})},
               "n_labels": n_labels, "n_missing": n_missing, "n_unreadable": len(skipped) - n_missing,
               "skipped": skipped, "notes": notes}

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [lb.path for lb, k in zip(part.labels, ok) if k]
    atomic_write_text(out / "predictions.csv", _predictions_csv(keys, paths, y_true, y_pred, groups))
    title = (f"{labels.name} {cfg.split} (n={m['n']}): SRCC {m['srcc']:.3f}, PLCC {m['plcc']:.3f}\n"
             f"{Path(str(cfg.model)).name}")
    plot_scatter(y_true, y_pred, title, out / "scatter.png", labels.scale if same_scale else None)
    if dist_true is not None and dist_pred is not None and dist_true.shape[1] == dist_pred.shape[1]:
        plot_confusion(dist_true, dist_pred, out / "confusion.png", f"{labels.name} {cfg.split}: per-bin confusion")
    write_json(out / "metrics.json", metrics)  # last: its presence means the folder is complete
    return EvalResult(out, metrics, notes)
