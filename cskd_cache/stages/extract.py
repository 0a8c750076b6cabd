"""`extract`: run the teacher once over every image and view, writing a resumable, fingerprinted cache.

Stages, timed apart so a slow one is visible: plan (list + hash sources) -> read (decode + views, in
DataLoader workers) -> forward (teacher) -> write (HDF5 shard). Shards are planned from the sorted item list,
so the same command always assigns the same images to the same shard; that is what lets a killed run resume
from its last complete shard and lets torchrun ranks split the work without talking to each other.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import __version__, dist
from ..cache import view_store
from ..cache.lock import DirLock, remove_dead_temporaries
from ..cache.manifest import (
    DUPLICATES_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SKIPPED_NAME,
    CacheError,
    file_sha256,
    fingerprint,
    read_manifest,
    shard_name,
    sidecar_name,
    write_json,
)
from ..cache.shards import DiskFull, ShardWriter, check_free_space, estimate_shard_bytes
from ..data.extract_views import ExtractViews, collate
from ..data.images import DEFAULT_MAX_PIXELS
from ..data.sources import Item, Plan, plan_sources, sources_to_json
from ..data.view_cuts import jpeg_rows
from ..data.views import ViewPolicy
from ..files import claim_out_dir
from ..train.config import CommandConfig
from .add_views import check_existing_store, check_store_options, run_add_views


@dataclass
class ExtractConfig(CommandConfig):
    teacher: str
    out: str
    images: Sequence[str] = ()
    lists: Sequence[str] = ()
    views: int = 1
    view_scale: tuple[float, float] = (0.25, 1.0)
    view_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0
    tokens: bool = True
    token_grid: int | None = None
    layers: Sequence[int] = ()
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    shard_size: int = 1024
    compression: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    store_views: int | None = None  # also cut every view into a view store of this short side (`add_views`)
    store_quality: int = 90
    # per view, layer and head: the teacher's mean attention distance and entropy (`models.attention_stats`), for
    # `cskd attention --cache` and distill's teacher reference profile; ViT-family teachers only
    attention_stats: bool = False

    command: ClassVar[str] = "extract"
    error: ClassVar[type] = CacheError

    def policy(self) -> ViewPolicy:
        return ViewPolicy(n_views=self.views, scale=tuple(self.view_scale), ratio=tuple(self.view_ratio),
                          flip_p=self.flip_p, seed=self.seed)


@dataclass
class ExtractResult:
    cache: str
    images: int = 0
    rows: int = 0
    skipped: int = 0
    duplicates: int = 0
    views: int = 1
    bytes_on_disk: int = 0
    bytes_per_image: float = 0.0
    seconds: float = 0.0
    images_per_s: float = 0.0
    resumed_shards: int = 0
    timings: dict = field(default_factory=dict)
    fingerprint: str = ""
    store: object = None  # the `add_views.AddViewsResult` of --store-views


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _pool_grid(t: torch.Tensor, grid: int | None) -> torch.Tensor:
    """(B, h, w, C) -> (B, G*G, C), average-pooling the grid when a smaller G is asked for."""
    b, h, w, c = t.shape
    if grid is not None and (grid, grid) != (h, w):
        t = F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2).float(), grid).permute(0, 2, 3, 1)
    return t.reshape(b, -1, c)


def attention_sites(cfg: ExtractConfig, teacher):
    """The teacher as a `models.attention_stats.AttentionModel` for --attention-stats, or a one-line refusal."""
    from ..models.attention_stats import NotAttentionModel, UnsupportedAttention, from_module

    try:
        return from_module(teacher.model, teacher.preprocess, teacher.preprocess_cfg["size"], cfg.teacher)
    except (NotAttentionModel, UnsupportedAttention) as e:
        raise CacheError(f"--attention-stats: {e}; drop --attention-stats for this teacher") from None


def build_manifest(cfg: ExtractConfig, teacher, plan: Plan, attn=None) -> dict:
    """Everything that defines the cache's rows; `fingerprint` hashes the meaning-bearing part."""
    desc = teacher.describe()
    check_token_grid(cfg, teacher)
    native = list(teacher.grid)
    grid = [cfg.token_grid] * 2 if cfg.token_grid else native
    v, d, c = cfg.views, teacher.embed_dim, teacher.token_dim
    arrays: dict[str, dict] = {
        "key": {"shape": [None], "dtype": "str"},
        "source": {"shape": [None], "dtype": "str"},
        "digest": {"shape": [None], "dtype": "str"},
        "size": {"shape": [None, 2], "dtype": "int32"},
        "views": {"shape": [None, v, 5], "dtype": "float32"},
        "embed": {"shape": [None, v, d], "dtype": "float16"},
    }
    if cfg.tokens:
        arrays["tokens"] = {"shape": [None, v, grid[0] * grid[1], c], "dtype": "float16"}
        if teacher.num_prefix_tokens:
            arrays["prefix"] = {"shape": [None, v, teacher.num_prefix_tokens, c], "dtype": "float16"}
    layers = normalise_layers(cfg.layers, teacher.num_blocks)
    for i, (lgrid, lc) in layer_shapes(teacher, layers, cfg.token_grid).items():
        arrays[f"layer_{i}"] = {"shape": [None, v, lgrid[0] * lgrid[1], lc], "dtype": "float16", "grid": lgrid}
    storage = {"tokens": cfg.tokens, "token_grid": grid, "native_grid": native, "layers": layers,
               "token_source": "last block, final norm applied, prefix tokens split off"}
    if attn is not None:
        from ..models.attention_stats import stats_storage

        storage["attention_stats"] = stats_storage(attn)
        for name in ("attn_distance", "attn_entropy"):
            arrays[name] = {"shape": [None, v, len(attn.sites), attn.num_heads], "dtype": "float32"}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"cskd {__version__}",
        "teacher": desc,
        "preprocess": teacher.preprocess_cfg,
        "views": cfg.policy().to_dict(),
        "storage": storage,
        "arrays": arrays,
        "layout": {"shard_size": cfg.shard_size, "compression": cfg.compression},
        "inputs": {"images": len(plan.items), "inputs_sha256": plan.inputs_sha256},
        "sources": sources_to_json(plan.sources),
        "shards": [],
        "rows": 0,
        "skipped": 0,
        "duplicates": len(plan.duplicates),
        "complete": False,
    }
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest


def check_token_grid(cfg: ExtractConfig, teacher) -> None:
    native = list(teacher.grid)
    if cfg.token_grid is not None and (cfg.token_grid > min(native) or cfg.token_grid < 1):
        raise CacheError(f"--token-grid {cfg.token_grid} is invalid for {cfg.teacher}: its native grid is "
                         f"{native[0]}x{native[1]}; pick 1..{min(native)} or omit it")


def normalise_layers(layers: Sequence[int], num_blocks: int) -> list[int]:
    out = []
    for i in layers:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise CacheError(f"--layers {i}: the teacher has blocks 0..{num_blocks - 1} (negatives count from the end)")
        out.append(j)
    return sorted(set(out))


def layer_shapes(teacher, layers: list[int], token_grid: int | None) -> dict[int, tuple[list[int], int]]:
    if not layers:
        return {}
    size = teacher.preprocess_cfg["size"]
    with torch.inference_mode():
        out = teacher(torch.zeros(1, 3, *size, device=next(iter(teacher.parameters())).device), layers=layers)
    shapes = {}
    for i in layers:
        _, h, w, c = out["layers"][i].shape
        g = [min(token_grid, h), min(token_grid, w)] if token_grid else [h, w]
        shapes[i] = (g, c)
    return shapes


def _describe_mismatch(old: dict, new: dict) -> str:
    diffs = []
    for key in ("teacher", "preprocess", "views", "storage", "arrays", "schema_version"):
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(new.get(key), sort_keys=True):
            if key == "teacher":
                a = {k: v for k, v in (old.get(key) or {}).items() if k != "versions"}
                b = {k: v for k, v in (new.get(key) or {}).items() if k != "versions"}
                if a == b:
                    continue
            diffs.append(key)
    return ", ".join(diffs) or "fingerprint"


# A cache folder is recognised by its manifest or a shard; it may also hold what a killed run leaves (lock,
# temporaries, lists), and anything else in a folder without a manifest or shard is someone's own file.
_MARKER = re.compile(r"manifest\.json|shard-\d{5}\.(?:h5|json)")
_OWN_NAMES = re.compile(r"skipped\.jsonl|duplicates\.jsonl|shard-\d{5}\.h5\.tmp|\.cskd\.lock|\.verified\.json|\..+\.tmp")


def shard_attrs(manifest: dict, index: int) -> dict:
    """Stored in each shard file: which cache and which shard it is, checked cheaply every time it is opened."""
    return {"cskd_fingerprint": manifest["fingerprint"], "cskd_inputs_sha256": manifest["inputs"]["inputs_sha256"],
            "cskd_shard_index": index}


def _identity(manifest: dict) -> dict:
    """What every sidecar records of the command that wrote it, so a lost manifest can be rebuilt safely."""
    return {"fingerprint": manifest["fingerprint"], "inputs_sha256": manifest["inputs"]["inputs_sha256"],
            "layout": manifest["layout"]}


def recover_manifest(out: Path, manifest: dict, why: str) -> None:
    """Rebuild manifest.json of a partial cache from its sidecars, when every sidecar (and the shard it
    describes) shows it was written by this very command; else refuse with the reason."""
    ident = _identity(manifest)
    sidecars = sorted(out.glob("shard-[0-9][0-9][0-9][0-9][0-9].json"))
    shards = sorted(out.glob("shard-[0-9][0-9][0-9][0-9][0-9].h5"))
    if not sidecars and not shards:
        return
    fix = "extract into a new --out (or restore manifest.json from a backup)"
    described = set()
    for side in sidecars:
        try:
            rec = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{out / MANIFEST_NAME} is {why} and sidecar {side} is unreadable ({e}); {fix}") from e
        got = {k: rec.get(k) for k in ident}
        if got != ident:
            differ = ", ".join(k for k in ident if got[k] != ident[k])
            raise CacheError(f"{out / MANIFEST_NAME} is {why} and sidecar {side} was not written by this command "
                             f"({differ} differ{'s' if ',' not in differ else ''}); {fix}")
        described.add(rec.get("file"))
        shard = out / rec.get("file", "")
        if shard.is_file() and (shard.stat().st_size != rec.get("bytes") or file_sha256(shard) != rec.get("sha256")):
            raise CacheError(f"{out / MANIFEST_NAME} is {why} and {shard} does not match its sidecar; {fix}")
    orphans = sorted({p.name for p in shards} - described)
    if orphans:
        raise CacheError(f"{out / MANIFEST_NAME} is {why} and {out / orphans[0]} has no sidecar; {fix}")


def check_existing(out: Path, manifest: dict, status: Callable[[str], None] = lambda m: None) -> dict | None:
    """Refuse to mix rows: an existing cache must have the same fingerprint, inputs and layout."""
    mpath = out / MANIFEST_NAME
    if not mpath.exists():
        recover_manifest(out, manifest, "missing")
        if any(out.glob("shard-*.json")):
            status(f"{mpath} was missing: rebuilt from the shard sidecars, which all match this command")
        return None
    try:
        json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recover_manifest(out, manifest, "unreadable")
        status(f"{mpath} was unreadable: rebuilt from the shard sidecars, which all match this command")
        os.replace(mpath, out / f".{MANIFEST_NAME}.{os.getpid()}-unreadable.tmp")
        return None
    old = read_manifest(out)
    if old.get("fingerprint") != manifest["fingerprint"]:
        raise CacheError(
            f"{out}: existing cache was extracted with different settings ({_describe_mismatch(old, manifest)} "
            f"differ: teacher {old.get('teacher', {}).get('spec')!r}); refusing to mix rows. Use a new --out, or "
            "repeat the original options to resume it")
    if old.get("inputs", {}).get("inputs_sha256") != manifest["inputs"]["inputs_sha256"]:
        raise CacheError(
            f"{out}: existing cache was built from other input images ({old['inputs'].get('images')} then, "
            f"{manifest['inputs']['images']} now); refusing to mix rows. Use a new --out for the new image set")
    if old.get("layout") != manifest["layout"]:
        raise CacheError(f"{out}: existing cache used {old.get('layout')}; resume with the same --shard-size and "
                         "--compression, or use a new --out")
    return old


def completed_shards(out: Path, n_shards: int) -> dict[int, dict]:
    """Shards whose file and sidecar both exist with matching size: the unit of resumption."""
    done = {}
    for i in range(n_shards):
        side, shard = out / sidecar_name(i), out / shard_name(i)
        if side.is_file() and shard.is_file():
            try:
                rec = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("bytes") == shard.stat().st_size:
                done[i] = rec
    return done


def refresh_manifest(out: Path, manifest: dict, n_shards: int, plan: Plan | None = None) -> dict:
    done = completed_shards(out, n_shards)
    manifest = dict(manifest)
    manifest["shards"] = [{k: rec[k] for k in ("index", "file", "rows", "bytes", "sha256")}
                          for _, rec in sorted(done.items())]
    manifest["rows"] = sum(r["rows"] for r in manifest["shards"])
    skipped = [s for _, rec in sorted(done.items()) for s in rec.get("skipped", [])]
    if plan is not None:
        skipped = plan.missing + skipped
    manifest["skipped"] = len(skipped)
    manifest["complete"] = len(done) == n_shards
    if manifest["complete"]:
        _write_jsonl(out / SKIPPED_NAME, skipped)
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from ..cache.manifest import atomic_write_text
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def run_extract(cfg: ExtractConfig, *, teacher=None,
                on_progress: Callable[[int, int], None] | None = None,
                on_status: Callable[[str], None] | None = None,
                on_plan_progress: Callable[[int, int], None] | None = None,
                on_store_progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract (or resume extracting) a cache. Under torchrun each rank writes a disjoint set of shards and
    rank 0 finalises the manifest. With ``store_views`` each view is also cut into the view store from the same
    decode (`_StoreShards`); `add_views.run_add_views` then writes the store's manifest and cuts any shard a kill
    left unfinished."""
    if cfg.store_views is not None:
        check_store_options(cfg.store_views, cfg.store_quality)
    result = _extract(cfg, teacher, on_progress, on_status, on_plan_progress)
    if cfg.store_views is not None:
        result.store = run_add_views(result.cache, cfg.store_views, cfg.store_quality, batch_size=cfg.batch_size,
                                     num_workers=cfg.num_workers, max_pixels=cfg.max_pixels,
                                     on_progress=on_store_progress, on_status=on_status)
    return result


def _extract(cfg, teacher, on_progress, on_status, on_plan_progress) -> ExtractResult:
    from ..models.teachers import build_teacher, check_teacher_spec

    status = on_status or (lambda msg: None)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    # Everything that can be refused is checked before the first image is hashed (hours on AVA).
    check_teacher_spec(cfg.teacher)
    if cfg.compression not in (None, "gzip"):
        raise CacheError(f"--compression {cfg.compression!r}: use gzip or none")
    cfg.policy()
    dist.init_if_needed()
    rank, world = dist.rank(), dist.world_size()
    device = resolve_device(cfg.device)
    if rank == 0:
        claim_out_dir(out, _MARKER, "cache", CacheError, own=_OWN_NAMES)
        for arg in cfg.images:
            if not Path(arg).is_dir():
                raise CacheError(f"{arg}: --images needs an existing folder")
        for arg in cfg.lists:
            if not Path(arg).is_file():
                raise CacheError(f"{arg}: --list needs an existing .txt, .csv or .jsonl file")

    # The lock comes before the teacher, so a second run is refused at once, not after loading a ViT-L.
    created = not out.exists()
    lock = DirLock(out, "cskd extract")
    if rank == 0:
        lock.acquire()
    try:
        status(f"loading teacher {cfg.teacher}")
        teacher = teacher or build_teacher(cfg.teacher, device=device)
        normalise_layers(cfg.layers, teacher.num_blocks)
        check_token_grid(cfg, teacher)
        attn = attention_sites(cfg, teacher) if cfg.attention_stats else None
        return _run_locked(cfg, teacher, out, device, rank, world, t_start, status, on_progress, on_plan_progress,
                           attn)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a sidecar or the manifest hit the full disk
            raise DiskFull(f"{out}: disk full ({e}); free space and re-run the same command: complete shards are "
                           "kept") from None
        raise
    finally:
        lock.release()
        if rank == 0 and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no empty folder behind


def _run_locked(cfg, teacher, out, device, rank, world, t_start, status, on_progress, on_plan_progress, attn=None):
    plan = None
    if rank == 0:
        status("listing and hashing input images")
        plan = plan_sources(cfg.images, cfg.lists, progress=on_plan_progress)
    plan = dist.broadcast_object(plan)
    if not plan.items:
        where = ", ".join([*map(str, cfg.images), *map(str, cfg.lists)]) or "(no --images or --list given)"
        raise CacheError(f"no input images found in {where}; pass --images DIR or --list FILE with image files "
                         f"({len(plan.missing)} listed files missing)")

    manifest = build_manifest(cfg, teacher, plan, attn)
    n_shards = math.ceil(len(plan.items) / cfg.shard_size)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_dead_temporaries(out, locked=True)
        if removed:  # leftovers of a killed run; a half-written shard is redone whole
            status(f"removed {len(removed)} temporary file(s) of an interrupted run")
        check_existing(out, manifest, status)
        if not (out / MANIFEST_NAME).exists():  # new, or rebuilt from the sidecars that check_existing vetted
            refresh_manifest(out, manifest, n_shards)
        _write_jsonl(out / DUPLICATES_NAME, plan.duplicates)
    dist.barrier()

    done = completed_shards(out, n_shards)
    mine = [i for i in range(n_shards) if i % world == rank and i not in done]
    total_images = len(plan.items)
    images_done = sum(min(cfg.shard_size, total_images - i * cfg.shard_size) for i in done)
    if on_progress:
        on_progress(images_done, total_images)
    if done:
        status(f"resuming: {len(done)} of {n_shards} shards already complete")

    timings = {"plan_and_load": time.perf_counter() - t_start, "read_wait": 0.0, "forward": 0.0, "write": 0.0}
    t_loop = time.perf_counter()
    if mine:
        _extract_shards(cfg, teacher, plan, manifest, mine, out, device, timings,
                        lambda n: on_progress and on_progress(n, total_images), images_done, attn)
    timings["extract"] = time.perf_counter() - t_loop

    dist.barrier()
    if rank == 0:
        manifest = refresh_manifest(out, manifest, n_shards, plan)
    dist.barrier()
    manifest = read_manifest(out)
    seconds = time.perf_counter() - t_start
    size = sum(s["bytes"] for s in manifest["shards"])
    processed = total_images - sum(min(cfg.shard_size, total_images - i * cfg.shard_size) for i in done)
    return ExtractResult(
        cache=str(out), images=total_images, rows=manifest["rows"], skipped=manifest["skipped"],
        duplicates=manifest["duplicates"], views=cfg.views, bytes_on_disk=size,
        bytes_per_image=size / max(1, manifest["rows"]), seconds=seconds,
        # Throughput of the extraction loop (decode, views, forward, write); listing, hashing and loading the
        # teacher are one-off costs reported in timings["plan_and_load"].
        images_per_s=processed / timings["extract"] if timings["extract"] else 0.0,
        resumed_shards=len(done), timings=timings, fingerprint=manifest["fingerprint"])


def _extract_shards(cfg, teacher, plan, manifest, shards, out, device, timings, progress, images_done, attn=None):
    size = cfg.shard_size
    shard_items: list[tuple[int, list[Item]]] = [(i, plan.items[i * size:(i + 1) * size]) for i in shards]
    flat = [it for _, items in shard_items for it in items]
    # Batches never straddle a shard, so each finished shard can be closed and renamed at once.
    batches, start = [], 0
    for _, items in shard_items:
        for b in range(0, len(items), cfg.batch_size):
            batches.append(list(range(start + b, start + min(b + cfg.batch_size, len(items)))))
        start += len(items)
    store = _StoreShards(cfg, manifest, out) if cfg.store_views is not None else None
    dataset = ExtractViews(flat, teacher.preprocess, teacher.preprocess_cfg, cfg.policy(), cfg.max_pixels,
                           store=(cfg.store_views, cfg.store_quality) if store else None)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.num_workers > 0 else None)
    layers = manifest["storage"]["layers"]
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    owner = np.repeat(np.arange(len(shard_items)), [len(items) for _, items in shard_items])

    cur, cur_index, writer, skipped = -1, -1, None, []
    count = images_done
    it_loader = iter(loader)
    recorder = None
    if attn is not None:
        from ..models.attention_stats import AttentionRecorder

        recorder = AttentionRecorder(attn, per_image=True).__enter__()  # hooks on the teacher's own attention modules
    try:
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it_loader)
            except StopIteration:
                break
            timings["read_wait"] += time.perf_counter() - t0
            s = int(owner[batch[0]["i"]])
            if s != cur:
                if writer is not None:
                    rec = writer.finish(skipped, shard_attrs(manifest, cur_index), _identity(manifest))
                    if store:
                        store.finish(rec)
                    if dist.rank() == 0 and dist.world_size() == 1:
                        refresh_manifest(out, manifest, math.ceil(len(plan.items) / size))
                cur, skipped = s, []
                cur_index = shard_items[s][0]
                check_free_space(out, estimate_shard_bytes(manifest["arrays"], len(shard_items[s][1])), cur_index)
                writer = ShardWriter(out, cur_index, manifest["arrays"], cfg.compression,
                                     planned_rows=len(shard_items[s][1]))
                if store:
                    store.start(cur_index, len(shard_items[s][1]))
            good = [b for b in batch if b["ok"]]
            for b in batch:
                if not b["ok"]:
                    it = flat[b["i"]]
                    skipped.append({"source": it.source, "key": it.key, "path": it.path,
                                    "reason": b["reason"], "detail": b["detail"]})
            if good:
                t1 = time.perf_counter()
                x = torch.cat([b["views"] for b in good]).to(device, non_blocking=True)
                with torch.inference_mode(), amp:
                    feats = teacher(x, layers=layers)
                rows = _rows(feats, good, flat, cfg, layers, manifest)
                if recorder is not None:
                    stats = recorder.take()
                    for k in ("distance", "entropy"):
                        rows[f"attn_{k}"] = stats[k].reshape(len(good), cfg.views, *stats[k].shape[1:])
                timings["forward"] += time.perf_counter() - t1
                t2 = time.perf_counter()
                writer.append(rows)
                if store:
                    store.append(rows, good)
                timings["write"] += time.perf_counter() - t2
            count += len(batch)
            progress(count)
        if writer is not None:
            rec = writer.finish(skipped, shard_attrs(manifest, cur_index), _identity(manifest))
            writer = None
            if store:
                store.finish(rec)
    except BaseException:
        if writer is not None:
            writer.abort()
        if store:
            store.abort()
        raise
    finally:
        if recorder is not None:
            recorder.__exit__(None, None, None)


class _StoreShards:
    """``--store-views`` in the extraction pass: each feature shard's view-store shard, cut from the decode the
    teacher's views came from, finished right after the feature shard (its sidecar names that shard's sha256).
    The store's manifest is written by `add_views.run_add_views` once the cache is complete; a shard this pass did
    not finish (a kill between the two) is simply cut again there."""

    def __init__(self, cfg: ExtractConfig, manifest: dict, out: Path):
        self.m = view_store.store_manifest(cfg.views, cfg.store_views, cfg.store_quality, manifest["fingerprint"],
                                           manifest["inputs"]["inputs_sha256"])
        self.dir = view_store.store_dir(out, cfg.store_views)
        check_existing_store(self.dir, self.m)  # never cut over a store of another quality
        self.dir.mkdir(exist_ok=True)
        self.writer = None

    def start(self, index: int, rows: int) -> None:
        self.writer = ShardWriter(self.dir, index, self.m["arrays"], planned_rows=rows)
        self.index = index

    def append(self, rows: dict, good: list[dict]) -> None:
        self.writer.append({"key": rows["key"], "source": rows["source"], "jpeg": jpeg_rows([b["jpeg"] for b in good]),
                            "shape": np.stack([b["jpeg_shape"] for b in good])})

    def finish(self, feature_record: dict) -> None:
        self.writer.finish([], view_store.shard_attrs(self.m, self.index),
                           {"fingerprint": self.m["fingerprint"], "feature_sha256": feature_record["sha256"]})
        self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _rows(feats: dict, good: list[dict], flat: list[Item], cfg: ExtractConfig, layers: list[int],
          manifest: dict) -> dict:
    n, v = len(good), cfg.views

    def per_view(t: torch.Tensor) -> np.ndarray:
        return t.to(torch.float16).reshape(n, v, *t.shape[1:]).cpu().numpy()

    rows = {
        "key": [flat[b["i"]].key for b in good],
        "source": [flat[b["i"]].source for b in good],
        "digest": [flat[b["i"]].digest for b in good],
        "size": np.stack([b["size"] for b in good]),
        "views": np.stack([b["boxes"] for b in good]).astype(np.float32),
        "embed": per_view(feats["embed"].float()),
    }
    if cfg.tokens:
        rows["tokens"] = per_view(_pool_grid(feats["tokens"], cfg.token_grid))
        if "prefix" in manifest["arrays"]:
            rows["prefix"] = per_view(feats["prefix"])
    for i in layers:
        g = manifest["arrays"][f"layer_{i}"]["grid"]
        t = feats["layers"][i]
        if tuple(t.shape[1:3]) != tuple(g):
            t = F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2).float(), g).permute(0, 2, 3, 1)
        rows[f"layer_{i}"] = per_view(t.reshape(t.shape[0], -1, t.shape[-1]))
    return rows
