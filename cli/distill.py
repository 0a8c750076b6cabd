"""`cskd distill`: Stage II, semi-supervised distillation of a teacher's scores into any student, cache-first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import show
from ._options import CACHE_OPTIONS, IAA_OPTIONS, TRAIN_OPTIONS, CacheImageRootOpt, with_options
from ._train import add_time_and_model, fmt, iaa_config, run_training, summary_table


@with_options(TRAIN_OPTIONS, IAA_OPTIONS, CACHE_OPTIONS)
def distill(
    ctx: typer.Context,
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache made by `cskd extract` (required): its rows "
                                                       "are the unlabelled data.")] = None,
    teacher: Annotated[str, typer.Option(help="cache-head (a head fitted on the cached embeddings of the train "
                                              "labels) or run:TEACHER_RUN (a `cskd finetune` --out).")]
    = "cache-head",
    student: Annotated[Optional[str], typer.Option(help="Student SPEC: timm:MODEL[@true|TAG|PATH|none], "
                                                        "py:package.module:factory, run:ALIGN_RUN, or run:RUN (a "
                                                        "finetune/distill run: see --head-init) (required).")]
    = None,
    lambda_u: Annotated[float, typer.Option(min=0, help="Weight of the distillation loss on unlabelled views.")]
    = 1.0,
    lambda_f: Annotated[float, typer.Option(min=0, help="Weight of the feature alignment (1 - cos to the cached "
                                                        "CLIP embedding through a projection head).")] = 0.0,
    distill_loss: Annotated[str, typer.Option(help="emd or kl (distribution heads; scalar heads use MSE).")] = "emd",
    temperature: Annotated[float, typer.Option(help="Temperature of --distill-loss kl.")] = 1.0,
    unlabelled_ratio: Annotated[float, typer.Option(help="Unlabelled items per labelled item in each step.")] = 1.0,
    rounds: Annotated[int, typer.Option(min=1, help="Collaborative rounds: each round's student teaches the next "
                                                    "(earlier rounds kept in --out/rounds/round-K/). 1 = one "
                                                    "distillation.")] = 1,
    refine_teacher: Annotated[bool, typer.Option(help="With --rounds >= 2: before each later round, train the teacher "
                                                      "again (its fine-tuned encoder, a fresh head) on the labels + "
                                                      "the last student's predictions on every unlabelled view; "
                                                      "that refined teacher teaches the round. Needs a run: "
                                                      "teacher.")] = False,
    refine_lr_encoder: Annotated[float, typer.Option(help="Encoder learning rate of --refine-teacher's teacher "
                                                          "runs.")] = 3e-4,
    attn_distance: Annotated[float, typer.Option(min=0, help="ViT students: weight of the attention-distance "
                                                             "constraint, keeping each layer's mean attention "
                                                             "distance near the aligned student's own at the start "
                                                             "(0 = off, the default until measured).")] = 0.0,
    attn_reference: Annotated[str, typer.Option(help="The profile --attn-distance keeps: student (the aligned "
                                                     "student's own at the start) or teacher (the teacher's, stored "
                                                     "by `cskd extract --attention-stats`, matched by relative "
                                                     "depth).")] = "student",
    consistency: Annotated[float, typer.Option(min=0, help="Weight of consistency regularisation: each unlabelled "
                                                           "view's prediction on a second jitter is pulled towards "
                                                           "the first (stop-gradient; EMD, or MSE for scalar "
                                                           "heads). 0 = off, the default until measured.")] = 0.0,
    cache_image_root: CacheImageRootOpt = None,
    predictions: Annotated[Optional[str], typer.Option(help="Teacher predictions cache directory (default: "
                                                            "TEACHER_RUN/predictions/<cache id>, or "
                                                            "--out/teacher/predictions for cache-head).")] = None,
    stale_predictions: Annotated[str, typer.Option(help="When the predictions cache belongs to another teacher or "
                                                        "cache: recompute or error.")] = "recompute",
    teacher_hidden: Annotated[int, typer.Option(min=0, help="cache-head: hidden width of its MLP (0 = linear).")]
    = 0,
    teacher_steps: Annotated[int, typer.Option(min=1, help="cache-head: optimiser steps of its fit.")] = 1000,
    teacher_lr: Annotated[float, typer.Option(help="cache-head: learning rate of its fit.")] = 3e-3,
    teacher_batch_size: Annotated[int, typer.Option(min=1, help="run: teacher: images per forward when computing "
                                                                "its predictions.")] = 64,
    augment: Annotated[bool, typer.Option(help="Mild crop + flip for labelled images read from disk (those not in "
                                               "the cache).")] = True,
    jitter_views: Annotated[bool, typer.Option(help="Show a mild crop + flip inside each cached view, against that "
                                                    "view's teacher targets; --no-jitter-views shows the exact "
                                                    "cached views (a student then memorises those few fixed "
                                                    "inputs per image).")] = True,
    label_views: Annotated[str, typer.Option(help="Which cached views a labelled image shows: cached (any of "
                                                  "them, crops included, each under the whole picture's label) or "
                                                  "eval (view 0 only, the pixels finetune trains on).")] = "cached",
    pool_labelled: Annotated[bool, typer.Option(help="The teacher's targets cover the labelled train images too, "
                                                     "beside their labels; --no-pool-labelled keeps them to images "
                                                     "without a label.")] = True,
    bn_stats: Annotated[str, typer.Option(help="Batch-norm students: joint (labelled and unlabelled items in one "
                                               "forward), separate (the labelled items in a forward of their own, "
                                               "the unlabelled ones in another; both move the running statistics) "
                                               "or labelled (as separate, but only the labelled forward moves the "
                                               "running statistics evaluation uses).")] = "joint",
    labels_outside_cache: Annotated[bool, typer.Option(help="The labelled images are deliberately not in the cache "
                                                            "(read from disk); without it, labels that link to no "
                                                            "cache row stop the run.")] = False,
    **options,
) -> None:
    """Distil a teacher's scores on the cached views into a student, with the labelled train split alongside.
    Writes config.yaml, metrics.jsonl (val SRCC/PLCC per epoch), checkpoints, loss_curve.png and iaa_model.*."""
    from cskd_cache.stages.distill import DistillConfig
    from cskd_cache.stages.rounds import run_rounds

    cfg = iaa_config(ctx, DistillConfig, options["config"], "student")
    result = run_training("distill", run_rounds, cfg, teacher_bar=True)
    if result is None:
        return
    table = summary_table(result, f"cskd distill -> {result['run_dir']}")
    link = result["link"]
    table.add_row("train labels in the cache", f"{result['train_labels_linked']:,} of {result['train_labels']:,} "
                                              "(the rest read from disk)")
    table.add_row("labels linked to cache rows", f"{link['by_path']:,} by path, {link['by_content']:,} by content")
    if link["unlinked"]:
        more = ", ..." if link["unlinked"] > len(link["first_unlinked"]) else ""
        table.add_row("labels not in the cache", f"{link['unlinked']:,} (first: "
                                                 f"{', '.join(link['first_unlinked'][:3])}{more})")
    table.add_row("unlabelled rows", f"{result['unlabelled_rows']:,}")
    table.add_row("val/test rows left out", f"{result['heldout_rows']:,} (never trained on)")
    t = result["teacher"]
    t_val = (t.get("val") or {}).get("srcc")
    table.add_row("teacher", f"{t['spec']}, predictions {'computed' if t['computed'] else 'reused'} "
                             f"({t['predictions']}); val SRCC on view 0 {fmt(t_val)}")
    for r in result.get("rounds") or []:
        table.add_row(f"round {r['round']}", f"val SRCC {fmt((r.get('val') or {}).get('srcc'))}, teacher {r['teacher']}")
    add_time_and_model(table, result)
    show(table)
