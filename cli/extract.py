"""`cskd extract`: run a teacher once over image folders/lists and write the feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import err_console, fail, failing, progress_bars, show
from ._options import DefaultsOpt


def _pair(text: str, name: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} takes two comma-separated numbers, e.g. 0.25,1.0") from None
    return a, b


def _layers(text: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("--layers takes comma-separated block indices, e.g. 6,9 or -4") from None


def extract(
    teacher: Annotated[str, typer.Option(help="Teacher SPEC: open_clip:MODEL@TAG|PATH|none, timm:MODEL@TAG|PATH|none, "
                                               "or py:package.module:factory.")],
    out: Annotated[Path, typer.Option(help="Cache directory to create, or to resume with the same options.")],
    images: Annotated[Optional[list[Path]], typer.Option(help="Image folder, scanned recursively. Repeatable.")] = None,
    list_: Annotated[Optional[list[Path]], typer.Option("--list", help="Text/CSV/JSONL file of image paths "
                                                        "(relative to the file's folder). Repeatable.")] = None,
    views: Annotated[int, typer.Option(min=1, help="Views per image: 1 = the eval view; V>1 adds V-1 seeded "
                                                   "random-resized-crop+flip views.")] = 1,
    view_scale: Annotated[str, typer.Option(help="Area range of random views, as a fraction of the image.")] = "0.25,1.0",
    view_ratio: Annotated[str, typer.Option(help="Aspect-ratio range of random views.")] = "0.75,1.3333333",
    seed: Annotated[int, typer.Option(help="Seed of the random views (per image key, so reruns reproduce them).")] = 0,
    tokens: Annotated[bool, typer.Option(help="Store patch tokens (needed by token losses).")] = True,
    token_grid: Annotated[Optional[int], typer.Option(min=1, help="Average-pool the token grid to GxG "
                                                                  "(default: native grid).")] = None,
    layers: Annotated[str, typer.Option(help="Also store these intermediate blocks, e.g. 6,9 (negatives count "
                                             "from the end).")] = "",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward batch (each brings V views).")] = 32,
    num_workers: Annotated[int, typer.Option(min=0, help="Decode worker processes (overlap decode and forward).")] = 2,
    device: Annotated[str, typer.Option(help="auto (CUDA with AMP when present), cpu, cuda, cuda:N.")] = "auto",
    shard_size: Annotated[int, typer.Option(min=1, help="Images per HDF5 shard (the unit of resumption).")] = 1024,
    compression: Annotated[Optional[str], typer.Option(help="HDF5 compression of token arrays: gzip, or none "
                                                            "(default; fp16 features barely compress).")] = None,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")]
    = 89_478_485,
    store_views: Annotated[Optional[int], typer.Option(min=16, max=4096, help="Also store every view's pixels, short "
                                                       "side SIZE px, JPEG (a view store: training then never "
                                                       "decodes the originals; 256 covers 224 px students).")] = None,
    store_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality of --store-views.")] = 90,
    attention_stats: Annotated[bool, typer.Option(help="Also store, per view, layer and head, the teacher's mean "
                                                       "attention distance and entropy (ViT teachers; a few KB per "
                                                       "image), read by `cskd attention --cache` and by `cskd distill "
                                                       "--attn-reference teacher`.")] = False,
    config: DefaultsOpt = None,
) -> None:
    """Run a teacher once over images and store its embeddings and patch tokens in an HDF5 cache."""
    from cskd_cache import dist
    from cskd_cache.stages.extract import ExtractConfig, run_extract

    if compression not in (None, "none", "gzip"):
        raise typer.BadParameter("--compression takes gzip or none")
    cfg = ExtractConfig(
        teacher=teacher, out=str(out), images=[str(p) for p in images or []], lists=[str(p) for p in list_ or []],
        views=views, view_scale=_pair(view_scale, "--view-scale"), view_ratio=_pair(view_ratio, "--view-ratio"),
        seed=seed, tokens=tokens, token_grid=token_grid, layers=_layers(layers), batch_size=batch_size,
        num_workers=num_workers, device=device, shard_size=shard_size,
        compression=None if compression in (None, "none") else compression, max_pixels=max_pixels,
        store_views=store_views, store_quality=store_quality, attention_stats=attention_stats)
    if not cfg.images and not cfg.lists:
        fail("no input images: pass --images DIR and/or --list FILE", code=2)
    with failing():
        cfg.policy()
    bars = [("hash", "file"), ("extract", "img")] + ([("store", "view")] if store_views else [])
    with failing(code=1), progress_bars(*bars) as (hashed, update, *stored):
        result = run_extract(cfg, on_progress=update, on_plan_progress=hashed,
                             on_status=lambda m: err_console.print(f"[dim]{m}[/]"),
                             on_store_progress=stored[0] if stored else None)
    if dist.rank() != 0:
        return
    table = Table(title=f"cskd extract -> {result.cache}", show_header=False)
    for k, v in [
        ("images", f"{result.images:,}"), ("rows written", f"{result.rows:,}"),
        ("skipped", f"{result.skipped:,}" + (f" (see {Path(result.cache) / 'skipped.jsonl'})" if result.skipped else "")),
        ("duplicates", f"{result.duplicates:,}" + (" (see duplicates.jsonl)" if result.duplicates else "")),
        ("views per image", str(result.views)),
        ("bytes on disk", f"{result.bytes_on_disk:,}"), ("bytes per image", f"{result.bytes_per_image:,.0f}"),
        ("throughput", f"{result.images_per_s:,.1f} images/s"),
        ("time", f"{result.seconds:,.1f} s: plan+load {result.timings.get('plan_and_load', 0):.1f}, extract "
                 f"{result.timings.get('extract', 0):.1f} (read wait {result.timings.get('read_wait', 0):.1f}, "
                 f"forward {result.timings.get('forward', 0):.1f}, write {result.timings.get('write', 0):.1f})"),
        ("resumed shards", str(result.resumed_shards)), ("fingerprint", result.fingerprint[:16]),
        *([("view store", f"{result.store.store}: {result.store.bytes_per_view:,.0f} bytes per view")]
          if result.store else []),
    ]:
        table.add_row(k, v)
    show(table)
