"""What the training commands share: spec checks, progress, the summary table of finetune and distill."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._common import console, err_console, fail, failing
from ._config import build_config

ENCODER_SCHEMES = ("timm:", "py:", "run:")


def iaa_config(ctx: typer.Context, cls, config: Path | None, encoder_field: str):
    """`build_config` plus the encoder spec's scheme (a typo fails before any label file is read)."""
    cfg = build_config(ctx, cls, config, encoder_field)
    spec = getattr(cfg, encoder_field)
    if not spec.startswith(ENCODER_SCHEMES):
        fail(f"--{encoder_field} {spec!r}: expected timm:MODEL[@PRETRAINED], py:package.module:factory or "
             "run:RUN_DIR", code=2)
    return cfg


def progress_display():
    rank0 = os.environ.get("RANK", "0") == "0"
    progress = Progress(TextColumn("[bold]{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, disable=not (sys.stdout.isatty() and rank0))
    return progress, rank0


def train_callbacks(progress: Progress, name: str):
    task = progress.add_task(name, total=None, info="loss -")

    def on_progress(p: dict) -> None:
        rate = f", {p['img_s']:,.1f} img/s" if p.get("img_s") else ""
        progress.update(task, completed=p["step"], total=p["total"], info=f"loss {p['loss']:.4f}{rate}")

    return on_progress


def run_training(name: str, run, cfg, teacher_bar: bool = False):
    """Run a training stage under one progress display (a bar for the teacher's predictions too, with
    ``teacher_bar``); its result on rank 0, None on the other ranks, which print nothing."""
    progress, rank0 = progress_display()
    extra = {}
    if teacher_bar:
        task = []

        def on_teacher_progress(done: int, total: int) -> None:
            if not task:
                task.append(progress.add_task("teacher", total=total, info="predictions"))
            progress.update(task[0], completed=done, total=total)
        extra["on_teacher_progress"] = on_teacher_progress
    with failing(), progress:
        result = run(cfg, on_progress=train_callbacks(progress, name), on_status=status_printer(rank0), **extra)
    return result if rank0 else None


def status_printer(rank0: bool):
    return lambda m: rank0 and err_console.print(f"[dim]{m}[/]", highlight=False)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def summary_table(result: dict, title: str) -> Table:
    table = Table(title=title, show_header=False)
    val, init, last = result.get("val") or {}, result.get("initial") or {}, result.get("val_last") or {}
    which = "best val SRCC" if result["keep"] == "best" else "last epoch"
    if val:
        table.add_row(f"val SRCC / PLCC (kept: {which}, epoch {val.get('epoch')})",
                      f"{fmt(val.get('srcc'))} / {fmt(val.get('plcc'))}  (n={val.get('n')})")
        if val.get("acc") is not None:
            table.add_row("val accuracy / MAE", f"{fmt(val.get('acc'))} / {fmt(val.get('mae'))}")
    if last and last.get("epoch") != val.get("epoch"):
        table.add_row("val SRCC, last epoch", fmt(last.get("srcc")))
    if init:
        table.add_row("val SRCC at step 0", fmt(init.get("srcc")))
    if not val:
        table.add_row("validation", "none (fewer than 2 val labels)")
    table.add_row("steps", f"{result['step']:,} in {result['epochs']} epoch(s)")
    table.add_row("train labels", f"{result['train_labels']:,} used of {result['train_labels_total']:,}; "
                                  f"{result['val_labels']:,} val")
    if result.get("broken_images"):
        table.add_row("broken images skipped", f"{result['broken_images']:,} (truncated or empty; see config.yaml)")
    return table


def add_time_and_model(table: Table, result: dict) -> None:
    table.add_row("time", f"{result['seconds']:,.1f} s")
    table.add_row("model", str(Path(result["run_dir"]) / "iaa_model.safetensors") + " (load_iaa_model)")
