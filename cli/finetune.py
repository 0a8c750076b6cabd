"""`cskd finetune`: supervised IAA training of any encoder on a dataset's labelled train split."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import (
    TrustCodeOpt,
    OutOpt, ConfigOpt, WeightDecayOpt, WarmupPctOpt, MinLrPctOpt, ClipGradOpt, NumWorkersOpt, DeviceOpt, AmpOpt,
    ResumeOpt, KeepCheckpointsOpt, LogEveryOpt, MaxPixelsOpt, LabelsOpt, ValFractionOpt, SplitSeedOpt,
    LabelFractionOpt, LabelSeedOpt, HeadOpt, WPlccOpt, KeepOpt, EmaOpt, EvalBatchSizeOpt,
)
from ._common import fail, show
from ._iaa import add_time_and_model, build_config, progress_display, status_printer, summary_table, train_callbacks


def finetune(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Encoder SPEC: timm:MODEL[@true|TAG|PATH|none], "
                                                      "py:package.module:factory, or run:ALIGN_RUN (required).")]
    = None,
    labels: LabelsOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    image_root: Annotated[Optional[str], typer.Option(help="Folder the label reader takes images from (default: "
                                                           "the dataset's own layout).")] = None,
    val_fraction: ValFractionOpt = 0.05,
    split_seed: SplitSeedOpt = 0,
    label_fraction: LabelFractionOpt = 1.0,
    label_seed: LabelSeedOpt = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the train labels (ignored with --max-steps).")] = 10,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Train for exactly N steps instead of --epochs.")]
    = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Labelled images per step and process.")] = 32,
    size: Annotated[Optional[int], typer.Option(min=8, help="Encoder input size in pixels (default: the model's "
                                                            "own).")] = None,
    head: HeadOpt = "auto",
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate of the head (and encoder).")] = 1e-3,
    lr_encoder: Annotated[Optional[float], typer.Option(help="Peak learning rate of the encoder (default: --lr; "
                                                             "use ~1e-4 for pretrained/aligned encoders).")] = None,
    weight_decay: WeightDecayOpt = 0.05,
    warmup_pct: WarmupPctOpt = 5.0,
    min_lr_pct: MinLrPctOpt = 1.0,
    clip_grad: ClipGradOpt = 1.0,
    w_plcc: WPlccOpt = 0.0,
    keep: KeepOpt = "best",
    ema: EmaOpt = 0.0,
    eval_batch_size: EvalBatchSizeOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")] = 0,
    num_workers: NumWorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = True,
    resume: ResumeOpt = False,
    keep_checkpoints: KeepCheckpointsOpt = 2,
    log_every: LogEveryOpt = 10,
    max_pixels: MaxPixelsOpt = 89_478_485,
    augment: Annotated[bool, typer.Option(help="Mild random resized crop (80-100% of the eval view) + flip.")]
    = True,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Fine-tune an encoder + score head on labelled images (labels-only baseline, or the Stage II teacher).
    Writes config.yaml, metrics.jsonl (val SRCC/PLCC per epoch), checkpoints, loss_curve.png and iaa_model.*."""
    from cskd_cache.stages.finetune import FinetuneConfig, run_finetune
    from cskd_cache.cache.manifest import CacheError
    from cskd_cache.train.engine import NonFiniteLoss

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
    show(table)
