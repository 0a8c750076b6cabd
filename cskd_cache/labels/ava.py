"""AVA (Murray et al., CVPR 2012): 10-bin vote histograms, scores 1..10.

Two on-disk layouts are read:

* official: ``ROOT/AVA.txt`` (or ``ROOT/AVA_dataset/AVA.txt``), one whitespace-separated line per image,
  ``index image_id n1 .. n10 tag1 tag2 challenge`` where n_i counts the votes for score i. Test = the ids in
  ``aesthetics_image_lists/generic_test.jpgl`` (20,000 ids, under ROOT/ or ROOT/AVA_dataset/); train = the
  rest; val = a val_fraction of train chosen by key hash.
* TANet: ``ROOT/tanet_ava_{train,val,test}.csv`` with header
  ``image_id,score2,...,score11,tag1,tag2,tag3``; score2..score11 are the vote counts for scores 1..10
  (named after their column index in AVA.txt), tag3 is the challenge id. This is TANet's own random split:
  its test ids are NOT the official generic_test list (only ~8 % overlap), so numbers on it are not
  comparable with papers using the official split. The published sample has only val and test files.

Images: ``ROOT/images/{image_id}.jpg`` unless image_root is given.
score = mean vote, dist = votes / total; "good" means score >= 5.0, the usual AVA binary convention.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import LabelError, MissingFile
from .labelset import Label, LabelSet, column, finish, first_existing, number, read_csv, val_or_train

log = logging.getLogger(__name__)

SCALE = (1.0, 10.0)
BINS = 10
THRESHOLD = 5.0
_VALUES = np.arange(1, BINS + 1, dtype=np.float64)


def _label(key: str, votes: list[str], where: str, images: Path, split: str) -> Label | None:
    counts = np.array([number(v, where, "vote count") for v in votes])
    if counts.shape != (BINS,) or (counts < 0).any():
        raise LabelError(f"{where}: expected {BINS} non-negative vote counts, got {votes}")
    total = counts.sum()
    if total <= 0:
        return None  # an image nobody rated has no label
    dist = counts / total
    return Label(key, str(images / f"{key}.jpg"), split, float(dist @ _VALUES), dist)


def _read_official(txt: Path, test_list: Path, images: Path, val_fraction: float, seed: int) -> list[Label]:
    test_ids = set(test_list.read_text().split())
    labels, unrated = [], 0
    with open(txt) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 12:
                raise LabelError(f"{txt}:{n}: expected 'index image_id n1..n10 tag1 tag2 challenge', got {line!r}")
            key = parts[1]
            split = "test" if key in test_ids else val_or_train(key, val_fraction, seed)
            lb = _label(key, parts[2:12], f"{txt}:{n}", images, split)
            unrated += lb is None
            if lb is not None:
                labels.append(lb)
    if unrated:
        log.warning("%s: %d images with no votes were skipped", txt, unrated)
    return labels


def _read_tanet(root: Path, images: Path) -> list[Label]:
    labels = []
    for split in ("train", "val", "test"):
        path = root / f"tanet_ava_{split}.csv"
        if not path.exists():
            continue
        header, rows = read_csv(path)
        ki = column(header, "image_id", path)
        vi = [column(header, f"score{i}", path) for i in range(2, 12)]
        for n, row in enumerate(rows, 2):
            lb = _label(row[ki].strip(), [row[i] for i in vi], f"{path}:{n}", images, split)
            if lb is not None:
                labels.append(lb)
    return labels


def read_ava(root: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
             check_images: bool = True) -> LabelSet:
    root = Path(root)
    images = Path(image_root) if image_root else root / "images"
    txt = [root / "AVA.txt", root / "AVA_dataset" / "AVA.txt"]
    if any(p.exists() for p in txt):
        lists = [root / "aesthetics_image_lists", root / "AVA_dataset" / "aesthetics_image_lists"]
        test_list = first_existing([d / "generic_test.jpgl" for d in lists], "AVA official test list")
        labels = _read_official(first_existing(txt, "AVA.txt"), test_list, images, val_fraction, seed)
    elif list(root.glob("tanet_ava_*.csv")):
        labels = _read_tanet(root, images)
    else:
        raise MissingFile(f"no AVA labels under {root}: expected AVA.txt (or AVA_dataset/AVA.txt) "
                                "with aesthetics_image_lists/generic_test.jpgl, or TANet's tanet_ava_{train,val,test}.csv")
    return finish("ava", labels, SCALE, BINS, THRESHOLD, check_images)
