"""TAD66K (He et al., "Rethinking Image Aesthetics Assessment", IJCAI 2022; the TANet release).

``ROOT/merge/train.csv`` and ``ROOT/merge/test.csv`` (``ROOT/dataset/merge/`` is accepted too, as the
release unpacks), header ``image,score``: the file name and the mean aesthetic score. The release also has
``unmerge/{train,test}/<theme>.csv`` in the same format, one file per theme (47 themes); the merged files are
what benchmarks use. The scale is 1..10 as in the paper; the published files span 1.13..9.46 (mean 5.43,
52,248 train and 14,079 test rows). No vote histograms are published, so ``bins`` is None.

Images: ``ROOT/images/{image}`` unless image_root is given. val = a val_fraction of train by key hash.
"good" means score >= 5.0, kept equal to AVA's since both use a 1..10 scale (a convention, not from the paper).
"""

from __future__ import annotations

from pathlib import Path

from .labelset import Label, LabelSet, column, finish, first_existing, number, read_csv, val_or_train

SCALE = (1.0, 10.0)
BINS = None
THRESHOLD = 5.0


def read_tad66k(root: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
                check_images: bool = True) -> LabelSet:
    root = Path(root)
    images = Path(image_root) if image_root else root / "images"
    merge = first_existing([root / "merge", root / "dataset" / "merge"], "TAD66K merge/ folder with train.csv and test.csv")
    labels = []
    for file, official in (("train.csv", "train"), ("test.csv", "test")):
        path = first_existing([merge / file], f"TAD66K {file}")
        header, rows = read_csv(path)
        ii, si = column(header, "image", path), column(header, "score", path)
        for n, row in enumerate(rows, 2):
            key = row[ii].strip()
            score = number(row[si], f"{path}:{n}")
            split = official if official == "test" else val_or_train(key, val_fraction, seed)
            labels.append(Label(key, str(images / key), split, score, None))
    return finish("tad66k", labels, SCALE, BINS, THRESHOLD, check_images)
