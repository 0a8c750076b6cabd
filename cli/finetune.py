"""`cskd finetune`: supervised IAA training of any encoder on a dataset's labelled train split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, fail
from ._iaa import add_time_and_model, build_config, progress_display, status_printer, summary_table, train_callbacks


def finetune(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Encoder SPEC: timm:MODEL[@true|TAG|PATH|none], "
                                                      "py:package.module:factory, or run:ALIGN_RUN (required).")]
    = None,
    labels: Annotated[Optional[str], typer.Option(help="DATASET_SPEC, e.g. ava:ROOT or csv:FILE (required).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory to create (or continue with --resume).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file of options (field names as below, with _ or -); "
                                                        "flags given here override it. A run's config.yaml works.")]
    = None,
    image_root: Annotated[Optional[str], typer.Option(help="Folder the label reader takes images from (default: "
                                                           "the dataset's own layout).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train drawn as val (by key hash) where the "
                                                     "dataset has no val split.")] = 0.05,
    split_seed: Annotated[int, typer.Option(help="Seed of the hashed val/test split of datasets without one.")] = 0,
    label_fraction: Annotated[float, typer.Option(help="Keep this fraction of the train labels (by key hash: "
                                                       "stable, nested across fractions).")] = 1.0,
    label_seed: Annotated[int, typer.Option(help="Seed of the --label-fraction subset.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the train labels (ignored with --max-steps).")] = 10,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Train for exactly N steps instead of --epochs.")]
    = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Labelled images per step and process.")] = 32,
    size: Annotated[Optional[int], typer.Option(min=8, help="Encoder input size in pixels (default: the model's "
                                                            "own).")] = None,
    head: Annotated[str, typer.Option(help="auto (distribution when the labels have vote bins, else scalar), "
                                           "distribution or scalar.")] = "auto",
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate of the head (and encoder).")] = 1e-3,
    lr_encoder: Annotated[Optional[float], typer.Option(help="Peak learning rate of the encoder (default: --lr; "
                                                             "use ~1e-4 for pretrained/aligned encoders).")] = None,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay (not on biases and norms).")] = 0.05,
    warmup_pct: Annotated[float, typer.Option(min=0, max=100, help="Linear warm-up, percent of all steps.")] = 5.0,
    min_lr_pct: Annotated[float, typer.Option(min=0, max=100, help="Cosine decay ends at this percent of the lr.")]
    = 1.0,
    clip_grad: Annotated[float, typer.Option(min=0, help="Clip the gradient norm to this (0 = off).")] = 1.0,
    w_plcc: Annotated[float, typer.Option(min=0, help="Weight of the 1 - PLCC loss (scalar head only).")] = 0.0,
    keep: Annotated[str, typer.Option(help="iaa_model.* holds the best-by-val-SRCC epoch (best) or the last.")]
    = "best",
    eval_batch_size: Annotated[Optional[int], typer.Option(min=1, help="Validation batch (default: --batch-size).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")] = 0,
    num_workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes decoding images.")] = 2,
    device: Annotated[str, typer.Option(help="auto (CUDA with AMP when present), cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16, else fp16 with loss scaling).")] = True,
    resume: Annotated[bool, typer.Option(help="Continue --out from its newest checkpoint (safe on a first run).")]
    = False,
    keep_checkpoints: Annotated[int, typer.Option(min=0, help="Epoch checkpoints kept (0 = all).")] = 2,
    log_every: Annotated[int, typer.Option(min=1, help="Steps between training-loss lines in metrics.jsonl.")] = 10,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")]
    = 89_478_485,
    augment: Annotated[bool, typer.Option(help="Mild random resized crop (80-100% of the eval view) + flip.")]
    = True,
) -> None:
    """Fine-tune an encoder + score head on labelled images (labels-only baseline, or the Stage II teacher).
    Writes config.yaml, metrics.jsonl (val SRCC/PLCC per epoch), checkpoints, loss_curve.png and iaa_model.*."""
    from cskd_cache.finetune import FinetuneConfig, run_finetune
    from cskd_cache.manifest import CacheError
    from cskd_cache.trainer import NonFiniteLoss

    cfg = build_config(ctx, FinetuneConfig, config, "model")
    progress, rank0 = progress_display()
    try:
        with progress:
            result = run_finetune(cfg, on_progress=train_callbacks(progress, "finetune"),
                                  on_status=status_printer(rank0))
    except (CacheError, NonFiniteLoss, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not rank0:
        return
    table = summary_table(result, f"cskd finetune -> {result['run_dir']}")
    if result.get("missing_images"):
        table.add_row("label rows without image", f"{result['missing_images']:,} (left out)")
    add_time_and_model(table, result)
    console.print(table)
