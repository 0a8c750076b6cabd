"""Options that align, finetune and distill share: one declaration, one help text, the same flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# every training command
OutOpt = Annotated[Optional[Path], typer.Option(help="Run directory to create (or continue with --resume).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="YAML file of options (field names as below, with _ or -); "
                                                        "flags given here override it. A run's config.yaml works.")]
WeightDecayOpt = Annotated[float, typer.Option(min=0, help="AdamW weight decay (not on biases and norms).")]
WarmupPctOpt = Annotated[float, typer.Option(min=0, max=100, help="Linear warm-up, percent of all steps.")]
MinLrPctOpt = Annotated[float, typer.Option(min=0, max=100, help="Cosine decay ends at this percent of the lr.")]
ClipGradOpt = Annotated[float, typer.Option(min=0, help="Clip the gradient norm to this (0 = off).")]
NumWorkersOpt = Annotated[int, typer.Option(min=0, help="DataLoader worker processes decoding images.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA with AMP when present), cpu, cuda, cuda:N.")]
AmpOpt = Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16, else fp16 with loss scaling).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue --out from its newest checkpoint (safe on a first run).")]
KeepCheckpointsOpt = Annotated[int, typer.Option(min=0, help="Epoch checkpoints kept (0 = all).")]
LogEveryOpt = Annotated[int, typer.Option(min=1, help="Steps between training-loss lines in metrics.jsonl.")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")]

# the IAA commands (finetune, distill)
LabelsOpt = Annotated[Optional[str], typer.Option(help="DATASET_SPEC, e.g. ava:ROOT or csv:FILE (required).")]
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
EmaOpt = Annotated[float, typer.Option(min=0, max=0.999999, help="Validate and save an exponential moving average "
                                                                  "of the weights with this decay (e.g. 0.998; 0 = "
                                                                  "off).")]
EvalBatchSizeOpt = Annotated[Optional[int], typer.Option(min=1, help="Validation batch (default: --batch-size).")]

# every command that loads a run directory
TrustCodeOpt = Annotated[bool, typer.Option("--trust-code", help="Allow a py:package.module:factory model spec found "
                                                                 "inside a run directory to be imported and run. "
                                                                 "Only for runs from people you trust.")]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Skip the one-time sha256 check of cache shards not "
                                                               "yet verified (sizes and shard identity are still "
                                                               "checked).")]
