"""KonIQ-10k (Hosu et al., IEEE TIP 2020): 10,073 in-the-wild images, 5-point ACR votes.

``ROOT/koniq10k_distributions_sets.csv``, header
``image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set``: c1..c5 are the vote fractions for ratings 1..5 (already
normalised), c_total the number of votes, MOS the mean opinion score rescaled by the authors to 1..100
(published values span 3.91..88.39), SD its standard deviation on the 1..5 scale, set = training (7,058),
validation (1,000) or test (2,015): the official split, used as is.
pyiqa's ``meta_info_KonIQ10kDataset.csv`` (``img_name,mos,std,split,c1..c5,c_total`` with split 0/1/2 =
train/val/test, same counts) is read when the original file is absent.

MOS tracks the mean rating closely but not exactly (r = 0.995), because the authors cleaned votes before
computing it, so score is the published MOS, not the expected value of dist.
Images: ``ROOT/1024x768/{image_name}`` unless image_root is given.
"good" means MOS >= 50, the middle of the scale (a convention; KonIQ defines no binary label).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LabelError
from .labelset import Label, LabelSet, column, finish, first_existing, norm_split, normalise_dist, number, read_csv

SCALE = (1.0, 100.0)
BINS = 5
THRESHOLD = 50.0
_PYIQA_SPLITS = {"0": "train", "1": "val", "2": "test"}


def read_koniq(root: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
               check_images: bool = True) -> LabelSet:
    # val_fraction and seed are unused: KonIQ ships its own validation set
    root = Path(root)
    images = Path(image_root) if image_root else root / "1024x768"
    path = first_existing([root / "koniq10k_distributions_sets.csv", root / "meta_info_KonIQ10kDataset.csv"],
                          "KonIQ-10k label file")
    header, rows = read_csv(path)
    pyiqa = "img_name" in header
    ki = column(header, "img_name" if pyiqa else "image_name", path)
    mi = column(header, "mos" if pyiqa else "MOS", path)
    si = column(header, "split" if pyiqa else "set", path)
    ci = [column(header, f"c{i}", path) for i in range(1, BINS + 1)]
    labels = []
    for n, row in enumerate(rows, 2):
        where = f"{path}:{n}"
        key = row[ki].strip()
        split = _PYIQA_SPLITS.get(row[si].strip()) if pyiqa else norm_split(row[si], where)
        if split is None:
            raise LabelError(f"{where}: unknown split {row[si]!r}; pyiqa uses 0/1/2 for train/val/test")
        dist = normalise_dist([row[i] for i in ci], where)
        labels.append(Label(key, str(images / key), split, number(row[mi], where), dist))
    return finish("koniq", labels, SCALE, BINS, THRESHOLD, check_images)
