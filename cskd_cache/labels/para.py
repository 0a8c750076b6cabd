"""PARA (Yang et al., "Personalized Image Aesthetics Assessment with Rich Attributes", CVPR 2022), GIAA labels.

Written from the public documentation and common loaders, NOT checked against the real files (no sample
is available here). Layout: ``ROOT/annotation/PARA-GiaaTrain.csv`` and ``PARA-GiaaTest.csv`` (ROOT/ itself
is accepted too) with columns ``sessionId,imageName,aestheticScore_mean`` (scale 1..5) and, when present,
the vote counts ``aestheticScore_1.0, aestheticScore_1.5, ..., aestheticScore_5.0`` (9 half-point bins),
which become ``dist``. Note the bin values are 1.0..5.0 in steps of 0.5, not 1..K: a 9-bin head's expected
score over 1..9 maps back by ``1 + (s - 1) / 2``.

Keys are ``sessionId/imageName``; images ``ROOT/imgs/{sessionId}/{imageName}`` unless image_root is given.
val = a val_fraction of the train file by key hash.
"good" means score >= 3.0, the middle of the scale (a convention; PARA defines no binary label).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LabelError
from .labelset import Label, LabelSet, column, finish, first_existing, normalise_dist, number, read_csv, val_or_train

SCALE = (1.0, 5.0)
THRESHOLD = 3.0
_VOTE = re.compile(r"aestheticScore_(\d+(?:\.\d+)?)$")


def read_para(root: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
              check_images: bool = True) -> LabelSet:
    root = Path(root)
    images = Path(image_root) if image_root else root / "imgs"
    labels, bins = [], None
    for file, official in (("PARA-GiaaTrain.csv", "train"), ("PARA-GiaaTest.csv", "test")):
        path = first_existing([root / "annotation" / file, root / file], f"PARA {file}")
        header, rows = read_csv(path)
        si, ni = column(header, "sessionId", path), column(header, "imageName", path)
        mi = column(header, "aestheticScore_mean", path)
        votes = sorted((float(m.group(1)), i) for i, h in enumerate(header) if (m := _VOTE.match(h)))
        vi = [i for _, i in votes]
        if bins is not None and len(vi) != bins:
            raise LabelError(f"{path}: {len(vi)} vote columns, but the other PARA file has {bins}")
        bins = len(vi)
        for n, row in enumerate(rows, 2):
            session, name = row[si].strip(), row[ni].strip()
            key = f"{session}/{name}"
            dist = normalise_dist([row[i] for i in vi], f"{path}:{n}") if vi else None
            split = official if official == "test" else val_or_train(key, val_fraction, seed)
            labels.append(Label(key, str(images / session / name), split, number(row[mi], f"{path}:{n}"), dist))
    return finish("para", labels, SCALE, bins or None, THRESHOLD, check_images)
