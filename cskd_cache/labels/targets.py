"""What a label set becomes in training: the train subset, the head it asks for and the targets per image.

- `keep_fraction`: a seeded, key-hashed fraction of the train labels (stable per key and nested: the 10 %
  subset lies inside the 20 % subset of the same seed), so label-fraction sweeps compare like with like;
- `split_labels`: (all labels, train labels after the fraction, val labels), unreadable images dropped after the
  fraction is drawn, so a broken download never shifts which labels it keeps;
- `resolve_head`: a distribution head (K bins) where the labels carry vote histograms, else a scalar head;
- `label_targets`: ``unit`` (the score on 0..1 over the dataset's scale, `to_unit`) and ``dist`` (K bins).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CskdError, LabelError
from .labelset import LabelSet, hash_unit
from .spec import load_labels

__all__ = ["to_unit", "from_unit", "keep_fraction", "split_labels", "resolve_head", "head_fits", "head_text",
           "label_targets", "labels_meta"]


def to_unit(score, scale):
    """Native score -> 0..1 over the dataset's scale (the scalar head's target)."""
    lo, hi = scale
    return (score - lo) / (hi - lo)


def from_unit(u, scale):
    lo, hi = scale
    return lo + u * (hi - lo)


def keep_fraction(labels: LabelSet, fraction: float, seed: int) -> LabelSet:
    """Keep the labels whose key hashes below ``fraction`` (module docstring)."""
    if fraction >= 1:
        return labels
    return dataclasses.replace(labels, labels=[lb for lb in labels.labels
                                               if hash_unit(lb.key, 7919 + seed) < fraction])


def split_labels(spec: str, *, image_root: str | None, val_fraction: float, split_seed: int, label_fraction: float,
                 label_seed: int, error: type[CskdError] = LabelError) -> tuple[LabelSet, LabelSet, LabelSet]:
    """(all labels, train labels after ``label_fraction``, val labels) of a dataset spec."""
    try:
        labels = load_labels(spec, image_root=image_root, val_fraction=val_fraction, seed=split_seed)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise error(str(e)) from e
    train = keep_fraction(labels.split("train"), label_fraction, label_seed).drop_unreadable()
    if not train.labels:
        raise error(f"{spec}: no train labels left ({labels.summary()}, --label-fraction {label_fraction}); "
                    "check the split column or raise --label-fraction")
    return labels, train, labels.split("val").drop_unreadable()


def resolve_head(head: str, labels: LabelSet, error: type[CskdError] = LabelError) -> tuple[str, int | None]:
    """(kind, bins) for ``head`` = auto, distribution or scalar."""
    if head == "distribution" or (head == "auto" and labels.bins):
        if not labels.bins:
            raise error(f"{labels.name} has scores but no vote distributions: use --head scalar (or auto)")
        return "distribution", int(labels.bins)
    return "scalar", None


def head_fits(head: dict, kind: str, bins: int | None) -> bool:
    """Whether a saved head (``{"kind", "bins"}`` of a run's json) is the head `resolve_head` chose."""
    return head.get("kind") == kind and (kind != "distribution" or int(head.get("bins") or 0) == bins)


def head_text(kind: str, bins: int | None) -> str:
    """How messages name a head: "distribution head of 10 bins", "scalar head"."""
    return f"{kind} head{' of ' + str(bins) + ' bins' if bins else ''}"


def label_targets(labels: LabelSet, kind: str) -> dict[str, np.ndarray]:
    out = {"unit": np.asarray(to_unit(labels.scores(), labels.scale), np.float32)}
    if kind == "distribution":
        out["dist"] = labels.dists().astype(np.float32)
    return out


def labels_meta(labels: LabelSet) -> dict:
    return {"name": labels.name, "scale": list(labels.scale), "bins": labels.bins, "threshold": labels.threshold}
