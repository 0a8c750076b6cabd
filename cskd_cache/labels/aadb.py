"""AADB (Kong et al., "Photo Aesthetics Ranking Network with Attributes and Content Adaptation", ECCV 2016).

Written from the public documentation and common loaders, NOT checked against the real files (no sample
is available here). Layout: ``ROOT/imgListFiles_label/imgList{Train,Validation,Test}Regression_score.txt``,
one ``image_name score`` line per image, score in [0, 1] (the mean of 5 raters' 1..5 ratings, rescaled).
The release also has ``imgListTestNewRegression_score.txt``, a corrected test list; it is preferred when
present. Official split: 8,458 train, 500 val, 1,000 test. No per-image votes: ``bins`` is None.

Images: ``ROOT/datasetImages_originalSize/{image_name}`` unless image_root is given.
"good" means score >= 0.5, the middle of the scale (a convention; AADB defines no binary label).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LabelError
from .labelset import Label, LabelSet, finish, first_existing, number

SCALE = (0.0, 1.0)
BINS = None
THRESHOLD = 0.5


def read_aadb(root: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
              check_images: bool = True) -> LabelSet:
    # val_fraction and seed are unused: AADB ships its own validation list
    root = Path(root)
    images = Path(image_root) if image_root else root / "datasetImages_originalSize"
    dirs = [root / "imgListFiles_label", root]
    labels = []
    for split, names in (("train", ["Train"]), ("val", ["Validation"]), ("test", ["TestNew", "Test"])):
        path = first_existing([d / f"imgList{nm}Regression_score.txt" for nm in names for d in dirs],
                              f"AADB {split} list")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise LabelError(f"{path}:{n}: expected 'image_name score', got {line!r}")
            key, score = parts[0], number(parts[1], f"{path}:{n}")
            labels.append(Label(key, str(images / key), split, score, None))
    return finish("aadb", labels, SCALE, BINS, THRESHOLD, check_images)
