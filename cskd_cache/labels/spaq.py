"""SPAQ (Fang et al., CVPR 2020): 11,125 smartphone photos with a MOS on 0..100.

The release ships the MOS as an Excel sheet; we read pyiqa's CSV export of it,
``meta_info_SPAQDataset.csv`` in ROOT (or ROOT/Annotations/), header
``Image name,MOS,Brightness,Colorfulness,Contrast,Noisiness,Sharpness,<9 scene shares>,<EXIF columns>``.
Only ``Image name`` and ``MOS`` are used. The header repeats ``Brightness`` (the quality attribute and the
EXIF brightness value), so columns are looked up by first occurrence. Published MOS spans 2..96.

SPAQ has no official split (pyiqa keeps random ones in a separate pickle), so train/val/test is drawn by key
hash: 15 % test, val_fraction val, the rest train.
Images: ``ROOT/TestImage/{Image name}`` unless image_root is given (the release's folder name).
"good" means MOS >= 50, the middle of the scale (a convention; SPAQ defines no binary label).
"""

from __future__ import annotations

from pathlib import Path

from .labelset import Label, LabelSet, column, finish, first_existing, number, read_csv, seeded_split

SCALE = (0.0, 100.0)
BINS = None
THRESHOLD = 50.0


def read_spaq(root: str | Path, image_root: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0,
              check_images: bool = True) -> LabelSet:
    root = Path(root)
    images = Path(image_root) if image_root else root / "TestImage"
    path = first_existing([root / "meta_info_SPAQDataset.csv", root / "Annotations" / "meta_info_SPAQDataset.csv"],
                          "SPAQ MOS table (export the release's MOS sheet to CSV with columns 'Image name,MOS')")
    header, rows = read_csv(path)
    ki, mi = column(header, "Image name", path), column(header, "MOS", path)
    labels = []
    for n, row in enumerate(rows, 2):
        key = row[ki].strip()
        labels.append(Label(key, str(images / key), seeded_split(key, val_fraction, seed),
                            number(row[mi], f"{path}:{n}"), None))
    return finish("spaq", labels, SCALE, BINS, THRESHOLD, check_images)
