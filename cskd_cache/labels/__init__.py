"""Labelled IAA/IQA datasets as `LabelSet`s: one reader per file, chosen by a DATASET_SPEC.

| spec          | reader     | score scale | bins | good if score >= | split                              |
|---------------|------------|-------------|------|------------------|------------------------------------|
| ``ava:ROOT``  | ava.py     | 1..10       | 10   | 5.0              | official test list; val by hash    |
| ``aadb:ROOT`` | aadb.py    | 0..1        | -    | 0.5              | official train/val/test            |
| ``tad66k:ROOT``| tad66k.py | 1..10       | -    | 5.0              | official train/test; val by hash   |
| ``para:ROOT`` | para.py    | 1..5        | 9    | 3.0              | official train/test; val by hash   |
| ``koniq:ROOT``| koniq.py   | 1..100      | 5    | 50               | official train/val/test            |
| ``spaq:ROOT`` | spaq.py    | 0..100      | -    | 50               | by hash 80/5/15                    |
| ``csv:FILE``, ``jsonl:FILE`` | generic.py | observed or 1..K | K or - | middle | column, else by hash 80/5/15 |

Thresholds other than AVA's 5.0 are conventions (the middle of the scale), not part of those datasets.
AADB and PARA were written from their public documentation, not checked against real files.
See docs/datasets.md for the on-disk formats. Beside the readers: `targets` (train subsets by fraction, the head a
label set asks for, per-image targets and score scaling) and `link` (each label to its feature-cache row, by path
or by content).

May import: `errors`, `files`, `data` (decoding), `cache` (linking to rows). Never: models, train or anything above.
"""

from .labelset import SPLITS, Label, LabelSet
from .spec import READERS, load_labels, parse_spec

__all__ = ["Label", "LabelSet", "READERS", "SPLITS", "load_labels", "parse_spec"]
