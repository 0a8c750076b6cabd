"""Link labelled images to feature-cache rows, so training can reuse cached views and keep val/test images out.

A label links to the cache row whose image is the same file: first by resolved absolute path (the row's image
path after the optional image_root remap, as `cache.paths.resolve_paths` gives it, symlinks resolved), then, for
labels still unlinked, by file content (sha256 of the label's image file == the row's stored ``digest``; this
catches images that were copied, renamed or moved after extraction). Digests are computed only for labels not
linked by path, because hashing a whole dataset is the slow part. Extraction stores byte-identical files once,
so a digest names one row; should two rows ever share a path or digest, the first wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..cache.paths import resolve_paths
from ..cache.reader import FeatureCache
from ..data.images import file_digest
from .labelset import LabelSet


@dataclass
class LinkResult:
    rows: np.ndarray  # int64, one cache row per labels.labels item, -1 where unlinked
    unlinked: list[str] = field(default_factory=list)  # label image paths with no cache row
    by_path: int = 0
    by_content: int = 0

    @property
    def linked(self) -> int:
        return self.by_path + self.by_content

    def summary(self, show: int = 3) -> str:
        s = f"{self.linked} of {len(self.rows)} labels linked to cache rows ({self.by_path} by path, " \
            f"{self.by_content} by content)"
        if self.unlinked:
            first = ", ".join(self.unlinked[:show]) + (", ..." if len(self.unlinked) > show else "")
            s += f"; {len(self.unlinked)} unlinked (first: {first})"
        return s


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def link_labels(labels: LabelSet, cache: FeatureCache, image_root: dict | None = None) -> LinkResult:
    by_path_index: dict[str, int] = {}
    by_digest: dict[str, int] = {}
    for i, path in enumerate(resolve_paths(cache, image_root)):  # the paths training reads the rows from
        by_path_index.setdefault(_real(path), i)
        by_digest.setdefault(cache.digests[i], i)
    rows = np.full(len(labels.labels), -1, dtype=np.int64)
    n_path = n_content = 0
    for j, lb in enumerate(labels.labels):
        r = by_path_index.get(_real(lb.path))
        if r is not None:
            rows[j], n_path = r, n_path + 1
    for j, lb in enumerate(labels.labels):
        if rows[j] >= 0:
            continue
        try:
            r = by_digest.get(file_digest(lb.path))
        except OSError:  # unreadable label image: it stays unlinked and is listed
            r = None
        if r is not None:
            rows[j], n_content = r, n_content + 1
    unlinked = [lb.path for j, lb in enumerate(labels.labels) if rows[j] < 0]
    return LinkResult(rows, unlinked, n_path, n_content)
