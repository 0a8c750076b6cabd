"""`cskd report`: one static HTML page per run (config, loss curves, metrics with intervals, figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import failing, show
from ._options import DefaultsOpt


def report(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="Run folder (the --out of align, finetune, distill, evaluate, ...); outputs up to two "
                                "folders below it are found by name.")],
    out: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="HTML file to write (default: RUN_DIR/report.html). Images are linked by paths relative "
                             "to it.")] = None,
    include: Annotated[Optional[list[Path]], typer.Option(
        metavar="DIR", help="Another folder to search for outputs (evaluate, neighbors, attention) kept outside "
                            "RUN_DIR. Repeatable.")] = None,
    embed: Annotated[bool, typer.Option(help="Inline every image as a base64 data URI: one self-contained file to "
                                             "share.")] = False,
    last: Annotated[int, typer.Option(min=0, help="Evaluation records of metrics.jsonl shown, newest last "
                                                  "(0 = all).")] = 20,
    max_images: Annotated[int, typer.Option(min=0, help="Most images shown per section (neighbour sheets can be "
                                                        "many).")] = 60,
    config: DefaultsOpt = None,
) -> None:
    """Write a static HTML report of a run: config, training curves, metrics with 95% intervals, scatter plot,
    neighbour sheets and attention plots, each where its files exist."""
    from cskd_cache.inspect.report import build_report

    with failing():
        result = build_report(run_dir, out=out, include=include or [], embed=embed, last=last, max_images=max_images)
    table = Table(title=f"cskd report -> {result['out']}", show_header=False)
    kinds: dict[str, int] = {}
    for kind, _ in result["sections"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    table.add_row("sections", ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items()))
    table.add_row("images", f"{result['images']:,}" + (" (embedded)" if embed else ""))
    table.add_row("size", f"{result['bytes'] / 1024:,.1f} KiB")
    for path in result["generated"]:
        table.add_row("drawn", path)
    show(table)
