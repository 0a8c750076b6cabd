"""`cskd align`: Stage I, align a student encoder to the teacher's cached features (the teacher is never loaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._options import (
    TrustCodeOpt, NoVerifyOpt,
    OutOpt, ConfigOpt, WeightDecayOpt, WarmupPctOpt, MinLrPctOpt, ClipGradOpt, NumWorkersOpt, DeviceOpt, AmpOpt,
    ResumeOpt, KeepCheckpointsOpt, LogEveryOpt, MaxPixelsOpt,
)
from ._common import console, err_console, fail, show


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Given on the command line (or environment), not a default: only those override --config.
    Compared by name because typer may hand back its own vendored click's ParameterSource enum."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

def align(
    ctx: typer.Context,
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache made by `cskd extract` (required, here or in "
                                                       "--config).")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student SPEC: timm:MODEL[@true|TAG|PATH|none] (random init "
                                                        "by default), py:package.module:factory, or run:RUN_DIR.")] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training rows (ignored with --max-steps).")] = 10,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Train for exactly N optimiser steps instead of "
                                                                 "--epochs (default: use --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step and process.")] = 32,
    student_size: Annotated[Optional[int], typer.Option(min=8, help="Student input size in pixels (square) "
                                                                    "(default: the model's own).")] = None,
    image_root: Annotated[Optional[list[str]], typer.Option(help="OLD=NEW: read images recorded under source root "
                                                                 "OLD from NEW instead (moved data). Repeatable.")]
    = None,
    view: Annotated[str, typer.Option(help="Cached view shown per image and epoch: random (one of the V views, "
                                           "new each epoch) or a fixed index.")] = "random",
    w_global: Annotated[float, typer.Option(min=0, help="Weight of the global cosine loss (1 - cos).")] = 1.0,
    w_token: Annotated[Optional[float], typer.Option(min=0, help="Weight of the token smooth-L1 loss on LayerNorm-"
                                                                 "whitened tokens (default: 1.0 if the cache has "
                                                                 "tokens, else 0).")] = None,
    w_mse: Annotated[float, typer.Option(min=0, help="Weight of the MSE loss on the global embedding.")] = 0.0,
    token_beta: Annotated[float, typer.Option(min=0, help="Smooth-L1 beta of the token loss.")] = 2.0,
    standardize_global: Annotated[bool, typer.Option(help="Align to the global embedding standardised per dimension "
                                                          "(training rows' mean/std), not the raw one: the cosine "
                                                          "then rewards what tells images apart, not the mean "
                                                          "direction all embeddings share.")] = False,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate of the heads (and student).")] = 1e-3,
    lr_student: Annotated[Optional[float], typer.Option(help="Peak learning rate of the student (default: --lr).")]
    = None,
    weight_decay: WeightDecayOpt = 0.05,
    warmup_pct: WarmupPctOpt = 5.0,
    min_lr_pct: MinLrPctOpt = 1.0,
    clip_grad: ClipGradOpt = 1.0,
    eval_pct: Annotated[float, typer.Option(min=0, max=99, help="Percent of rows held out (by key hash, stable) "
                                                                "for evaluation.")] = 10.0,
    knn_k: Annotated[int, typer.Option(min=1, help="Neighbours compared by the kNN-agreement metric.")] = 10,
    knn_backend: Annotated[str, typer.Option(help="kNN search: auto (faiss if installed), faiss or torch.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and views (same seed, same run).")]
    = 0,
    num_workers: NumWorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = True,
    resume: ResumeOpt = False,
    keep_checkpoints: KeepCheckpointsOpt = 2,
    log_every: LogEveryOpt = 10,
    shuffle_targets: Annotated[bool, typer.Option(help="Control run: pair each image with another image's targets.")]
    = False,
    max_pixels: MaxPixelsOpt = 89_478_485,
    trust_code: TrustCodeOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Align a student encoder to the cached teacher features (Stage I). Writes config.yaml, metrics.jsonl,
    checkpoints, student.safetensors and loss_curve.png to --out."""
    from cskd_cache.stages.align import AlignConfig, AlignError, run_align
    from cskd_cache.cache.manifest import CacheError
    from cskd_cache.train.engine import NonFiniteLoss
    from cskd_cache.models.trust import UntrustedCode, check_spec_from_file, written_by_cskd

    given = {name: value for name, value in ctx.params.items() if name != "config" and _explicit(ctx, name)}
    if "epochs" in given and "max_steps" in given:
        fail("pass --epochs or --max-steps, not both", code=2)
    for name in ("cache", "out"):
        if name in given:
            given[name] = str(given[name])
    try:
        cfg = AlignConfig.from_yaml(config, **given)
        if "epochs" in given and "max_steps" not in given:
            cfg.max_steps = None  # an explicit --epochs beats a max_steps from --config
        cfg.validate()
        if "student" not in given and written_by_cskd(config):  # a run's config.yaml names code: ask first
            check_spec_from_file(cfg.student, config, cfg.trust_code)
    except (AlignError, UntrustedCode) as e:
        fail(str(e), code=2)

    rank0 = os.environ.get("RANK", "0") == "0"
    progress = Progress(TextColumn("[bold]{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                        disable=not (sys.stdout.isatty() and rank0))
    task = progress.add_task("align", total=None, loss="-", rate="- img/s")

    def on_progress(p: dict) -> None:
        rate = f"{p['img_s']:,.1f} img/s" if p.get("img_s") else "- img/s"
        progress.update(task, completed=p["step"], total=p["total"], loss=f"{p['loss']:.4f}", rate=rate)

    try:
        with progress:
            result = run_align(cfg, on_progress=on_progress,
                               on_status=lambda m: rank0 and err_console.print(f"[dim]{m}[/]", highlight=False))
    except (AlignError, CacheError, NonFiniteLoss, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not rank0:
        return
    table = Table(title=f"cskd align -> {result['run_dir']}", show_header=False)
    init = result.get("initial") or {}
    for key, label in (("global_cos", "held-out global cosine"), ("token_cos", "held-out token cosine"),
                       ("knn_agreement", "held-out kNN agreement")):
        if result.get(key) is not None:
            start = f" (step 0: {init[key]:.4f})" if init.get(key) is not None else ""
            table.add_row(label, f"{result[key]:.4f}{start}")
        elif key == "knn_agreement" and result.get("eval_rows"):
            table.add_row(label, f"n/a ({result['eval_rows']} held-out rows; needs more than --knn-k + 1)")
    table.add_row("steps", f"{result['step']:,} in {result['epochs']} epoch(s)")
    table.add_row("rows", f"{result['train_rows']:,} train, {result['eval_rows']:,} held out")
    table.add_row("time", f"{result['seconds']:,.1f} s")
    table.add_row("student", str(Path(result["run_dir"]) / "student.safetensors") + " (load_encoder / run:)")
    show(table)
