"""Your own labels as a CSV or JSON-lines file: ``csv:FILE`` / ``jsonl:FILE``.

Fields per row (CSV columns or JSON keys):

| field   | required | meaning                                                                        |
|---------|----------|--------------------------------------------------------------------------------|
| path    | yes      | image path, relative to the label file's folder (or to image_root), or absolute |
| score   | one of   | mean score on any scale                                                        |
| dist    | these    | K-bin votes or probabilities: a JSON list, ``0.1;0.2;...``, or columns d1..dK  |
| split   | no       | train/val/test (aliases: training, validation, valid, dev, testing)             |
| key     | no       | image id; defaults to path as written                                          |
| other   | no       | kept per row as text (``Label.extra``), e.g. a source-photo id for ``--group-by column:NAME`` |

With only dist, score = the expected bin value over 1..K and the scale is 1..K. With a score column the
scale is the observed (min, max) of the scores, because a free-form file does not say its range: use a
dataset's own reader when it has one. The binary threshold is the middle of the scale.
Rows with no split (column absent or empty) are split by key hash: 15 % test, val_fraction val, rest train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import LabelError, MissingFile
from .labelset import Label, LabelSet, finish, norm_split, normalise_dist, number, read_csv, seeded_split


_FIELDS = {"path", "score", "dist", "split", "key"}


def _parse_dist(value, where: str) -> np.ndarray | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(";") if v.strip()]
        except ValueError:
            raise LabelError(f"{where}: dist {text!r} is neither a JSON list nor ';'-separated numbers") from None
    return normalise_dist(value, where)


def _to_labels(records: list[tuple[str, dict]], base: Path, name: str, val_fraction: float, seed: int,
               check_images: bool) -> LabelSet:
    labels, bins, has_score = [], None, False
    for where, rec in records:
        path = str(rec.get("path") or "").strip()
        if not path:
            raise LabelError(f"{where}: no 'path'; every row needs an image path")
        dcols = []
        while f"d{len(dcols) + 1}" in rec:
            dcols.append(rec[f"d{len(dcols) + 1}"])
        dist = _parse_dist(rec.get("dist") if not dcols else list(dcols), where)
        raw = rec.get("score")
        score = None if raw is None or str(raw).strip() == "" else number(raw, where)
        if dist is None and score is None:
            raise LabelError(f"{where}: needs a 'score' or a 'dist' (or d1..dK columns)")
        if dist is not None:
            if bins is not None and len(dist) != bins:
                raise LabelError(f"{where}: {len(dist)} bins, earlier rows have {bins}")
            bins = len(dist)
        if score is None:
            score = float(dist @ np.arange(1, len(dist) + 1))
        else:
            has_score = True
        key = str(rec.get("key") or path)
        split = rec.get("split")
        split = norm_split(split, where) if split not in (None, "") else seeded_split(key, val_fraction, seed)
        full = Path(path) if Path(path).is_absolute() else base / path
        taken = _FIELDS | {f"d{i}" for i in range(1, len(dcols) + 1)}
        extra = {k: str(v).strip() for k, v in rec.items() if k not in taken and v is not None}
        labels.append(Label(key, str(full), split, score, dist, extra or None))
    if not labels:
        raise LabelError(f"{name}: no label rows")
    if has_score:
        s = np.array([lb.score for lb in labels])
        scale = (float(s.min()), float(s.max()))
        if scale[0] == scale[1]:
            scale = (scale[0] - 0.5, scale[1] + 0.5)  # all scores equal: any non-empty range keeps normalising finite
    else:
        scale = (1.0, float(bins))
    if bins is not None and any(lb.dist is None for lb in labels):
        bins = None  # a partial set of distributions cannot feed a distribution loss
        for lb in labels:
            lb.dist = None
    return finish(name, labels, scale, bins, (scale[0] + scale[1]) / 2, check_images)


def read_csv_labels(file: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
                    check_images: bool = True) -> LabelSet:
    file = Path(file)
    if not file.is_file():
        raise MissingFile(f"label file {file} not found")
    header, rows = read_csv(file)
    records = [(f"{file}:{n}", dict(zip(header, (c.strip() for c in row)))) for n, row in enumerate(rows, 2)]
    return _to_labels(records, Path(image_root) if image_root else file.parent, file.stem, val_fraction, seed,
                      check_images)


def read_jsonl_labels(file: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05,
                      seed: int = 0, check_images: bool = True) -> LabelSet:
    file = Path(file)
    if not file.is_file():
        raise MissingFile(f"label file {file} not found")
    records = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelError(f"{file}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise LabelError(f"{file}:{n}: expected a JSON object per line, got {type(rec).__name__}")
            records.append((f"{file}:{n}", rec))
    return _to_labels(records, Path(image_root) if image_root else file.parent, file.stem, val_fraction, seed,
                      check_images)
