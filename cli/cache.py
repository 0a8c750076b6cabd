"""`cskd cache verify|info`: check and summarise a feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, err_console, fail, failing, progress_bar, show
from ._options import CacheImageRootOpt, DefaultsOpt, NoVerifyOpt

app = typer.Typer(help="Inspect and verify feature caches.", no_args_is_help=True)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Cache directory.")],
    checksums: Annotated[bool, typer.Option(help="Recompute each shard's sha256 (slow on huge caches).")] = True,
    config: DefaultsOpt = None,
) -> None:
    """Check every shard against the manifest: counts, shapes, dtypes, checksums, NaN/inf. Non-zero exit on faults."""
    from cskd_cache.cache.verify import verify_cache

    with failing():
        faults = verify_cache(path, checksums=checksums)
    if faults:
        for f in faults:
            err_console.print(f"[red]fault:[/] {f}", highlight=False, soft_wrap=True)
        fail(f"{path}: {len(faults)} fault(s) found")
    console.print(f"[green]ok[/] {path}: every shard matches the manifest")


@app.command()
def info(path: Annotated[Path, typer.Argument(help="Cache directory.")], config: DefaultsOpt = None) -> None:
    """Print a summary table of a cache."""
    from cskd_cache.cache.verify import cache_info

    with failing():
        summary = cache_info(path)
    table = Table(title=f"cache {path}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    show(table)


@app.command("add-views")
def add_views(
    path: Annotated[Path, typer.Argument(help="Cache directory.")],
    size: Annotated[int, typer.Option(min=16, max=4096, help="Short side in pixels of each stored view (a store "
                                                             "covers students up to SIZE px, SIZE/1.12 with "
                                                             "jittered views: 256 covers 224).")],
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = 90,
    cache_image_root: CacheImageRootOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per worker batch.")] = 16,
    num_workers: Annotated[int, typer.Option(min=0, help="Decode worker processes.")] = 2,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this.")] = 89_478_485,
    no_verify: NoVerifyOpt = False,
    config: DefaultsOpt = None,
) -> None:
    """Cut every cached view's pixels from the original images into a view store (CACHE/view-store-SIZE); resumable:
    rerun the same command after an interruption. Training then reads views from the store, not the originals."""
    from cskd_cache import dist
    from cskd_cache.stages.add_views import run_add_views

    with failing(code=1), progress_bar("store", "view") as update:
        r = run_add_views(path, size, quality, cache_image_root=cache_image_root, batch_size=batch_size,
                          num_workers=num_workers, max_pixels=max_pixels, verify=not no_verify, on_progress=update,
                          on_status=lambda m: err_console.print(f"[dim]{m}[/]"))
    if dist.rank() != 0:
        return
    table = Table(title=f"cskd cache add-views -> {r.store}", show_header=False)
    for k, v in [("rows", f"{r.rows:,} x {r.views} views"), ("size", f"{r.size} px short side, JPEG q{r.quality}"),
                 ("bytes", f"{r.bytes:,} ({r.bytes_per_view:,.0f} per view)"),
                 ("throughput", f"{r.views_per_s:,.1f} views/s"), ("time", f"{r.seconds:,.1f} s"),
                 ("resumed shards", str(r.resumed_shards))]:
        table.add_row(k, v)
    show(table)
