"""DATASET_SPEC: ``NAME:PATH`` picks a reader, e.g. ``ava:/data/AVA`` or ``csv:/data/my_labels.csv``."""

from __future__ import annotations

from pathlib import Path

from ..errors import LabelError, MissingFile
from .aadb import read_aadb
from .ava import read_ava
from .generic import read_csv_labels, read_jsonl_labels
from .koniq import read_koniq
from .labelset import LabelSet
from .para import read_para
from .spaq import read_spaq
from .tad66k import read_tad66k

READERS = {
    "ava": read_ava,
    "aadb": read_aadb,
    "tad66k": read_tad66k,
    "para": read_para,
    "koniq": read_koniq,
    "spaq": read_spaq,
    "csv": read_csv_labels,
    "jsonl": read_jsonl_labels,
}

_FORMS = "ava:ROOT, aadb:ROOT, tad66k:ROOT, para:ROOT, koniq:ROOT, spaq:ROOT, csv:FILE or jsonl:FILE"


def parse_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = str(spec).partition(":")
    name = name.strip().lower()
    if not sep or not path.strip():
        raise LabelError(f"bad dataset spec {spec!r}: write NAME:PATH, one of {_FORMS} "
                         f"(e.g. 'ava:/data/AVA' or 'csv:/data/labels.csv')")
    if name not in READERS:
        raise LabelError(f"bad dataset spec {spec!r}: unknown dataset {name!r}; use one of {_FORMS}")
    return name, Path(path.strip()).expanduser()


def load_labels(spec: str, image_root: str | None = None, val_fraction: float = 0.05, seed: int = 0,
                check_images: bool = True) -> LabelSet:
    """Read a dataset's labels from its spec.

    image_root overrides where the reader looks for images (each reader's default is in its docstring).
    val_fraction and seed draw val from train (and, for sets without any split, test too) by key hash.
    check_images=False skips the disk check, e.g. to study label files without their images; otherwise
    rows without an image go to ``missing``, summarised in one logged line, never raised.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LabelError(f"val_fraction must be in [0, 1), got {val_fraction}")
    name, path = parse_spec(spec)
    if not path.exists():
        what = "file" if name in ("csv", "jsonl") else "dataset root"
        raise MissingFile(f"dataset spec {spec!r}: {what} {path} does not exist")
    return READERS[name](path, image_root=image_root, val_fraction=val_fraction, seed=seed, check_images=check_images)
