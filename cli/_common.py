"""Console helpers shared by the commands: one way to fail, one way to show progress."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    """A one-line error on stderr and a non-zero exit: the contract for every bad input."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class RateColumn(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        from rich.text import Text
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


@contextmanager
def progress_bars(*tasks: tuple[str, str]):
    """One live display with a bar per (description, unit); yields one update(done, total) per bar.

    Disabled automatically when stdout is not a terminal (CI logs, pipes)."""
    progress = Progress(TextColumn("[bold]{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                        TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, disable=not sys.stdout.isatty())

    def updater(description: str, unit: str):
        task = progress.add_task(description, total=None, unit=unit, start=False)
        first = [True]

        def update(done: int, total: int) -> None:
            if first[0]:  # a resumed run starts part-way: reset so the rate counts only this run's work
                progress.start_task(task)
                progress.reset(task, completed=done, total=total)
                first[0] = False
            else:
                progress.update(task, completed=done, total=total)
            if done >= total:
                progress.stop_task(task)  # freeze its clock once finished
        return update

    with progress:
        yield [updater(d, u) for d, u in tasks]


@contextmanager
def progress_bar(description: str, unit: str = "img"):
    with progress_bars((description, unit)) as (update,):
        yield update
