"""Teacher predictions caches: a teacher's outputs on exactly the views a feature cache recorded, computed once.

`cskd distill` needs the teacher's prediction for every (cache row, view) it shows the student. A fine-tuned
teacher (``run:TEACHER_RUN``) is an image model, so those predictions cost a full pass over the images; they
are written once, as a cache with the same contract as the feature cache, and reused by every later run whose
teacher and feature cache are the same. The ``cache-head`` teacher gets the same file (cheap to make, but then
every teacher is read the same way).

PRED_DIR/manifest.json   {"format": "cskd-predictions", "version": 1, "created_by", "teacher": {kind, spec, path,
                          weights_sha256, meta_sha256, head: {kind, bins}, scale}, "feature_cache": {path,
                          fingerprint, rows, views, rows_sha256}, "arrays": {name: {shape, dtype}}, "shards": [...],
                          "rows", "complete": true, "fingerprint"}
PRED_DIR/shard-SSSSS.h5  one per feature-cache shard, row-aligned with it: ``key``, ``source`` (copied, so the
                          alignment can be checked) and ``logits`` (N, V, K) float32 for a distribution head or
                          ``score`` (N, V) float32 (0..1 over the dataset's scale) for a scalar head
PRED_DIR/shard-SSSSS.json its sidecar (rows, bytes, sha256), as in the feature cache

``fingerprint`` = sha256 of the canonical JSON of the format and version, the teacher's ``kind``,
``weights_sha256`` (of iaa_model.safetensors / cache_head.safetensors) and ``meta_sha256`` (of its json), the
feature cache's fingerprint, its row count, view count and ``rows_sha256`` (sha256 over the ordered
``source \\0 key`` list: the feature-cache fingerprint alone does not say which rows exist). Paths are recorded
but not fingerprinted, so moving a run or a cache keeps its predictions valid.

A directory whose fingerprint differs (the teacher was retrained, the cache re-extracted) is stale: it is
recomputed (``stale="recompute"``, the default) or refused (``stale="error"``). Predictions are written to a
temporary directory and renamed into place when complete, so a crash never leaves a half-written cache under
the final name. Under torchrun every rank computes the shards ``s % world == rank`` with its own copy of the
teacher, and rank 0 writes the manifest and renames the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__, dist
from ..cache.lock import DirLock, remove_dead_temporaries
from ..cache.manifest import MANIFEST_NAME, CacheError, canonical_json, file_sha256, sidecar_name, write_json
from ..cache.reader import FeatureCache
from ..cache.shards import ShardWriter
from ..data.images import DEFAULT_MAX_PIXELS, RowImages
from ..data.views import draft_target, render
from ..errors import ConfigError
from ..files import read_json

__all__ = ["FORMAT", "Predictions", "PredictionsError", "StalePredictions", "ensure_predictions",
           "read_predictions", "predictions_fingerprint", "rows_sha256", "describe_teacher", "run_teacher_compute",
           "default_predictions_dir"]

FORMAT = "cskd-predictions"
VERSION = 1


class PredictionsError(CacheError):
    """A predictions cache cannot be read or does not belong to this teacher and feature cache."""


class StalePredictions(PredictionsError):
    """The directory holds predictions of another teacher or feature cache (and recomputing was not allowed)."""


def rows_sha256(cache: FeatureCache) -> str:
    return cache.rows_sha256


def describe_teacher(kind: str, spec: str, dir: str | os.PathLike, meta_name: str, weights_name: str) -> dict:
    """What identifies a teacher on disk: its weights' and metadata's sha256, head kind/bins and score scale."""
    dir = Path(dir)
    meta = json.loads((dir / meta_name).read_text(encoding="utf-8"))
    head = meta.get("head") or {"kind": meta.get("kind"), "bins": meta.get("bins")}
    return {"kind": kind, "spec": spec, "path": str(dir.resolve()),
            "weights_sha256": file_sha256(dir / weights_name),
            "meta_sha256": hashlib.sha256(canonical_json(meta).encode()).hexdigest(),
            "head": {"kind": head["kind"], "bins": head.get("bins")},
            "scale": list(meta["labels"]["scale"])}


def _payload(teacher: dict, cache: FeatureCache) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "teacher": {k: teacher.get(k) for k in ("kind", "weights_sha256", "meta_sha256")},
            "feature_cache": cache.manifest.get("fingerprint"), "rows": len(cache), "views": cache.n_views,
            "rows_sha256": rows_sha256(cache)}


def predictions_fingerprint(teacher: dict, cache: FeatureCache) -> str:
    return hashlib.sha256(canonical_json(_payload(teacher, cache)).encode()).hexdigest()


def default_predictions_dir(teacher_dir: str | os.PathLike, cache: FeatureCache) -> Path:
    """TEACHER_DIR/predictions/<16 hex>: one directory per cache the teacher labelled.

    The name hashes the cache's fingerprint *and* its rows (`rows_sha256`): the fingerprint alone describes how
    rows were made (teacher, views, storage), so two caches extracted the same way from different images would
    share a directory and each use would recompute over the other's predictions."""
    ident = f"{cache.manifest.get('fingerprint', 'unknown')}:{rows_sha256(cache)}"
    return Path(teacher_dir) / "predictions" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def _array_specs(teacher: dict, views: int) -> dict:
    if teacher["head"]["kind"] == "distribution":
        return {"logits": {"shape": [None, views, int(teacher["head"]["bins"])], "dtype": "float32"}}
    return {"score": {"shape": [None, views], "dtype": "float32"}}


@dataclass
class Predictions:
    """A complete predictions cache, its arrays in RAM: ``arrays[name]`` is (N, V, K) or (N, V) float32."""

    path: Path
    manifest: dict
    arrays: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return self.manifest["teacher"]["head"]["kind"]

    @property
    def bins(self) -> int | None:
        return self.manifest["teacher"]["head"].get("bins")

    @property
    def scale(self) -> tuple[float, float]:
        lo, hi = self.manifest["teacher"]["scale"]
        return float(lo), float(hi)


def read_predictions(path: str | os.PathLike, cache: FeatureCache | None = None,
                     fingerprint: str | None = None) -> Predictions:
    """Open a complete predictions cache; with ``cache``, check it is row-aligned with that feature cache."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    m = read_json(mpath, PredictionsError, f"not a predictions cache, or a damaged one: delete {path} to have it "
                                           "recomputed")
    if m.get("format") != FORMAT or m.get("version") != VERSION or not m.get("complete"):
        raise PredictionsError(f"{mpath}: not a complete {FORMAT} v{VERSION} cache; delete {path} to recompute it")
    if fingerprint is not None and m.get("fingerprint") != fingerprint:
        raise StalePredictions(f"{path}: fingerprint {m.get('fingerprint', '')[:12]} is not the expected "
                               f"{fingerprint[:12]}")
    names = [n for n in m["arrays"] if n not in ("key", "source")]
    parts: dict[str, list] = {n: [] for n in names}
    keys, sources = [], []
    for s in m["shards"]:
        f = path / s["file"]
        if not f.is_file() or f.stat().st_size != s["bytes"]:
            raise PredictionsError(f"{f}: missing or truncated shard; delete {path} to have it recomputed")
        with h5py.File(f, "r") as h:
            for n in names:
                parts[n].append(h[n][:])
            keys += [k.decode() if isinstance(k, bytes) else k for k in h["key"][:]]
            sources += [k.decode() if isinstance(k, bytes) else k for k in h["source"][:]]
    arrays = {n: np.concatenate(p).astype(np.float32) if p else np.zeros((0, *m["arrays"][n]["shape"][1:]),
                                                                         np.float32) for n, p in parts.items()}
    if cache is not None and (keys != cache.keys or sources != cache.sources):
        raise PredictionsError(f"{path}: its rows are not the rows of feature cache {cache.path}; delete it to "
                               "have it recomputed")
    return Predictions(path, m, arrays)


def _describe_mismatch(old: dict, new_payload: dict, cache: FeatureCache) -> str:
    if old.get("format") != FORMAT or not old.get("complete"):
        return "incomplete or not a predictions cache"
    reasons = []
    ot = old.get("teacher", {})
    if ot.get("weights_sha256") != new_payload["teacher"]["weights_sha256"] or \
            ot.get("meta_sha256") != new_payload["teacher"]["meta_sha256"]:
        reasons.append("the teacher's weights or metadata changed")
    of = old.get("feature_cache", {})
    if of.get("fingerprint") != new_payload["feature_cache"] or of.get("rows_sha256") != new_payload["rows_sha256"]:
        reasons.append(f"made for another feature cache than {cache.path}")
    return "; ".join(reasons) or "fingerprint differs"


def ensure_predictions(path: str | os.PathLike, cache: FeatureCache, teacher: dict,
                       make_compute: Callable[[], Callable[[int, int], np.ndarray]], stale: str = "recompute",
                       on_status: Callable[[str], None] | None = None,
                       on_progress: Callable[[int, int], None] | None = None,
                       chunk_rows: int = 1024) -> tuple[Predictions, bool]:
    """Reuse PATH when its fingerprint matches, else compute it; returns (predictions, computed_now).

    Call it on every rank under torchrun (collective: all ranks decide alike from the same manifest, then split
    the shards). ``make_compute()`` is called only when predictions must be computed (so the teacher model is
    loaded only then) and returns ``compute(start, stop) -> array`` for cache rows [start, stop): (n, V, K) logits or (n, V)
    scores, the head's raw output.
    """
    if stale not in ("recompute", "error"):
        raise ConfigError(f"stale must be 'recompute' or 'error', got {stale!r}")
    path = Path(path)
    lock = DirLock(path.parent, f"teacher predictions {path.name}", name=f".{path.name}.lock")
    if dist.rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        if dist.rank() == 0:
            remove_dead_temporaries(path.parent)
        return _ensure_locked(path, cache, teacher, make_compute, stale, on_status, on_progress, chunk_rows)
    finally:
        lock.release()


# Everything a predictions cache directory may hold; anything else there is someone's own file.
_OWN_NAMES = re.compile(r"^(?:manifest\.json|shard-\d{5}\.(?:h5|json)|\.cskd\.lock)$")


def _own_manifest(path: Path) -> dict | None:
    """The manifest of the predictions cache at ``path``; None when ``path`` is absent or empty. Anything else (a
    file, a feature cache, a folder of someone's files) is refused: recomputing replaces the whole directory, so
    only a directory that is provably cskd's own predictions cache may be replaced."""
    if path.exists() and not path.is_dir():
        raise PredictionsError(f"{path} is a file, not a predictions cache directory; choose another --predictions")
    if not path.is_dir() or not any(path.iterdir()):
        return None
    try:
        old = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        if isinstance(old, dict) and "arrays" in old:
            what = "a feature cache"
        elif (path / MANIFEST_NAME).is_file():
            what = "a folder whose manifest.json is unreadable or of another kind"
        else:
            what = "a folder of other files"
        raise PredictionsError(f"{path} is {what}, not a cskd predictions cache; refusing to replace it. Choose "
                               "another --predictions directory")
    return old


def _refuse_foreign_files(path: Path) -> None:
    foreign = sorted(p.name for p in path.iterdir() if not _OWN_NAMES.match(p.name))
    if foreign:
        raise PredictionsError(f"{path}: predictions cache that also holds files cskd did not write "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); refusing to "
                               "replace it. Move those files out or choose another --predictions directory")


def check_predictions_dir(path: str | os.PathLike) -> None:
    """Refuse, before any work, a --predictions directory that cskd could not recompute without deleting
    something it did not write: it must be absent, empty, or a predictions cache holding nothing else."""
    if _own_manifest(Path(path)) is not None:
        _refuse_foreign_files(Path(path))


def _ensure_locked(path: Path, cache: FeatureCache, teacher: dict, make_compute, stale: str, on_status,
                   on_progress, chunk_rows: int) -> tuple[Predictions, bool]:
    status = on_status or (lambda m: None)
    fp = predictions_fingerprint(teacher, cache)
    old = _own_manifest(path)
    if old is not None:
        if old.get("complete") and old.get("fingerprint") == fp:
            status(f"reusing teacher predictions {path}")
            return read_predictions(path, cache, fp), False
        _refuse_foreign_files(path)
        reason = _describe_mismatch(old, _payload(teacher, cache), cache)
        if stale == "error":
            raise StalePredictions(f"{path}: stale teacher predictions ({reason}); delete the directory or allow "
                                   "recomputing (--stale-predictions recompute)")
        status(f"{path}: stale teacher predictions ({reason}); recomputing")

    compute = make_compute()
    specs = _array_specs(teacher, cache.n_views)
    (name,) = specs
    arrays = {"key": {"shape": [None], "dtype": "str"}, "source": {"shape": [None], "dtype": "str"}, **specs}
    rank, world = dist.rank(), dist.world_size()
    # One temporary directory per job (rank 0 names it for all ranks), so two jobs labelling the same cache at
    # once never write into each other's shards; the last complete one to be renamed wins.
    tmp = path.parent / dist.broadcast_object(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    if rank == 0:
        tmp.mkdir()
    dist.barrier()
    mine = [s for s in range(len(cache.shards)) if s % world == rank]
    total = sum(int(cache.offsets[s + 1] - cache.offsets[s]) for s in mine)
    done = 0
    try:
        for s in mine:  # under torchrun each rank writes its own shards, with their sidecars
            lo, hi = int(cache.offsets[s]), int(cache.offsets[s + 1])
            w = ShardWriter(tmp, s, arrays, planned_rows=max(1, hi - lo))
            try:
                for a in range(lo, hi, chunk_rows):
                    b = min(hi, a + chunk_rows)
                    out = np.asarray(compute(a, b), np.float32)
                    want = (b - a, *specs[name]["shape"][1:])
                    if out.shape != tuple(want):
                        raise PredictionsError(f"teacher gave {out.shape} for rows {a}..{b}, expected {want}")
                    if not np.isfinite(out).all():
                        raise PredictionsError(f"teacher gave non-finite predictions for cache rows {a}..{b}")
                    w.append({"key": cache.keys[a:b], "source": cache.sources[a:b], name: out})
                    done += b - a
                    if on_progress:
                        on_progress(done, total)
                w.finish([])
            except BaseException:
                w.abort()
                raise
        dist.barrier()
        if rank == 0:
            shards = [json.loads((tmp / sidecar_name(s)).read_text(encoding="utf-8"))
                      for s in range(len(cache.shards))]
            manifest = {"format": FORMAT, "version": VERSION, "created_by": f"cskd {__version__}",
                        "teacher": teacher,
                        "feature_cache": {"path": str(Path(cache.path).resolve()),
                                          "fingerprint": cache.manifest.get("fingerprint"), "rows": len(cache),
                                          "views": cache.n_views, "rows_sha256": rows_sha256(cache)},
                        "arrays": arrays, "shards": [{k: r[k] for k in ("index", "file", "rows", "bytes", "sha256")}
                                                     for r in shards],
                        "rows": len(cache), "complete": True, "fingerprint": fp}
            write_json(tmp / MANIFEST_NAME, manifest)
            old_dir = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            if path.exists():
                os.replace(path, old_dir)
            os.replace(tmp, path)
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    status(f"wrote teacher predictions for {len(cache)} rows x {cache.n_views} views to {path}")
    return read_predictions(path, cache, fp), True


class _RowViews(Dataset):
    """All V cached views of one cache row at the teacher's input size: (V, 3, H, W)."""

    def __init__(self, paths: list[str], boxes: np.ndarray, input_cfg: dict, images: RowImages, first_row: int,
                 store=None, draft: bool = True):
        self.paths, self.boxes, self.cfg, self.images, self.first_row = paths, boxes, input_cfg, images, first_row
        self.store, self.draft = store, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        c, row = self.cfg, self.first_row + i
        if self.store is not None:  # each stored view is exactly its box: render all of it, with the view's flip
            return torch.stack([render(self.store.image(row, v), [0.0, 0.0, 1.0, 1.0, b[4]], c)
                                for v, b in enumerate(self.boxes[i])])
        draft = draft_target(c, self.boxes[i]) if self.draft else None
        img = self.images.load(self.paths[i], row, draft=draft)
        return torch.stack([render(img, b, c) for b in self.boxes[i]])


def run_teacher_compute(scorer, cache: FeatureCache, paths: list[str], device: torch.device, batch_size: int = 32,
                        num_workers: int = 2, amp: bool = True,
                        max_pixels: int = DEFAULT_MAX_PIXELS, store=None,
                        draft: bool = True) -> Callable[[int, int], np.ndarray]:
    """compute(start, stop) for a loaded `IAAScorer`: its head output on every cached view of those rows,
    each view rebuilt at the teacher's own input size from the image (JPEG draft decoding with ``draft``) or from
    ``store``, a view store that covers that size."""
    from ..train.engine import autocast_for

    model = scorer.model.to(device).eval()
    autocast, _ = autocast_for(device, amp)
    images = RowImages(cache.digests, max_pixels)

    @torch.inference_mode()
    def compute(start: int, stop: int) -> np.ndarray:
        ds = _RowViews(paths[start:stop], cache.boxes[start:stop], scorer.input_cfg, images, start, store, draft)
        loader = DataLoader(ds, batch_size=max(1, batch_size // max(1, cache.n_views)), num_workers=num_workers)
        outs = []
        for x in loader:
            b, v = x.shape[:2]
            with autocast:
                out = model(x.flatten(0, 1).to(device))
            outs.append(out.float().reshape(b, v, *out.shape[1:]).cpu().numpy())
        return np.concatenate(outs)

    return compute
