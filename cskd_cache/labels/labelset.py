"""The label records every dataset reader returns, and the helpers the readers share.

A reader turns one dataset's on-disk label files into a `LabelSet`: one `Label` per image, each with its
split, its score on the dataset's native scale and, where the dataset publishes votes, the normalised
K-bin distribution. Splits that the dataset does not ship are drawn by a hash of the image key, so a key's
split never depends on row order or on which other rows are present.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import LabelError, MissingFile

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Benchmarks report a fixed held-out test set; 15 % matches the common 80/5/15 convention for sets
# without an official split (the val share is the caller's val_fraction).
TEST_FRACTION = 0.15

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


@dataclass
class Label:
    key: str
    path: str
    split: str
    score: float
    dist: np.ndarray | None = None
    # the row's other columns (csv:/jsonl: files), e.g. a source-photo id for `cskd evaluate --group-by column:NAME`
    extra: dict[str, str] | None = None


@dataclass
class LabelSet:
    """One dataset's labels. ``missing`` holds the image paths of label rows with no file on disk.

    Rows with a missing image are kept out of ``labels`` so a training loop never trips on them; the
    readers report them once, in ``missing_summary()``, instead of failing on the first one.
    """

    name: str
    labels: list[Label]
    scale: tuple[float, float]
    bins: int | None
    threshold: float
    missing: list[str] = field(default_factory=list)
    # split of each missing path, so split() can keep only its own missing rows
    _missing_split: dict[str, str] = field(default_factory=dict, repr=False)
    # (path, reason) of rows dropped by `drop_unreadable`
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> LabelSet:
        if name not in SPLITS:
            raise LabelError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        miss = [p for p in self.missing if self._missing_split.get(p) == name]
        return replace(self, labels=[lb for lb in self.labels if lb.split == name], missing=miss,
                       _missing_split={p: name for p in miss})

    def keys(self) -> list[str]:
        return [lb.key for lb in self.labels]

    def paths(self) -> list[str]:
        return [lb.path for lb in self.labels]

    def scores(self) -> np.ndarray:
        return np.array([lb.score for lb in self.labels], dtype=np.float64)

    def dists(self) -> np.ndarray:
        if self.bins is None:
            raise LabelError(f"{self.name} has no score distributions (only mean scores)")
        if not self.labels:
            return np.zeros((0, self.bins))
        if any(lb.dist is None for lb in self.labels):
            raise LabelError(f"{self.name}: some labels have no distribution")
        return np.stack([lb.dist for lb in self.labels]).astype(np.float64)

    def normalised_score(self) -> np.ndarray:
        lo, hi = self.scale
        return (self.scores() - lo) / (hi - lo)

    def counts(self) -> dict[str, int]:
        c = Counter(lb.split for lb in self.labels)
        return {s: c.get(s, 0) for s in SPLITS}

    def missing_summary(self, show: int = 3) -> str:
        """One line for all missing images, or '' when every label has its image."""
        if not self.missing:
            return ""
        total = len(self.labels) + len(self.missing)
        first = ", ".join(self.missing[:show]) + (", ..." if len(self.missing) > show else "")
        return (f"{self.name}: {len(self.missing)} of {total} label rows have no image on disk and were "
                f"left out (first: {first}); check the image root")

    def drop_unreadable(self, workers: int = 8) -> LabelSet:
        """The same labels without rows whose image is certainly broken (`images.quick_check`: empty, truncated);
        they are listed in ``unreadable`` and reported by `unreadable_summary`."""
        from concurrent.futures import ThreadPoolExecutor

        from ..data.images import quick_check

        with ThreadPoolExecutor(max_workers=workers) as pool:
            verdicts = list(pool.map(quick_check, self.paths(), chunksize=64))
        bad = [(lb.path, v[0]) for lb, v in zip(self.labels, verdicts) if v is not None]
        if not bad:
            return self
        return replace(self, labels=[lb for lb, v in zip(self.labels, verdicts) if v is None],
                       unreadable=[*self.unreadable, *bad])

    def unreadable_summary(self, show: int = 3) -> str:
        if not self.unreadable:
            return ""
        first = ", ".join(f"{p} ({r})" for p, r in self.unreadable[:show])
        return (f"{self.name}: {len(self.unreadable)} labelled images are broken and were skipped (first: {first}"
                f"{', ...' if len(self.unreadable) > show else ''})")

    def summary(self) -> str:
        c = self.counts()
        s = (f"{self.name}: {len(self)} labels (train {c['train']}, val {c['val']}, test {c['test']}), "
             f"scale {self.scale[0]:g}..{self.scale[1]:g}, bins {self.bins}, threshold {self.threshold:g}")
        return s + (f"; {len(self.missing)} missing images" if self.missing else "")


def hash_unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): Python's hash() is salted per process, blake2b is not."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def val_or_train(key: str, val_fraction: float, seed: int) -> str:
    return "val" if hash_unit(key, seed) < val_fraction else "train"


def seeded_split(key: str, val_fraction: float, seed: int) -> str:
    # test takes the low end of the hash, so changing val_fraction never moves an image into or out of test
    u = hash_unit(key, seed)
    if u < TEST_FRACTION:
        return "test"
    return "val" if u < TEST_FRACTION + val_fraction else "train"


def norm_split(value: str, where: str) -> str:
    s = _SPLIT_ALIASES.get(str(value).strip().lower())
    if s is None:
        raise LabelError(f"{where}: unknown split {value!r}; use train, val or test")
    return s


def number(value, where: str, what: str = "score") -> float:
    """A finite float from a label file's cell, or ValueError naming file:line: NaN and inf are refused here,
    where the fix is obvious, not later as a "non-finite loss" that blames the learning rate."""
    try:
        x = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise LabelError(f"{where}: {what} {value!r} is not a number; fix or drop this row") from None
    if not np.isfinite(x):
        raise LabelError(f"{where}: {what} {value!r} is not finite; fix or drop this row")
    return x


def normalise_dist(values, where: str) -> np.ndarray:
    d = np.asarray([number(v, where, "vote") for v in values], dtype=np.float64)
    total = d.sum()
    if d.ndim != 1 or not np.isfinite(total) or total <= 0 or (d < 0).any():
        raise LabelError(f"{where}: not a distribution (needs non-negative values with a positive sum): {values!r}")
    return d / total


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows; utf-8-sig because spreadsheet exports often start with a BOM."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise LabelError(f"{path}: empty file")
    return [h.strip() for h in rows[0]], rows[1:]


def column(header: list[str], name: str, path: Path) -> int:
    """Index of the first column called name (SPAQ's table repeats a header, the first is the one we want)."""
    try:
        return header.index(name)
    except ValueError:
        raise LabelError(f"{path}: no column {name!r}; the header is {header}") from None


def first_existing(candidates: list[Path], what: str) -> Path:
    for p in candidates:
        if p.exists():
            return p
    raise MissingFile(f"{what} not found; looked for " + ", ".join(str(p) for p in candidates))


def _existing_files(paths: list[str]) -> set[str]:
    # one listdir per folder instead of one stat per image: AVA has 255k images in one folder
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p), []).append(p)
    found: set[str] = set()
    for d, ps in by_dir.items():
        try:
            names = set(os.listdir(d or "."))
        except OSError:
            continue
        found.update(p for p in ps if os.path.basename(p) in names)
    return found


def finish(name: str, labels: list[Label], scale: tuple[float, float], bins: int | None, threshold: float,
           check_images: bool = True) -> LabelSet:
    """Build the LabelSet, moving rows whose image is absent into ``missing`` and logging them once."""
    seen: set[str] = set()
    for lb in labels:
        if lb.key in seen:
            raise LabelError(f"{name}: image key {lb.key!r} appears twice in the label files")
        seen.add(lb.key)
    missing: list[str] = []
    if check_images:
        present = _existing_files([lb.path for lb in labels])
        missing = [lb.path for lb in labels if lb.path not in present]
        miss_split = {lb.path: lb.split for lb in labels if lb.path not in present}
        labels = [lb for lb in labels if lb.path in present]
    else:
        miss_split = {}
    ls = LabelSet(name, labels, (float(scale[0]), float(scale[1])), bins, float(threshold), missing, miss_split)
    if missing:
        log.warning(ls.missing_summary())
    return ls
