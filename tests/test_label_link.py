"""Label -> feature-cache row linking (`cskd_cache.labels.link`): by resolved path, else by file content.

A real cache is extracted from a folder of images; label files point at those images directly, through a
symlink, at byte-identical copies elsewhere, at moved originals (with and without the cache's image-root remap)
and at images the cache never saw.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from _iaa_task import make_images, write_labels

import cskd_cache.labels.link as label_link
from cskd_cache.cache.reader import open_cache
from cskd_cache.labels import load_labels
from cskd_cache.labels.link import link_labels
from cskd_cache.stages.extract import ExtractConfig, run_extract


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("link")
    paths, scores = make_images(d / "imgs", 12)
    run_extract(ExtractConfig(teacher="py:toy_teacher:make", out=str(d / "cache"), images=[str(d / "imgs")],
                              num_workers=0))
    return d, paths, scores


def _row_of_path(cache) -> dict[str, int]:
    return {os.path.realpath(cache.row(i).path): i for i in range(len(cache))}


def test_by_path_and_through_a_symlink(data, tmp_path, monkeypatch):
    d, paths, scores = data
    cache = open_cache(d / "cache")
    want = _row_of_path(cache)
    (tmp_path / "link").symlink_to(d / "imgs", target_is_directory=True)
    linked = [tmp_path / "link" / p.name for p in paths[:6]] + paths[6:]  # half through a symlinked folder
    labels = load_labels(f"csv:{write_labels(tmp_path / 'labels.csv', linked, scores)}")

    hashed = []
    real_digest = label_link.file_digest
    monkeypatch.setattr(label_link, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    r = link_labels(labels, cache)
    assert (r.by_path, r.by_content, r.unlinked) == (12, 0, [])
    assert hashed == []  # nothing linked by path is ever hashed
    assert r.rows.dtype == np.int64
    for lb, row in zip(labels.labels, r.rows):
        assert row == want[os.path.realpath(lb.path)]
    assert sorted(r.rows.tolist()) == list(range(12))


def test_by_content_for_copies_and_moved_images(data, tmp_path, monkeypatch):
    d, paths, scores = data
    cache = open_cache(d / "cache")
    by_path = link_labels(load_labels(f"csv:{write_labels(d / 'orig.csv', paths, scores)}"), cache).rows
    copies = tmp_path / "copies"
    copies.mkdir()
    for p in paths[:5]:
        shutil.copy(p, copies / ("renamed_" + p.name))
    mixed = [copies / ("renamed_" + p.name) for p in paths[:5]] + paths[5:]
    labels = load_labels(f"csv:{write_labels(tmp_path / 'labels.csv', mixed, scores)}")

    hashed = []
    real_digest = label_link.file_digest
    monkeypatch.setattr(label_link, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    r = link_labels(labels, cache)
    assert (r.by_path, r.by_content, r.unlinked) == (7, 5, [])
    assert r.rows.tolist() == by_path.tolist()  # the copy links to the row of its original
    assert sorted(map(str, hashed)) == sorted(str(copies / ("renamed_" + p.name)) for p in paths[:5])

    # The whole image folder moves after extraction: content still links every label; the cache's image-root
    # remap makes them path links again.
    moved = tmp_path / "moved"
    shutil.copytree(d / "imgs", moved)
    labels = load_labels(f"csv:{write_labels(tmp_path / 'moved.csv', [moved / p.name for p in paths], scores)}")
    r = link_labels(labels, cache)
    assert (r.by_path, r.by_content) == (0, 12) and r.rows.tolist() == by_path.tolist()
    r = link_labels(labels, cache, image_root={str(d / "imgs"): str(moved)})
    assert (r.by_path, r.by_content) == (12, 0) and r.rows.tolist() == by_path.tolist()


def test_images_outside_the_cache_are_listed(data, tmp_path):
    d, paths, scores = data
    cache = open_cache(d / "cache")
    others, other_scores = make_images(tmp_path / "others", 4, seed=7)
    labels = load_labels(f"csv:{write_labels(tmp_path / 'labels.csv', paths[:3] + others, np.r_[scores[:3], other_scores])}")
    r = link_labels(labels, cache)
    assert (r.by_path, r.by_content, r.linked) == (3, 0, 3)
    assert r.rows.tolist()[3:] == [-1] * 4
    assert r.unlinked == [lb.path for lb in labels.labels[3:]]
    text = r.summary()
    assert "3 of 7 labels linked" in text and "4 unlinked" in text and str(others[0]) in text and ", ..." in text
