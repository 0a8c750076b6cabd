"""Stage I, `cskd align`: teach any student encoder to reproduce the teacher's cached features.

The teacher is never loaded: targets come from the cache, inputs are each row's cached view rebuilt from the
original image at the student's own size (`align_data`). The trainable module is the student plus two heads
created from the widths (`heads.AlignModel`): a projection of the pooled feature to the teacher's embedding
width and a 1x1 token head from the student's grid (resampled to the cached grid) to the token width.

Defaults (every one is an `AlignConfig` field, settable from a YAML ``--config`` and overridden by flags):

- losses: global cosine weight 1.0 (to the raw cached embedding; with ``standardize_global`` to the embedding
  standardised per dimension by the training rows' mean and std, `align_data`); token smooth-L1 on LayerNorm-whitened tokens 1.0 when the cache holds
  tokens, else 0 (asking for it on a cache without tokens is an error); MSE 0; token smooth-L1 beta 2.0.
- optimiser: AdamW, lr 1e-3 for the heads and the student (``lr_student`` overrides the student's), weight decay
  0.05 (not on biases/norms), linear warm-up over 5% of the steps then cosine to 1% of the lr, gradient clipping
  at norm 1.0; AMP (bf16, else fp16 with a scaler) on CUDA only.
- 10 epochs unless ``max_steps`` is set (then it decides), batch size 32, seed 0.
- evaluation: 10% of the rows held out by key hash, at step 0 and after every epoch (see `align_eval`).

RUN_DIR gets config.yaml (this config plus what was resolved from it), metrics.jsonl (one JSON object per line:
``type`` train or eval), checkpoints/epoch-NNNN/{model.safetensors, state.pt} after each epoch (the newest
``keep_checkpoints``), student.safetensors + student.json (load with `cskd_cache.load_encoder(RUN_DIR)` or the
spec ``run:RUN_DIR``) and loss_curve.png. ``resume`` continues from the newest checkpoint to the same weights
an uninterrupted run reaches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import dist
from ..outdir import claim_out_dir
from ..cache.paths import AlignDataset, check_images, collate, embed_stats, parse_image_root, resolve_paths
from .align_eval import evaluate, split_rows
from ..models.runs import save_encoder
from ..models.align_heads import AlignHeads, AlignModel
from ..data.images import DEFAULT_MAX_PIXELS
from ..losses import AlignLoss
from ..cache.reader import open_cache
from ..models.students import build_student
from ..train.engine import (
    MetricsWriter, all_reduce_mean, autocast_for, check_finite, cosine_schedule, json_safe, latest_checkpoint,
    load_checkpoint, param_groups, plot_losses, read_metrics, resolve_device, save_checkpoint, seed_everything,
    unwrap, wrap_ddp, write_config,
)

__all__ = ["AlignConfig", "AlignError", "run_align", "train_step"]

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss_curve.png"
CKPT_DIR = "checkpoints"

# Settings a resumed run may change: they decide how, not what, is computed.
_RESUMABLE = {"resume", "num_workers", "device", "log_every", "keep_checkpoints", "trust_code", "no_verify"}


class AlignError(ValueError):
    """A bad `align` request (options, run directory); the message names the fix."""


@dataclass
class AlignConfig:
    cache: str = ""
    student: str = ""
    out: str = ""
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    student_size: int | None = None
    image_root: list[str] = field(default_factory=list)
    view: str | int = "random"
    w_global: float = 1.0
    w_token: float | None = None  # None: 1.0 when the cache holds tokens, else 0
    w_mse: float = 0.0
    token_beta: float = 2.0
    standardize_global: bool = False
    lr: float = 1e-3
    lr_student: float | None = None  # None: same as lr
    weight_decay: float = 0.05
    warmup_pct: float = 5.0
    min_lr_pct: float = 1.0
    clip_grad: float = 1.0
    eval_pct: float = 10.0
    knn_k: int = 10
    knn_backend: str = "auto"
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    trust_code: bool = False  # allow a py: spec found inside a run: student's directory (`trust`)
    no_verify: bool = False  # skip the one-time sha256 check of the cache's shards (`integrity`)
    keep_checkpoints: int = 2
    log_every: int = 10
    shuffle_targets: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_dict(cls, d: dict) -> AlignConfig:
        """Keys are field names (dashes allowed); a run's config.yaml works too (its `resolved` part is ignored)."""
        d = {str(k).replace("-", "_"): v for k, v in (d or {}).items() if k != "resolved"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise AlignError(f"unknown align config keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, **overrides) -> AlignConfig:
        """Defaults <- YAML file <- overrides (the CLI passes only the flags given on its command line)."""
        import yaml

        base = {}
        if path:
            try:
                base = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise AlignError(f"--config {path}: cannot read it ({e})") from e
            if not isinstance(base, dict):
                raise AlignError(f"--config {path}: expected a mapping of option: value")
        return cls.from_dict({**{k.replace("-", "_"): v for k, v in base.items()}, **overrides})

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    def validate(self) -> None:
        for name in ("cache", "student", "out"):
            if not getattr(self, name):
                raise AlignError(f"--{name} is required")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise AlignError("--epochs and --max-steps must be >= 1")
        if self.batch_size < 1:
            raise AlignError("--batch-size must be >= 1")
        if not 0 <= self.eval_pct < 100:
            raise AlignError(f"--eval-pct must be in [0, 100), got {self.eval_pct}")
        if not 0 <= self.warmup_pct <= 100 or not 0 <= self.min_lr_pct <= 100:
            raise AlignError("--warmup-pct and --min-lr-pct are percentages in [0, 100]")
        if self.lr <= 0 or (self.lr_student is not None and self.lr_student < 0):
            raise AlignError("--lr must be > 0 and --lr-student >= 0")
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


def _prepare_run_dir(cfg: AlignConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix two runs in one directory."""
    import yaml

    saved = run_dir / CONFIG_NAME
    claim_out_dir(run_dir, CONFIG_NAME, "align run", AlignError)
    if not saved.exists():
        return None
    if not cfg.resume:
        raise AlignError(f"{run_dir} already holds an align run; pass --resume to continue it, or choose a new --out")
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = cfg.to_dict()
    diff = sorted(k for k in new if k not in _RESUMABLE and json_safe(old.get(k)) != new[k])
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise AlignError(f"{run_dir}: --resume with different settings ({shown}); repeat the original options "
                         "or start a new --out")
    return latest_checkpoint(run_dir / CKPT_DIR)


def _loader(ds, batch_size, sampler, cfg: AlignConfig, device, drop_last: bool) -> DataLoader:
    # Workers are re-created every epoch (no persistent_workers): each epoch's set_epoch (which cached view
    # every image shows) must reach them, and a persistent worker would keep its stale copy of the dataset.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                      drop_last=drop_last, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if cfg.num_workers > 0 else None)


def train_step(model: torch.nn.Module, loss_fn: AlignLoss, batch: dict, optimizer: torch.optim.Optimizer,
               device: torch.device, params: list[torch.nn.Parameter] | None = None, clip_grad: float = 1.0,
               autocast=None, scaler=None, step: int = 0, epoch: int = 0) -> dict[str, float]:
    """One optimiser step of `align` on a collated batch (``image`` plus ``embed``/``tokens`` targets): forward,
    loss, backward, gradient clipping, the NaN guard and the update, at the learning rates already set on the
    optimizer. Returns the logged values (unweighted loss terms, ``loss``, ``grad_norm`` when clipping), averaged
    over DDP ranks. ``step``/``epoch`` only label a NonFiniteLoss message."""
    x = batch["image"].to(device, non_blocking=True)
    targets = {k: batch[k].to(device, non_blocking=True) for k in ("embed", "tokens") if k in batch}
    with autocast or nullcontext():
        out = model(x)
    parts = loss_fn(out, targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(parts["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        parts["loss"].backward()
    values = {k: float(v.detach()) for k, v in parts.items()}
    if clip_grad > 0:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip_grad))
    values = all_reduce_mean(values, device)
    # Checked before the update, so the weights (and every checkpoint) stay finite. An inf grad norm is
    # routine under an fp16 scaler (it skips that step), so only the loss counts there.
    check_finite({k: v for k, v in values.items() if scaler is None or k != "grad_norm"}, step, epoch)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return values


def run_align(cfg: AlignConfig, on_progress: Callable[[dict], None] | None = None,
              on_status: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) an alignment run; returns the final held-out metrics and run facts.

    ``on_progress`` gets ``{step, total, epoch, loss, img_s}`` after every step (rank 0 only); ``on_status``
    gets one-line messages.
    """
    cfg = dataclasses.replace(cfg, image_root=list(cfg.image_root or []))
    cfg.validate()
    status = on_status or (lambda msg: None)
    t_start = time.perf_counter()
    dist.init_if_needed()
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out)

    cache = open_cache(cfg.cache, verify=not cfg.no_verify)
    w_token = _token_weight(cfg, cache)
    loss_fn = AlignLoss(cfg.w_global, w_token, cfg.w_mse, cfg.token_beta)
    paths = resolve_paths(cache, parse_image_root(cfg.image_root))
    train_rows, eval_rows = split_rows(cache, cfg.eval_pct)
    if len(train_rows) == 0:
        raise AlignError(f"{cache.path}: no training rows left after holding out {cfg.eval_pct}%; lower --eval-pct")
    check_images(cache, paths, range(len(cache)))
    ckpt = _prepare_run_dir(cfg, run_dir)
    dist.barrier()

    seed_everything(cfg.seed)
    try:
        student = build_student(cfg.student, pretrained_ok=ckpt is None, size=cfg.student_size,
                                trust_code=cfg.trust_code)
    except (ValueError, FileNotFoundError) as e:
        raise AlignError(f"--student {cfg.student}: {e}") from e
    token_dim = cache.token_shape[1] if loss_fn.uses_tokens else None
    heads = AlignHeads(student.pooled_dim, student.grid_dim, cache.embed_dim, token_dim, cache.token_grid)
    model = AlignModel(student, heads).to(device)

    image_rows = None
    if cfg.shuffle_targets:  # control: each training image is shown with another training image's targets
        image_rows = np.arange(len(cache))
        image_rows[train_rows] = train_rows[np.random.default_rng(cfg.seed).permutation(len(train_rows))]
    # From the training rows only, so the held-out metrics stay held out; recomputed on resume (same rows, same
    # numbers).
    stats = embed_stats(cache, train_rows) if cfg.standardize_global else None
    train_ds = AlignDataset(cache, train_rows, student.input_cfg, paths, tokens=loss_fn.uses_tokens, view=cfg.view,
                            seed=cfg.seed, image_rows=image_rows, max_pixels=cfg.max_pixels, embed_stats=stats)
    eval_ds = AlignDataset(cache, eval_rows, student.input_cfg, paths, tokens=loss_fn.uses_tokens, view=0,
                           max_pixels=cfg.max_pixels, embed_stats=stats)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=world > 1)
    # Full batches only: BatchNorm cannot train on a batch of one, and equal batches keep DDP ranks in step.
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise AlignError(f"--batch-size {cfg.batch_size} is larger than the {len(sampler)} training rows per process "
                         f"({len(train_rows)} in all, {world} process(es)); lower --batch-size")
    loader = _loader(train_ds, cfg.batch_size, sampler, cfg, device, drop_last=True)
    eval_loader = _loader(eval_ds, cfg.batch_size, None, cfg, device, drop_last=False)

    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total / steps_per_epoch)
    warmup = round(total * cfg.warmup_pct / 100)
    schedule = cosine_schedule(total, warmup, final=cfg.min_lr_pct / 100)
    lr_student = cfg.lr if cfg.lr_student is None else cfg.lr_student
    optimizer = torch.optim.AdamW(param_groups([("student", model.student), ("heads", model.heads)],
                                               [lr_student, cfg.lr], cfg.weight_decay))
    autocast, scaler = autocast_for(device, cfg.amp)
    metrics = MetricsWriter(run_dir / METRICS_NAME, enabled=main)

    start_epoch, step = 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scaler)
        start_epoch, step = int(state["epoch"]), int(state["step"])
        metrics.truncate_after(step)
        status(f"resuming {run_dir} from {ckpt.name} (step {step} of {total})")
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_NAME).unlink(missing_ok=True)
        resolved = {"w_token": w_token, "lr_student": lr_student, "steps_per_epoch": steps_per_epoch,
                    "total_steps": total, "epochs": n_epochs, "warmup_steps": warmup, "world_size": world,
                    "train_rows": len(train_rows), "eval_rows": len(eval_rows), "student": student.describe(),
                    "global_target": "standardized" if stats is not None else "raw",
                    "heads": {"embed_dim": cache.embed_dim, "token_dim": token_dim,
                              "token_grid": list(cache.token_grid) if token_dim else None},
                    "cache": {"fingerprint": cache.manifest.get("fingerprint"),
                              "teacher": cache.manifest.get("teacher", {}).get("spec"), "rows": len(cache),
                              "views": cache.n_views}}
        write_config(run_dir / CONFIG_NAME, {**cfg.to_dict(), "resolved": json_safe(resolved)})
    if ckpt is None:
        _evaluate(model, eval_loader, device, cfg, autocast, metrics, step=0, epoch=0, main=main, status=status)
    model = wrap_ddp(model, device)

    params = [p for p in model.parameters() if p.requires_grad]
    t_log, n_log, last = time.perf_counter(), 0, {}
    for epoch in range(start_epoch, n_epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        model.train()
        for batch in loader:
            if step >= total:
                break
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * schedule[step]
            values = train_step(model, loss_fn, batch, optimizer, device, params=params, clip_grad=cfg.clip_grad,
                                autocast=autocast, scaler=scaler, step=step, epoch=epoch)
            step += 1
            n_log += batch["image"].shape[0] * world
            if main and (step % cfg.log_every == 0 or step == total):
                elapsed = time.perf_counter() - t_log
                last = {"type": "train", "step": step, "epoch": epoch, "lr": optimizer.param_groups[-1]["lr"],
                        **values, "img_s": n_log / elapsed if elapsed > 0 else None}
                metrics.write(last)
                t_log, n_log = time.perf_counter(), 0
            if main and on_progress:
                on_progress({"step": step, "total": total, "epoch": epoch, "loss": values["loss"],
                             "img_s": last.get("img_s")})
        _evaluate(unwrap(model), eval_loader, device, cfg, autocast, metrics, step=step, epoch=epoch + 1,
                          main=main, status=status)
        if main:
            save_checkpoint(run_dir / CKPT_DIR, epoch + 1, model, optimizer, scaler, step,
                            extra={"config": cfg.to_dict()}, keep=cfg.keep_checkpoints)
        dist.barrier()

    result = {"run_dir": str(run_dir), "step": step, "epochs": n_epochs, "train_rows": len(train_rows),
              "eval_rows": len(eval_rows)}
    if main:
        student_final = unwrap(model).student
        save_encoder(student_final, run_dir, extra={"cache": str(cache.path), "teacher":
                                                    cache.manifest.get("teacher", {}).get("spec")})
        plot_losses(run_dir / METRICS_NAME, run_dir / CURVE_NAME)
        evals = [r for r in read_metrics(run_dir / METRICS_NAME) if r.get("type") == "eval"]
        if evals:
            result.update({k: evals[-1].get(k) for k in ("global_cos", "token_cos", "knn_agreement")})
            result["initial"] = {k: evals[0].get(k) for k in ("global_cos", "token_cos", "knn_agreement")}
    result["seconds"] = time.perf_counter() - t_start
    dist.barrier()
    return result


def _evaluate(model, loader, device, cfg: AlignConfig, autocast, metrics: MetricsWriter, step: int, epoch: int,
              main: bool, status) -> dict | None:
    """Held-out metrics on rank 0 (the slice is small; other ranks wait at the next barrier)."""
    if not main or len(loader.dataset) == 0:
        return None
    t0 = time.perf_counter()
    m = evaluate(model, loader, device, cfg.knn_k, cfg.knn_backend, autocast)
    record = {"type": "eval", "step": step, "epoch": epoch, **m, "eval_s": time.perf_counter() - t0}
    metrics.write(record)
    status(f"epoch {epoch} step {step}: held-out global cos {m.get('global_cos', float('nan')):.4f}")
    return record
