"""`cskd predict`: aesthetic scores of image files and folders from a trained IAA model, as CSV or JSON.

Inputs: files are taken as given (whatever their extension); folders are scanned recursively for image
extensions (`cskd_cache.data.sources.scan_images`: sorted, hidden files skipped). A path met twice is scored once.
Scores are on the scale of the dataset the model was trained on (``scale``), with the model's eval transform
(`cskd_cache.evaluate.scoring`). A file that cannot be read is kept in the output with an ``error`` and empty scores.

Output, chosen by the suffix of ``out`` and written atomically (temporary name, then rename):

``.csv``  one row per input: ``path,score,std,d1..dK,error``; ``std`` and ``d1..dK`` (probability of score bin
          k of K) only for a distribution head; ``error`` empty for scored files; floats in full precision.
``.json`` ``{"format": "cskd-predictions", "version": 1, "model", "head", "scale", "bins", "n_scored",
          "n_failed", "predictions": [{"path", "score", "std", "dist", "error"}]}``; ``std`` / ``dist`` null for a
          scalar head, ``score`` / ``std`` / ``dist`` null and ``error`` a string for an unreadable file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.manifest import atomic_write_text
from ..errors import EvaluateError

__all__ = ["FORMATS", "PredictResult", "collect_paths", "output_format", "run_predict", "write_predictions"]

FORMATS = (".csv", ".json")


def output_format(out: str | os.PathLike) -> str:
    """"csv" or "json" from the output's suffix; ValueError for any other suffix."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise EvaluateError(f"--out {out}: unknown output format {suffix or '(no suffix)'!r}; name the file .csv or .json")
    return suffix[1:]


def collect_paths(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders expanded recursively to their images, first occurrence kept. A path that does
    not exist stays in the list, so it is reported with the unreadable files rather than dropped."""
    from ..data.sources import scan_images

    out, seen = [], set()
    for item in inputs:
        p = Path(item)
        found = scan_images(p) if p.is_dir() else [p]
        for f in found:
            k = os.path.realpath(f)
            if k not in seen:
                seen.add(k)
                out.append(str(f))
    return out


@dataclass
class PredictResult:
    out: Path
    format: str
    n_inputs: int
    n_scored: int
    n_failed: int
    failed: list[tuple[str, str]]
    plot: Path | None = None


def plot_scores(scores: np.ndarray, scale: tuple[float, float], path: Path, title: str) -> None:
    """The distribution of predicted scores (finite ones) on the model's scale, as a histogram PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import save_png

    s = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.hist(s, bins=np.linspace(float(scale[0]), float(scale[1]), 41), color="tab:blue")
    if len(s):
        ax.axvline(float(np.median(s)), color="0.3", ls="--", lw=1, label=f"median {np.median(s):.3g}")
        ax.legend(fontsize=8)
    ax.set(xlabel="predicted score", ylabel="images", title=f"{title} ({len(s)} images)")
    fig.tight_layout()
    save_png(fig, path)


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def _csv_text(scores, dist_head: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    k = scores.dist.shape[1] if dist_head else 0
    w.writerow(["path", "score"] + (["std"] if dist_head else []) + [f"d{j + 1}" for j in range(k)] + ["error"])
    for i, path in enumerate(scores.paths):
        err = scores.errors[i]
        if err is not None:
            w.writerow([path, ""] + ([""] * (1 + k) if dist_head else []) + [err])
            continue
        row = [path, repr(float(scores.score[i]))]
        if dist_head:
            row += [repr(float(scores.std[i]))] + [repr(float(v)) for v in scores.dist[i]]
        w.writerow(row + [""])
    return buf.getvalue()


def _json_text(scores, scorer, model: str) -> str:
    dist_head = scores.dist is not None
    preds = []
    for i, path in enumerate(scores.paths):
        ok = scores.errors[i] is None
        preds.append({"path": path, "score": _num(scores.score[i]) if ok else None,
                      "std": _num(scores.std[i]) if ok and dist_head else None,
                      "dist": [float(v) for v in scores.dist[i]] if ok and dist_head else None,
                      "error": scores.errors[i]})
    doc = {"format": "cskd-predictions", "version": 1, "model": model, "head": scorer.head_kind,
           "scale": list(scorer.scale), "bins": scorer.meta["head"].get("bins") if dist_head else None,
           "n_scored": scores.n_ok, "n_failed": scores.n_failed, "predictions": preds}
    return json.dumps(doc, indent=1) + "\n"


def write_predictions(scores, scorer, out: str | os.PathLike, model: str = "") -> str:
    """Write ``scores`` (a `scoring.Scores`) to ``out`` in the format its suffix names; returns the format."""
    fmt = output_format(out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = _csv_text(scores, scores.dist is not None) if fmt == "csv" else _json_text(scores, scorer, model)
    atomic_write_text(out, text)
    return fmt


def run_predict(model: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                batch_size: int = 32, num_workers: int = 2, device: str = "auto",
                on_progress: Callable[[int, int], None] | None = None, trust_code: bool = False,
                plot: bool = False) -> PredictResult:
    """Score every image under ``inputs`` and write ``out``; unreadable files are listed, never raised.

    Raises ValueError for a bad ``out`` suffix or no inputs, FileNotFoundError for a missing model; the file is
    written even when nothing could be scored (every row then has its error)."""
    from ..models.scorer import load_iaa_model
    from ..train.engine import resolve_device
    from .scoring import score_files

    fmt = output_format(out)
    if Path(out).is_dir():
        raise EvaluateError(f"--out {out} is a folder; name a .csv or .json file")
    paths = collect_paths(inputs)
    if not paths:
        raise EvaluateError(f"no images found in {', '.join(map(str, inputs)) or '(no paths given)'}; pass image files "
                         f"or folders holding {', '.join(sorted(_exts()))} files")
    dev = resolve_device(device)
    scorer = load_iaa_model(model, device=dev, trust_code=trust_code)
    scores = score_files(scorer, paths, batch_size, num_workers, dev, on_progress=on_progress)
    write_predictions(scores, scorer, out, str(model))
    png = None
    if plot:  # OUT with .png for its suffix: the picture beside the table
        png = Path(out).with_suffix(".png")
        plot_scores(np.asarray(scores.score, np.float64), scorer.scale, png, Path(str(model)).name)
    return PredictResult(Path(out), fmt, len(paths), scores.n_ok, scores.n_failed, scores.failed(), png)


def _exts() -> frozenset[str]:
    from ..data.sources import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS
