"""Options that several commands share: one declaration, one help text, the same flags everywhere.

The training options mirror `cskd_cache.train.config.TrainConfig` (one field, one flag). Flags renamed in this
release keep their old spelling as a hidden option (`Old`); the config reads it under its old name and prints one
notice (`cskd_cache.train.config.CommandConfig.normalise`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._config import load_defaults


def Old(flag: str, kind=float):  # noqa: N802 (reads like a type in a signature)
    """A renamed flag's old spelling: accepted, hidden from --help, read with a notice."""
    return Annotated[Optional[kind], typer.Option(flag, hidden=True)]


# every command
DefaultsOpt = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=load_defaults, expose_value=False,
    help="YAML file of option: value (names as below, with _ or -); flags given here override it.")]

# every training command (align, finetune, distill): `TrainConfig`
OutOpt = Annotated[Optional[Path], typer.Option(help="Run directory to create (or continue with --resume).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="YAML file of options (field names as below, with _ or -); "
                                                        "flags given here override it. A run's config.yaml works.")]
EpochsOpt = Annotated[int, typer.Option(min=1, help="Passes over the main stream: the training rows (align), the "
                                                    "train labels (finetune), the unlabelled rows (distill); "
                                                    "ignored with --max-steps.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(min=1, help="Train for exactly N optimiser steps instead of "
                                                                "--epochs (default: use --epochs).")]
EvalEveryOpt = Annotated[Optional[int], typer.Option(min=1, help="Validate and checkpoint every N steps instead of "
                                                                "after each pass over the main stream (pair it "
                                                                "with --max-steps to schedule by steps).")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Images per step and process (labelled images in "
                                                       "finetune and distill).")]
SizeOpt = Annotated[Optional[int], typer.Option(min=8, help="Input size in pixels (square) of the model being "
                                                            "trained (default: the model's own).")]
LrOpt = Annotated[float, typer.Option(help="Peak AdamW learning rate of the heads (and of the encoder).")]
LrEncoderOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate of the encoder (default: --lr; "
                                                            "~1e-4 suits pretrained or aligned encoders).")]
WeightDecayOpt = Annotated[float, typer.Option(min=0, help="AdamW weight decay (not on biases and norms).")]
WarmupFractionOpt = Annotated[float, typer.Option(min=0, max=1, help="Linear warm-up, as a fraction of all steps.")]
MinLrFractionOpt = Annotated[float, typer.Option(min=0, max=1, help="Cosine decay ends at this fraction of the lr.")]
ClipGradOpt = Annotated[float, typer.Option(min=0, help="Clip the gradient norm to this (0 = off).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of initialisation, data order, views and augmentation (same seed, "
                                           "same run).")]
NumWorkersOpt = Annotated[int, typer.Option(min=0, help="DataLoader worker processes decoding images.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA with AMP when present), cpu, cuda, cuda:N.")]
AmpOpt = Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16, else fp16 with loss scaling).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue --out from its newest checkpoint (safe on a first run).")]
KeepCheckpointsOpt = Annotated[int, typer.Option(min=0, help="Epoch checkpoints kept (0 = all).")]
LogEveryOpt = Annotated[int, typer.Option(min=1, help="Steps between training-loss lines in metrics.jsonl.")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")]
EmaOpt = Annotated[float, typer.Option(min=0, max=0.999999, help="Validate and save an exponential moving average "
                                                                  "of the weights with this decay (e.g. 0.998; 0 = "
                                                                  "off).")]
ViewPixelsOpt = Annotated[str, typer.Option(help="Where cached views' pixels come from: auto (a view store that covers "
                                                "the input size, see `cskd cache add-views`, else the original "
                                                "images with JPEG draft decoding), store (a covering store or an "
                                                "error), originals (draft decoding), exact (full decodes).")]
CacheImageRootOpt = Annotated[Optional[list[str]], typer.Option(help="OLD=NEW: read the cache's images recorded "
                                                                     "under source root OLD from NEW instead (moved "
                                                                     "data). Repeatable.")]

# the IAA commands (finetune, distill)
LabelsOpt = Annotated[Optional[str], typer.Option(help="DATASET_SPEC, e.g. ava:ROOT or csv:FILE (required).")]
LabelImageRootOpt = Annotated[Optional[str], typer.Option(help="Folder the label reader takes images from (default: "
                                                               "the dataset's own layout, see docs/datasets.md).")]
ValFractionOpt = Annotated[float, typer.Option(help="Share of train drawn as val (by key hash) where the "
                                                    "dataset has no val split.")]
SplitSeedOpt = Annotated[int, typer.Option(help="Seed of the hashed val/test split of datasets without one.")]
LabelFractionOpt = Annotated[float, typer.Option(help="Keep this fraction of the train labels (by key hash: "
                                                      "stable, nested across fractions).")]
LabelSeedOpt = Annotated[int, typer.Option(help="Seed of the --label-fraction subset.")]
HeadOpt = Annotated[str, typer.Option(help="auto (distribution when the labels have vote bins, else scalar), "
                                           "distribution or scalar.")]
WPlccOpt = Annotated[float, typer.Option(min=0, help="Weight of the 1 - PLCC loss (scalar head only).")]
KeepOpt = Annotated[str, typer.Option(help="iaa_model.* holds the best-by-val-SRCC epoch (best) or the last.")]
HeadInitOpt = Annotated[str, typer.Option(help="auto: a run: model that is a finetune/distill run starts with its "
                                                "trained score head too, and step 0 counts for --keep best (the "
                                                "kept model is never below it on val); fresh: a new head on its "
                                                "encoder. Other specs always start a new head.")]
EvalBatchSizeOpt = Annotated[Optional[int], typer.Option(min=1, help="Validation batch (default: --batch-size).")]

# every command that loads a run directory
TrustCodeOpt = Annotated[bool, typer.Option("--trust-code", help="Allow a py:package.module:factory model spec found "
                                                                 "inside a run directory to be imported and run. "
                                                                 "Only for runs from people you trust.")]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Skip the one-time sha256 check of cache shards not "
                                                               "yet verified (sizes and shard identity are still "
                                                               "checked).")]


# Groups of options the training commands share, declared once and added to each command's signature by
# `with_options` (name, annotation, default): the flags, their help and their defaults are the same everywhere.
TRAIN_OPTIONS = (
    ("out", OutOpt, None), ("config", ConfigOpt, None), ("epochs", EpochsOpt, 10), ("max_steps", MaxStepsOpt, None),
    ("eval_every", EvalEveryOpt, None), ("batch_size", BatchSizeOpt, 32), ("size", SizeOpt, None),
    ("lr", LrOpt, 1e-3), ("lr_encoder", LrEncoderOpt, None),
    ("weight_decay", WeightDecayOpt, 0.05), ("warmup_fraction", WarmupFractionOpt, 0.05),
    ("min_lr_fraction", MinLrFractionOpt, 0.01), ("clip_grad", ClipGradOpt, 1.0), ("ema", EmaOpt, 0.0),
    ("seed", SeedOpt, 0), ("num_workers", NumWorkersOpt, 2), ("device", DeviceOpt, "auto"), ("amp", AmpOpt, True),
    ("resume", ResumeOpt, False), ("keep_checkpoints", KeepCheckpointsOpt, 2), ("log_every", LogEveryOpt, 10),
    ("max_pixels", MaxPixelsOpt, 89_478_485), ("trust_code", TrustCodeOpt, False),
    ("view_pixels", ViewPixelsOpt, "auto"),
    ("warmup_pct", Old("--warmup-pct"), None), ("min_lr_pct", Old("--min-lr-pct"), None),
)
IAA_OPTIONS = (
    ("labels", LabelsOpt, None), ("label_image_root", LabelImageRootOpt, None), ("val_fraction", ValFractionOpt, 0.05),
    ("split_seed", SplitSeedOpt, 0), ("label_fraction", LabelFractionOpt, 1.0), ("label_seed", LabelSeedOpt, 0),
    ("head", HeadOpt, "auto"), ("w_plcc", WPlccOpt, 0.0), ("keep", KeepOpt, "best"),
    ("eval_batch_size", EvalBatchSizeOpt, None), ("head_init", HeadInitOpt, "auto"),
    ("image_root", Old("--image-root", str), None),
)
CACHE_OPTIONS = (("no_verify", NoVerifyOpt, False),)


def with_options(*groups):
    """Add the options of ``groups`` to a command's own (keyword-only, after them), so Typer sees one signature;
    the command receives them in ``**options`` (training commands read them through ``ctx.params``)."""
    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for group in groups for name, annotation, default in group if name not in names]
        fn.__signature__ = sig.replace(parameters=own + extra)
        fn.__annotations__ = {p.name: p.annotation for p in own + extra}
        return fn
    return deco
