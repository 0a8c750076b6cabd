"""`cskd cache verify|info`: check and summarise a feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, err_console, fail, failing, show
from ._options import DefaultsOpt

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
