"""What `cskd finetune` and `cskd distill` share as commands: config merging, spec checks, progress, summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._common import console, err_console, fail

ENCODER_SCHEMES = ("timm:", "py:", "run:")


def explicit(ctx: typer.Context, name: str) -> bool:
    """Given on the command line (or environment), not a default: only those override --config.
    Compared by name because typer may hand back its own vendored click's ParameterSource enum."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def build_config(ctx: typer.Context, cls, config: Path | None, encoder_field: str):
    """Defaults <- --config <- explicit flags; usage errors (bad options, malformed specs) exit 2."""
    from cskd_cache.labels import parse_spec
    from cskd_cache.models.trust import check_spec_from_file, written_by_cskd

    given = {name: value for name, value in ctx.params.items() if name != "config" and explicit(ctx, name)}
    if "epochs" in given and "max_steps" in given:
        fail("pass --epochs or --max-steps, not both", code=2)
    for name, value in list(given.items()):
        if isinstance(value, Path):
            given[name] = str(value)
    try:
        cfg = cls.from_yaml(config, **given)
        if "epochs" in given and "max_steps" not in given:
            cfg.max_steps = None  # an explicit --epochs beats a max_steps from --config
        cfg.validate()
        parse_spec(cfg.labels)
        if encoder_field not in given and written_by_cskd(config):  # a run's config.yaml names code: ask first
            check_spec_from_file(getattr(cfg, encoder_field), config, cfg.trust_code)
    except ValueError as e:
        fail(str(e), code=2)
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


def status_printer(rank0: bool):
    return lambda m: rank0 and err_console.print(f"[dim]{m}[/]", highlight=False)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def summary_table(result: dict, title: str) -> Table:
    table = Table(title=title, show_header=False)
    val, init, last = result.get("val") or {}, result.get("initial") or {}, result.get("val_last") or {}
    which = "best val SRCC" if result["keep"] == "best" else "last epoch"
    if val:
        table.add_row(f"val SRCC / PLCC (kept: {which}, epoch {val.get('epoch')})",
                      f"{_fmt(val.get('srcc'))} / {_fmt(val.get('plcc'))}  (n={val.get('n')})")
        if val.get("acc") is not None:
            table.add_row("val accuracy / MAE", f"{_fmt(val.get('acc'))} / {_fmt(val.get('mae'))}")
    if last and last.get("epoch") != val.get("epoch"):
        table.add_row("val SRCC, last epoch", _fmt(last.get("srcc")))
    if init:
        table.add_row("val SRCC at step 0", _fmt(init.get("srcc")))
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
