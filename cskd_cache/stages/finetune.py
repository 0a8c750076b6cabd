"""`cskd finetune`: supervised IAA training of any encoder on a dataset's labelled train split.

Both the labels-only baseline and the Stage II teacher (``cskd distill --teacher run:RUN_DIR``). The encoder is any
student spec (``timm:MODEL[@PRETRAINED]``, ``py:module:factory``), an aligned run (``run:ALIGN_RUN``) or a
finetune/distill run (``run:RUN``: with ``head_init`` "auto" its score head too, `iaa_task`); images
are read from disk with the eval view (`data.transforms`), plus a mild random resized crop (80-100 % of the
eval view's area) and horizontal flip unless ``augment`` is off. The head, losses, schedule, validation, model
selection (best val SRCC by default, see `iaa_task`), checkpoints, resume and DDP are the engine's (`train.engine`).

``label_fraction`` keeps a seeded, key-hashed fraction of the train labels (`labels.targets.keep_fraction`), for
few-label experiments; val and test are never thinned.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .. import dist
from ..data.datasets import CachedViews
from ..errors import TrainError
from ..labels.targets import label_targets
from ..models.runs import build_encoder
from ..train.engine import CONFIG_NAME, fit, plan_steps, resolve_device, seed_everything
from ..train.run_log import read_resolved
from ..train.run_dir import prepare_run_dir
from .iaa_task import IAATask, IAATrainConfig, Stream, prepare_labels, resumed_start, starting_head

__all__ = ["FinetuneConfig", "FinetuneError", "run_finetune"]


class FinetuneError(TrainError):
    """A bad `finetune` request; the message names the fix."""


@dataclass
class FinetuneConfig(IAATrainConfig):
    model: str = ""
    augment: bool = True

    error: ClassVar[type] = FinetuneError
    command: ClassVar[str] = "finetune"
    required: ClassVar[tuple[str, ...]] = ("model", "labels", "out")


def report_labels(labels, train, val, status) -> None:
    """One status line per problem the label files had (missing or unreadable images), for finetune and distill."""
    if labels.missing_summary():
        status(labels.missing_summary())
    for part in (train, val):
        if part.unreadable_summary():
            status(part.unreadable_summary())


def run_finetune(cfg: FinetuneConfig, on_progress: Callable[[dict], None] | None = None,
                 on_status: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a finetune run; returns its summary: ``val`` (metrics of the kept iaa_model: n, srcc,
    plcc, mae, acc, emd, epoch, step), ``val_last``, ``initial`` (step 0), ``best_epoch``, label counts, ...
    """
    cfg = dataclasses.replace(cfg)
    cfg.validate()
    if cfg.view_pixels == "store":
        raise FinetuneError("--view-pixels store: finetune reads its labelled images from their files (it has no "
                            "feature cache, so no view store); use auto, originals or exact")
    status = on_status or (lambda m: None)
    t0 = time.perf_counter()
    dist.init_if_needed()
    device = resolve_device(cfg.device)
    labels, train, val, kind, bins = prepare_labels(cfg)
    report_labels(labels, train, val, status)
    head_state = starting_head(cfg, cfg.model, "--model", kind, bins, labels)  # before the run directory exists
    ckpt = prepare_run_dir(cfg, Path(cfg.out))
    dist.barrier()
    head_state = resumed_start(head_state, read_resolved(Path(cfg.out) / CONFIG_NAME) if ckpt is not None else None)

    seed_everything(cfg.seed)
    try:
        encoder = build_encoder(cfg.model, pretrained_ok=ckpt is None, size=cfg.size, trust_code=cfg.trust_code)
    except (ValueError, FileNotFoundError) as e:
        raise FinetuneError(f"--model {cfg.model}: {e}") from e
    icfg = encoder.input_cfg
    draft = cfg.view_pixels != "exact"  # no cache, so no store: auto and originals both decode in draft mode
    train_ds = CachedViews(train.paths(), icfg, targets=label_targets(train, kind), augment=cfg.augment,
                           seed=cfg.seed, max_pixels=cfg.max_pixels, draft=draft)
    # validation decodes whole, as `cskd evaluate` and `cskd predict` do, so a val score is the score they give
    val_ds = CachedViews(val.paths(), icfg, max_pixels=cfg.max_pixels, draft=False) if len(val) else None
    counts = labels.counts()
    facts = {"label_counts": counts, "train_labels_used": len(train), "missing_images": len(labels.missing),
             "view_pixels": {"source": "originals", "draft": draft, "mode": cfg.view_pixels},
             "broken_images": [p for p, _ in train.unreadable + val.unreadable]}
    task = IAATask(cfg, encoder=encoder, kind=kind, bins=bins, labels=labels, val_labels=val,
                   streams=[Stream("labelled", train_ds, cfg.batch_size)], val=val_ds, device=device, facts=facts,
                   extra_meta={"labels_spec": cfg.labels}, status=status, head_state=head_state)
    result = fit(task, cfg, run_dir=Path(cfg.out), ckpt=ckpt, device=device,
                 plan=plan_steps(cfg, task.steps_per_epoch()), on_progress=on_progress, on_status=status)
    result.update({"train_labels": len(train), "train_labels_total": counts["train"], "val_labels": len(val),
                   "missing_images": len(labels.missing),
                   "broken_images": len(train.unreadable) + len(val.unreadable), "seconds": time.perf_counter() - t0})
    return result
