"""`cskd align`: Stage I, align a student encoder to the teacher's cached features (the teacher is never loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import show
from ._config import build_config
from ._options import CACHE_OPTIONS, TRAIN_OPTIONS, CacheImageRootOpt, Old, with_options
from ._train import run_training


@with_options(TRAIN_OPTIONS, CACHE_OPTIONS)
def align(
    ctx: typer.Context,
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache made by `cskd extract` (required, here or in "
                                                       "--config).")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student SPEC: timm:MODEL[@true|TAG|PATH|none] (random init "
                                                        "by default), py:package.module:factory, or run:RUN_DIR.")] = None,
    cache_image_root: CacheImageRootOpt = None,
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
    eval_fraction: Annotated[float, typer.Option(min=0, max=0.99, help="Fraction of rows held out (by key hash, "
                                                                       "stable) for evaluation.")] = 0.1,
    knn_k: Annotated[int, typer.Option(min=1, help="Neighbours compared by the kNN-agreement metric.")] = 10,
    knn_backend: Annotated[str, typer.Option(help="kNN search: auto (faiss if installed), faiss or torch.")] = "auto",
    shuffle_targets: Annotated[bool, typer.Option(help="Control run: pair each image with another image's targets.")]
    = False,
    image_root: Old("--image-root", list[str]) = None,
    student_size: Old("--student-size", int) = None,
    lr_student: Old("--lr-student") = None,
    eval_pct: Old("--eval-pct") = None,
    **options,
) -> None:
    """Align a student encoder to the cached teacher features (Stage I). Writes config.yaml, metrics.jsonl,
    checkpoints, student.safetensors and loss_curve.png to --out."""
    from cskd_cache.stages.align import AlignConfig, run_align

    cfg = build_config(ctx, AlignConfig, options["config"], "student")
    result = run_training("align", run_align, cfg)
    if result is None:
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
