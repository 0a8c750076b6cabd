"""`cskd finetune`: supervised IAA training of any encoder on a dataset's labelled train split."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._common import show
from ._options import IAA_OPTIONS, TRAIN_OPTIONS, with_options
from ._train import add_time_and_model, iaa_config, run_training, summary_table


@with_options(TRAIN_OPTIONS, IAA_OPTIONS)
def finetune(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Encoder SPEC: timm:MODEL[@true|TAG|PATH|none], "
                                                      "py:package.module:factory, run:ALIGN_RUN, or run:RUN (a "
                                                      "finetune/distill run: see --head-init) (required).")]
    = None,
    augment: Annotated[bool, typer.Option(help="Mild random resized crop (80-100% of the eval view) + flip.")]
    = True,
    **options,
) -> None:
    """Fine-tune an encoder + score head on labelled images (labels-only baseline, or the Stage II teacher).
    Writes config.yaml, metrics.jsonl (val SRCC/PLCC per epoch), checkpoints, loss_curve.png and iaa_model.*."""
    from cskd_cache.stages.finetune import FinetuneConfig, run_finetune

    cfg = iaa_config(ctx, FinetuneConfig, options["config"], "model")
    result = run_training("finetune", run_finetune, cfg)
    if result is None:
        return
    table = summary_table(result, f"cskd finetune -> {result['run_dir']}")
    if result.get("missing_images"):
        table.add_row("label rows without image", f"{result['missing_images']:,} (left out)")
    add_time_and_model(table, result)
    show(table)
