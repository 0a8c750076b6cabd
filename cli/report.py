"""`cskd report`: one static HTML page per run (the answer first, then curated sections), or several runs side by
side on one comparison page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import failing, show
from ._options import DefaultsOpt


def report(
    run_dir: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", help="Run folder (the --out of align, finetune, distill, evaluate, ...); outputs up to "
                                   "two folders below it are found by name. Two or more training runs: one "
                                   "comparison page of them.")],
    out: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="HTML file to write (default: RUN_DIR/report.html, or compare.html here for several "
                             "runs). Images are linked by paths relative to it.")] = None,
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
    """Write a static HTML report of a run: a summary card (what the run is, its headline metrics with intervals,
    time, lineage), then config, training curves, metrics, scatter plot, neighbour sheets and attention plots, each
    where its files exist. With several runs: one comparison page (metrics, differing settings, curves overlaid,
    paired SRCC differences)."""
    from cskd_cache.inspect.report import build_report

    if len(run_dir) > 1:
        _compare(run_dir, out or Path("compare.html"))
        return
    with failing():
        result = build_report(run_dir[0], out=out, include=include or [], embed=embed, last=last,
                              max_images=max_images)
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


def _compare(run_dirs: list[Path], out: Path) -> None:
    from cskd_cache.inspect.compare import build_compare

    with failing():
        result = build_compare(run_dirs, out)
    table = Table(title=f"cskd report (comparison) -> {result['out']}", show_header=False)
    table.add_row("runs", str(len(result["runs"])))
    table.add_row("settings that differ", ", ".join(result["differences"]) or "none")
    for name, p in result["paired"].items():
        table.add_row(f"SRCC {name} - first", f"{p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] (n={p['n']})")
    table.add_row("figures", ", ".join(result["figures"]) or "none")
    show(table)
