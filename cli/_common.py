"""Console helpers shared by the commands: one way to fail, one way to show progress."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _console(stderr: bool) -> Console:
    # Logs are what users keep: piped output must never be cut or wrapped at rich's default 80 columns, so a
    # console that is not a terminal gets no width limit; in a terminal long lines still fold, never truncate.
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if tty else 100_000, soft_wrap=True)


console = _console(stderr=False)
err_console = _console(stderr=True)


def show(table) -> None:
    """Print a rich Table whose cells fold when the terminal is narrow instead of ending in an ellipsis."""
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
    if table.title:  # rich fits a title to the table's width and cuts it; titles carry paths, so print it whole
        console.print(f"[bold]{table.title}[/]", highlight=False, soft_wrap=True)
        table.title = None
    console.print(table, soft_wrap=False)


def one_line(message: str) -> str:
    """The error itself, not DataLoader's wrapping: an exception raised in a worker comes back as "Caught X in
    DataLoader worker process N. Original Traceback ...", whose last line is the original message."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and "." in head and " " not in head else last
    return message


def fail(message: str, code: int = 1) -> None:
    """A one-line error on stderr and a non-zero exit: the contract for every bad input."""
    err_console.print(f"[bold red]error:[/] {one_line(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def failing(code: int | None = None):
    """Turn the library's `CskdError` (a problem with the user's input) into `fail`'s one line and exit code (the
    error's own, or ``code``). Nothing else is caught: any other exception is a bug in cskd and keeps its
    traceback."""
    from cskd_cache.errors import CskdError

    try:
        yield
    except CskdError as e:
        fail(str(e), code=e.exit_code if code is None else code)


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
