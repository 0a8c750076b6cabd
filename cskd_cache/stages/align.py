"""Stage I, `cskd align`: teach any student encoder to reproduce the teacher's cached features.

The teacher is never loaded: targets come from the cache, inputs are each row's cached view rebuilt from the
original image at the student's own size (`data.datasets.CachedViews`). The trainable module is the student plus
two heads created from the widths (`models.align_heads.AlignModel`): a projection of the pooled feature to the
teacher's embedding width and a 1x1 token head from the student's grid (resampled to the cached grid) to the
token width. `AlignTask` plugs it into the one training loop (`train.engine.fit`).

Defaults (every one an `AlignConfig` field, settable from a YAML ``--config`` and overridden by flags):

- losses (`losses.align.AlignLoss`): global cosine weight 1.0 (to the raw cached embedding; with
  ``standardize_global`` to the embedding standardised per dimension by the training rows' mean and std,
  `cache.stats`); token smooth-L1 on LayerNorm-whitened tokens 1.0 when the cache holds tokens, else 0 (asking
  for it on a cache without tokens is an error); MSE 0; token smooth-L1 beta 2.0.
- optimiser: AdamW, lr 1e-3 for the heads and the student (``lr_encoder`` overrides the student's), weight decay
  0.05 (not on biases/norms), linear warm-up over 5% of the steps then cosine to 1% of the lr, gradient clipping
  at norm 1.0; AMP (bf16, else fp16 with a scaler) on CUDA only.
- 10 epochs unless ``max_steps`` is set (then it decides), batch size 32, seed 0. An epoch is one pass over the
  training rows; with V cached views each row shows one per pass (`CachedViews`, view="random").
- evaluation: 10% of the rows held out by key hash, at step 0 and after every epoch (see `align_eval`).

RUN_DIR gets config.yaml (this config plus what was resolved from it), metrics.jsonl (one JSON object per line:
``type`` train or eval), checkpoints/epoch-NNNN/ after each epoch (the newest ``keep_checkpoints``),
student.safetensors + student.json (load with `cskd_cache.load_encoder(RUN_DIR)` or the spec ``run:RUN_DIR``)
and loss_curve.png. ``resume`` continues from the newest checkpoint to the same weights an uninterrupted run
reaches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import dist
from ..cache.paths import check_images, parse_image_root, resolve_paths
from ..cache.reader import open_cache
from ..cache.stats import embed_stats
from ..data.datasets import CachedViews, StepBatches, collate, mix_seed
from ..errors import TrainError
from ..losses.align import AlignLoss
from ..models.align_heads import AlignHeads, AlignModel
from ..models.runs import build_encoder, save_encoder
from ..train.config import TRAIN_RENAMES, TrainConfig
from ..train.engine import Task, fit, param_groups, plan_steps, resolve_device, seed_everything
from ..train.engine import train_step as engine_step
from ..train.run_dir import prepare_run_dir
from .align_eval import evaluate, split_rows
from .view_pixels import resolve_view_pixels, store_may_serve

__all__ = ["AlignConfig", "AlignError", "AlignTask", "run_align", "train_step"]

_METRICS = ("global_cos", "token_cos", "knn_agreement")


class AlignError(TrainError):
    """A bad `align` request (options, run directory); the message names the fix."""


@dataclass
class AlignConfig(TrainConfig):
    cache: str = ""
    student: str = ""
    cache_image_root: list[str] = field(default_factory=list)
    view: str | int = "random"
    w_global: float = 1.0
    w_token: float | None = None  # None: 1.0 when the cache holds tokens, else 0
    w_mse: float = 0.0
    token_beta: float = 2.0
    standardize_global: bool = False
    eval_fraction: float = 0.1
    knn_k: int = 10
    knn_backend: str = "auto"
    no_verify: bool = False  # skip the one-time sha256 check of the cache's shards (`cache.integrity`)
    shuffle_targets: bool = False

    command: ClassVar[str] = "align"
    error: ClassVar[type] = AlignError
    required: ClassVar[tuple[str, ...]] = ("cache", "student", "out")
    renamed: ClassVar[dict] = {**TRAIN_RENAMES, "image_root": ("cache_image_root", 1), "eval_pct": ("eval_fraction", 100),
                               "student_size": ("size", 1), "lr_student": ("lr_encoder", 1)}

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.eval_fraction < 1:
            raise AlignError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if isinstance(self.view, str) and self.view != "random":
            if not self.view.isdigit():
                raise AlignError(f"--view takes 'random' or a view index, got {self.view!r}")
            self.view = int(self.view)


def _token_weight(cfg: AlignConfig, cache) -> float:
    if cfg.w_token is None:
        return 1.0 if cache.has_tokens else 0.0
    if cfg.w_token > 0 and not cache.has_tokens:
        raise AlignError(f"{cache.path}: the token loss (--w-token {cfg.w_token}) needs patch tokens, but this cache "
                         "was extracted without them (--no-tokens). Re-extract with --tokens, or pass --w-token 0 to "
                         "align global embeddings only")
    return float(cfg.w_token)


def _forward(loss_fn: AlignLoss, device: torch.device) -> Callable:
    def forward(model, batch: dict, autocast):
        x = batch["image"].to(device, non_blocking=True)
        targets = {k: batch[k].to(device, non_blocking=True) for k in ("embed", "tokens") if k in batch}
        with autocast:
            out = model(x)
        return loss_fn(out, targets), x.shape[0]
    return forward


def train_step(model: torch.nn.Module, loss_fn: AlignLoss, batch: dict, optimizer: torch.optim.Optimizer,
               device: torch.device, params: list[torch.nn.Parameter] | None = None, clip_grad: float = 1.0,
               autocast=None, scaler=None, step: int = 0, epoch: int = 0) -> dict[str, float]:
    """One optimiser step of `align` on a collated batch (``image`` plus ``embed``/``tokens`` targets), exactly
    as the engine runs it (`train.engine.train_step`); the benchmarks time this. Returns the logged values."""
    return engine_step(model, _forward(loss_fn, device), batch, optimizer, device, params, clip_grad, autocast,
                       scaler, step, epoch)[0]


class AlignTask(Task):
    """Stage I for the engine: the student + heads, cached views in, the alignment losses out."""

    def __init__(self, cfg: AlignConfig, cache, model: AlignModel, loss_fn: AlignLoss, train_ds: CachedViews,
                 eval_ds: CachedViews, device: torch.device, facts: dict):
        self.cfg, self.cache, self.model, self.loss_fn, self.device = cfg, cache, model, loss_fn, device
        self.train_ds, self.eval_ds, self.facts = train_ds, eval_ds, facts
        self.eval_loader = DataLoader(eval_ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                      collate_fn=collate, pin_memory=device.type == "cuda",
                                      prefetch_factor=4 if cfg.num_workers > 0 else None)
        self.forward = _forward(loss_fn, device)

    def param_groups(self, cfg: AlignConfig) -> list[dict]:
        lr_encoder = cfg.lr if cfg.lr_encoder is None else cfg.lr_encoder
        return param_groups([("student", self.model.student), ("heads", self.model.heads)], [lr_encoder, cfg.lr],
                            cfg.weight_decay)

    def resolved(self) -> dict:
        return self.facts

    def batches(self, start: int, plan):
        sampler = StepBatches(len(self.train_ds), self.cfg.batch_size, mix_seed(self.cfg.seed, "align"), start,
                              plan.total, dist.rank(), dist.world_size())
        return iter(DataLoader(self.train_ds, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                               collate_fn=collate, pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                               prefetch_factor=4 if self.cfg.num_workers > 0 else None))

    def evaluate(self, model, autocast) -> dict | None:
        """Held-out metrics on rank 0 (the slice is small; other ranks wait at the next barrier)."""
        if len(self.eval_ds) == 0:
            return None
        return evaluate(model, self.eval_loader, self.device, self.cfg.knn_k, self.cfg.knn_backend, autocast)

    def eval_message(self, m: dict) -> str:
        return f"held-out global cos {m.get('global_cos', float('nan')):.4f}"

    def finish(self, model, records: list[dict], step: int) -> dict:
        save_encoder(model.student, self.cfg.out, extra={"cache": str(self.cache.path),
                                                         "teacher": self.cache.manifest.get("teacher", {}).get("spec")})
        evals = [r for r in records if r.get("type") == "eval"]
        if not evals:
            return {}
        return {**{k: evals[-1].get(k) for k in _METRICS}, "initial": {k: evals[0].get(k) for k in _METRICS}}


def _model(cfg: AlignConfig, cache, loss_fn: AlignLoss, resuming: bool, device) -> tuple[AlignModel, int | None]:
    seed_everything(cfg.seed)
    try:
        student = build_encoder(cfg.student, pretrained_ok=not resuming, size=cfg.size, trust_code=cfg.trust_code)
    except (ValueError, FileNotFoundError) as e:
        raise AlignError(f"--student {cfg.student}: {e}") from e
    token_dim = cache.token_shape[1] if loss_fn.uses_tokens else None
    heads = AlignHeads(student.pooled_dim, student.grid_dim, cache.embed_dim, token_dim, cache.token_grid)
    return AlignModel(student, heads).to(device), token_dim


def _datasets(cfg: AlignConfig, cache, paths, train_rows, eval_rows, input_cfg, tokens: bool, store=None):
    image_rows = np.arange(len(cache))
    if cfg.shuffle_targets:  # control: each training image is shown with another training image's targets
        image_rows[train_rows] = train_rows[np.random.default_rng(cfg.seed).permutation(len(train_rows))]
    # From the training rows only, so the held-out metrics stay held out; recomputed on resume (same numbers).
    stats = embed_stats(cache, train_rows) if cfg.standardize_global else None
    streamed = cache.streamed(("tokens",)) if tokens else None

    def views(rows, view, shown):
        return CachedViews([paths[r] for r in shown[rows]], input_cfg, rows=rows, image_rows=shown[rows],
                           boxes=cache.boxes, embed=cache.embed, embed_stats=stats, streamed=streamed, view=view,
                           seed=cfg.seed, max_pixels=cfg.max_pixels, digests=cache.digests, store=store,
                           sizes=cache.sizes, draft=cfg.view_pixels != "exact")
    return views(train_rows, cfg.view, image_rows), views(eval_rows, 0, np.arange(len(cache))), stats


def run_align(cfg: AlignConfig, on_progress: Callable[[dict], None] | None = None,
              on_status: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) an alignment run; returns the final held-out metrics and run facts.

    ``on_progress`` gets ``{step, total, epoch, loss, img_s}`` after every step (rank 0 only); ``on_status``
    gets one-line messages.
    """
    cfg = dataclasses.replace(cfg, cache_image_root=list(cfg.cache_image_root or []))
    cfg.validate()
    t_start = time.perf_counter()
    dist.init_if_needed()
    device = resolve_device(cfg.device)
    cache = open_cache(cfg.cache, verify=not cfg.no_verify)
    w_token = _token_weight(cfg, cache)
    loss_fn = AlignLoss(cfg.w_global, w_token, cfg.w_mse, cfg.token_beta)
    paths = resolve_paths(cache, parse_image_root(cfg.cache_image_root))
    train_rows, eval_rows = split_rows(cache, cfg.eval_fraction)
    if len(train_rows) == 0:
        raise AlignError(f"{cache.path}: no training rows left after holding out {cfg.eval_fraction:g}; lower "
                         "--eval-fraction")
    deferred = store_may_serve(cache, cfg.view_pixels)
    if not deferred:
        check_images(cache, paths, range(len(cache)))
    ckpt = prepare_run_dir(cfg, Path(cfg.out))
    dist.barrier()

    model, token_dim = _model(cfg, cache, loss_fn, ckpt is not None, device)
    status = on_status if on_status and dist.rank() == 0 else (lambda m: None)
    store, pixels = resolve_view_pixels(cache, cfg.view_pixels, model.student.input_cfg, jitter=False,
                                        verify=not cfg.no_verify, status=status)
    if store is None and deferred:
        check_images(cache, paths, range(len(cache)))
    train_ds, eval_ds, stats = _datasets(cfg, cache, paths, train_rows, eval_rows, model.student.input_cfg,
                                         loss_fn.uses_tokens, store)
    per_rank = len(train_rows) // dist.world_size()
    if per_rank // cfg.batch_size == 0:
        raise AlignError(f"--batch-size {cfg.batch_size} is larger than the {per_rank} training rows per process "
                         f"({len(train_rows)} in all, {dist.world_size()} process(es)); lower --batch-size")
    facts = {"w_token": w_token, "lr_encoder": cfg.lr if cfg.lr_encoder is None else cfg.lr_encoder,
             "train_rows": len(train_rows), "eval_rows": len(eval_rows), "student": model.student.describe(),
             "global_target": "standardized" if stats is not None else "raw",
             "heads": {"embed_dim": cache.embed_dim, "token_dim": token_dim,
                       "token_grid": list(cache.token_grid) if token_dim else None},
             "cache": {"fingerprint": cache.manifest.get("fingerprint"),
                       "teacher": cache.manifest.get("teacher", {}).get("spec"), "rows": len(cache),
                       "views": cache.n_views}, "view_pixels": pixels}
    task = AlignTask(cfg, cache, model, loss_fn, train_ds, eval_ds, device, facts)
    result = fit(task, cfg, run_dir=Path(cfg.out), ckpt=ckpt, device=device,
                 plan=plan_steps(cfg, per_rank // cfg.batch_size), on_progress=on_progress, on_status=on_status)
    result.update({"train_rows": len(train_rows), "eval_rows": len(eval_rows),
                   "seconds": time.perf_counter() - t_start})
    dist.barrier()
    return result

