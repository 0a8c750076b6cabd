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
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        from rich.text import Text
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, unit: str = "img"):
    """Yields update(done, total). Disabled automatically when stdout is not a terminal (CI logs)."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TaskProgressColumn(), RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, disable=not sys.stdout.isatty())
    task = progress.add_task(description, total=None)

    first = [True]

    def update(done: int, total: int) -> None:
        if first[0]:  # a resumed run starts part-way: reset so the rate counts only this run's work
            progress.reset(task, completed=done, total=total)
            first[0] = False
        else:
            progress.update(task, completed=done, total=total)

    with progress:
        yield update
