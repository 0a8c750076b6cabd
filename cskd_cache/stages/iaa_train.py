"""Stage II training shared by `cskd finetune` and `cskd distill`: config plumbing, the model, the loss, the loop.

Both commands train one `IAANet` (an encoder from any student spec + a score head, + a projection head when the
feature-alignment loss is on) on one or two streams of `ViewImages`:

- ``labelled``: train-split labels. Distribution head (the dataset has K-bin votes): EMD to the label
  distribution. Scalar head (score only): MSE to the score on 0..1 over the dataset's scale
  (`iaa_model.to_unit`), + ``w_plcc`` x (1 - PLCC) when asked;
- ``unlabelled`` (distill only): cached views with the teacher's prediction on that exact view. Distribution:
  EMD between the softmaxed student and teacher logits, or KL(teacher || student) at a temperature
  (``distill_loss``); scalar: MSE to the teacher's 0..1 score. Weighted by ``lambda_u``;
- feature alignment (distill, ``lambda_f`` > 0): 1 - cos(Linear(pooled), cached CLIP embedding of the shown
  view) on every item that has one (unlabelled items and labelled items linked to the cache).

Each step takes ``batch_size`` labelled items and ``round(batch_size * unlabelled_ratio)`` unlabelled ones and runs
them through the model as one batch. An epoch is one pass over the main stream (unlabelled when there is one,
else labelled); the other stream cycles as often as needed. Batches are a pure function of the step
(`iaa_data_sets.StepBatches`), so a resumed run reaches the same weights as an uninterrupted one.

Validation: the val split, eval view only (`iaa_data_sets.eval_tensor`), at step 0 and after every epoch;
SRCC, PLCC, MAE, accuracy at the dataset threshold (and EMD with a distribution head on a binned dataset), on the
native score scale, as ``{"type": "eval", "split": "val", ...}`` lines in metrics.jsonl. ``keep="best"`` (the
default) writes iaa_model.* whenever val SRCC improves on every earlier epoch (step 0 does not count), so the
final model is the best-by-val-SRCC epoch; ``keep="last"`` (or no val images) writes the final weights. The
test split is never read.

Defaults: AdamW lr 1e-3 for the heads and the encoder (``lr_encoder`` overrides the encoder's: lower it, e.g.
1e-4, when fine-tuning a pretrained or aligned encoder), weight decay 0.05 (not on biases/norms), 5 % linear
warm-up then cosine to 1 %, gradient clipping at 1.0, no weight EMA (``ema`` = DECAY > 0 validates and saves an
exponential moving average of the weights instead, `ema`), AMP (bf16, else fp16 + scaler) on CUDA only, 10 epochs
unless ``max_steps``, batch 32, seed 0. RUN_DIR holds config.yaml, metrics.jsonl, loss_curve.png (train loss and
val SRCC), checkpoints/epoch-NNNN/ (the newest ``keep_checkpoints``) and iaa_model.json + iaa_model.safetensors
(`iaa_model.load_iaa_model`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import dist
from ..train.ema import ModelEma
from ..labels import load_labels
from ..labels.labelset import LabelSet, hash_unit
from ..data.datasets import EVAL_VIEW, StepBatches, ViewImages, collate, mix_seed
from ..models.scorer import IAAScorer, build_head, save_iaa_model, to_unit
from ..data.images import DEFAULT_MAX_PIXELS
from ..outdir import claim_out_dir
from ..losses.cosine import CosineLoss
from ..losses.emd import EMDLoss
from ..losses.kl import DistillKLLoss
from ..losses.plcc_loss import PLCCLoss
from ..evaluate.metrics import evaluate_predictions
from ..train.engine import (
    MetricsWriter, all_reduce_mean, autocast_for, check_finite, cosine_schedule, json_safe, latest_checkpoint,
    load_checkpoint, param_groups, plot_losses, read_metrics, save_checkpoint, unwrap, wrap_ddp, write_config,
)

__all__ = ["TrainError", "IAATrainConfig", "IAANet", "Stream", "prepare_labels", "prepare_run_dir", "resolve_head",
           "label_targets", "train_iaa", "keep_fraction"]

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss_curve.png"
CKPT_DIR = "checkpoints"

# Settings a resumed run may change: they decide how, not what, is computed.
_RESUMABLE = {"resume", "num_workers", "device", "log_every", "keep_checkpoints", "eval_batch_size", "trust_code",
              "no_verify"}


class TrainError(ValueError):
    """A bad finetune/distill request (options, labels, run directory); the message names the fix."""


@dataclass
class IAATrainConfig:
    """Options shared by finetune and distill (each adds its own; see their modules)."""

    labels: str = ""
    out: str = ""
    image_root: str | None = None  # where the label reader looks for images (its default: beside the labels)
    val_fraction: float = 0.05
    split_seed: int = 0
    label_fraction: float = 1.0
    label_seed: int = 0
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    size: int | None = None
    head: str = "auto"
    lr: float = 1e-3
    lr_encoder: float | None = None
    weight_decay: float = 0.05
    warmup_pct: float = 5.0
    min_lr_pct: float = 1.0
    clip_grad: float = 1.0
    w_plcc: float = 0.0
    keep: str = "best"
    ema: float = 0.0
    eval_batch_size: int | None = None
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    trust_code: bool = False  # allow py: specs found inside run: directories (`trust`)
    keep_checkpoints: int = 2
    log_every: int = 10
    max_pixels: int = DEFAULT_MAX_PIXELS

    error = TrainError
    command = "train"
    required = ("labels", "out")

    @classmethod
    def from_dict(cls, d: dict):
        """Keys are field names (dashes allowed); a run's config.yaml works too (its `resolved` part is ignored)."""
        d = {str(k).replace("-", "_"): v for k, v in (d or {}).items() if k != "resolved"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise cls.error(f"unknown {cls.command} config keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, **overrides):
        """Defaults <- YAML file <- overrides (the CLI passes only the flags given on its command line)."""
        import yaml

        base = {}
        if path:
            try:
                base = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise cls.error(f"--config {path}: cannot read it ({e})") from e
            if not isinstance(base, dict):
                raise cls.error(f"--config {path}: expected a mapping of option: value")
        return cls.from_dict({**{str(k).replace("-", "_"): v for k, v in base.items()}, **overrides})

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    def validate(self) -> None:
        err = self.error
        for name in self.required:
            if not getattr(self, name):
                raise err(f"--{name.replace('_', '-')} is required")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise err("--epochs and --max-steps must be >= 1")
        if self.batch_size < 1:
            raise err("--batch-size must be >= 1")
        if not 0 < self.label_fraction <= 1:
            raise err(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise err(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.head not in ("auto", "distribution", "scalar"):
            raise err(f"--head must be auto, distribution or scalar, got {self.head!r}")
        if self.keep not in ("best", "last"):
            raise err(f"--keep must be best or last, got {self.keep!r}")
        if not 0 <= self.warmup_pct <= 100 or not 0 <= self.min_lr_pct <= 100:
            raise err("--warmup-pct and --min-lr-pct are percentages in [0, 100]")
        if self.lr <= 0 or (self.lr_encoder is not None and self.lr_encoder < 0):
            raise err("--lr must be > 0 and --lr-encoder >= 0")
        if self.w_plcc < 0:
            raise err("--w-plcc must be >= 0")
        if not 0 <= self.ema < 1:
            raise err(f"--ema must be in [0, 1) (0 = off; e.g. 0.998), got {self.ema}")


# ---------------------------------------------------------------------------------------------------- labels


def keep_fraction(labels: LabelSet, fraction: float, seed: int) -> LabelSet:
    """Keep the labels whose key hashes below ``fraction``: stable per key, and nested (the 10 % subset lies
    inside the 20 % subset of the same seed), so label-fraction sweeps compare like with like."""
    if fraction >= 1:
        return labels
    return dataclasses.replace(labels, labels=[lb for lb in labels.labels
                                               if hash_unit(lb.key, 7919 + seed) < fraction])


def prepare_labels(cfg: IAATrainConfig) -> tuple[LabelSet, LabelSet, LabelSet]:
    """(all labels, train labels after --label-fraction, val labels)."""
    try:
        labels = load_labels(cfg.labels, image_root=cfg.image_root, val_fraction=cfg.val_fraction,
                             seed=cfg.split_seed)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise cfg.error(str(e)) from e
    # Broken files are dropped after the fraction is drawn, so a bad download never shifts which labels it keeps.
    train = keep_fraction(labels.split("train"), cfg.label_fraction, cfg.label_seed).drop_unreadable()
    if not train.labels:
        raise cfg.error(f"{cfg.labels}: no train labels left ({labels.summary()}, --label-fraction "
                        f"{cfg.label_fraction}); check the split column or raise --label-fraction")
    return labels, train, labels.split("val").drop_unreadable()


def resolve_head(cfg: IAATrainConfig, labels: LabelSet) -> tuple[str, int | None]:
    if cfg.head == "distribution" or (cfg.head == "auto" and labels.bins):
        if not labels.bins:
            raise cfg.error(f"{labels.name} has scores but no vote distributions: use --head scalar (or auto)")
        return "distribution", int(labels.bins)
    return "scalar", None


def label_targets(labels: LabelSet, kind: str) -> dict[str, np.ndarray]:
    out = {"unit": np.asarray(to_unit(labels.scores(), labels.scale), np.float32)}
    if kind == "distribution":
        out["dist"] = labels.dists().astype(np.float32)
    return out


def labels_meta(labels: LabelSet) -> dict:
    return {"name": labels.name, "scale": list(labels.scale), "bins": labels.bins, "threshold": labels.threshold}


# ---------------------------------------------------------------------------------------------------- run dir


def prepare_run_dir(cfg: IAATrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix two runs in one directory."""
    import yaml

    saved = run_dir / CONFIG_NAME
    claim_out_dir(run_dir, CONFIG_NAME, f"{cfg.command} run", cfg.error)
    if not saved.exists():
        return None
    if not cfg.resume:
        raise cfg.error(f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out")
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    if old.get("resolved", {}).get("command", cfg.command) != cfg.command:
        raise cfg.error(f"{run_dir} holds a `{old['resolved']['command']}` run, not `{cfg.command}`; choose a new --out")
    new = cfg.to_dict()
    diff = sorted(k for k in new if k not in _RESUMABLE and json_safe(old.get(k)) != new[k])
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise cfg.error(f"{run_dir}: --resume with different settings ({shown}); repeat the original options "
                        "or start a new --out")
    return latest_checkpoint(run_dir / CKPT_DIR)


# ---------------------------------------------------------------------------------------------------- model


class IAANet(nn.Module):
    """encoder (StudentEncoder) + score head (+ ``proj``: pooled -> cached-embedding width, for lambda_f).
    forward(x) -> (head output, projected embedding or None). Exactly the trainable module DDP wraps."""

    def __init__(self, encoder: nn.Module, head: nn.Module, proj: nn.Module | None = None):
        super().__init__()
        self.encoder, self.head, self.proj = encoder, head, proj

    def forward(self, x: torch.Tensor):
        pooled, _ = self.encoder(x)
        return self.head(pooled), (self.proj(pooled) if self.proj is not None else None)


@dataclass
class Stream:
    name: str  # "labelled" or "unlabelled"
    dataset: ViewImages
    batch_size: int


class IAALoss(nn.Module):
    """The Stage II objective (module docstring); returns unweighted parts and the weighted ``loss``."""

    def __init__(self, kind: str, w_plcc: float = 0.0, lambda_u: float = 0.0, lambda_f: float = 0.0,
                 distill_loss: str = "emd", temperature: float = 1.0):
        super().__init__()
        self.kind, self.w_plcc, self.lambda_u, self.lambda_f = kind, w_plcc, lambda_u, lambda_f
        self.distill_loss = distill_loss
        self.emd, self.plcc, self.cos = EMDLoss(), PLCCLoss(), CosineLoss()
        self.kl = DistillKLLoss(temperature, teacher="logits")

    def forward(self, out: torch.Tensor, emb: torch.Tensor | None, lab: dict, unl: dict | None) -> dict:
        n = lab["image"].shape[0]
        o_l = out[:n].float()
        parts = {}
        if self.kind == "distribution":
            parts["sup"] = self.emd(o_l.softmax(-1), lab["dist"])
        else:
            parts["sup"] = F.mse_loss(o_l, lab["unit"])
            if self.w_plcc:
                parts["plcc"] = self.plcc(o_l, lab["unit"])
        if unl is not None:
            o_u = out[n:].float()
            if self.kind == "distribution":
                parts["distill"] = (self.emd(o_u.softmax(-1), unl["logits"].softmax(-1)) if self.distill_loss == "emd"
                                    else self.kl(o_u, unl["logits"]))
            else:
                parts["distill"] = F.mse_loss(o_u, unl["score"])
        if self.lambda_f:
            batches = [lab] + ([unl] if unl is not None else [])
            mask = torch.cat([b["has_embed"] for b in batches])
            target = torch.cat([b["embed"] for b in batches])
            # no linked item in this batch: a zero that still touches proj, so DDP sees its gradient
            parts["feat"] = self.cos(emb[mask], target[mask]) if mask.any() else emb.sum() * 0.0
        weights = {"sup": 1.0, "plcc": self.w_plcc, "distill": self.lambda_u, "feat": self.lambda_f}
        parts["loss"] = sum(weights[k] * v for k, v in parts.items())
        return parts


# ---------------------------------------------------------------------------------------------------- eval


def _clean(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


@torch.no_grad()
def evaluate_val(model: IAANet, loader: DataLoader, device, autocast, kind: str, labels: LabelSet) -> dict:
    """Val metrics on the native scale, with the same score mapping as `IAAScorer` (what evaluate will see)."""
    was = model.training
    model.eval()
    outs = []
    for batch in loader:
        with autocast:
            out, _ = model(batch["image"].to(device, non_blocking=True))
        outs.append(out.float().cpu())
    model.train(was)
    head_out = torch.cat(outs)
    mapped = IAAScorer(None, {"head": {"kind": kind}, "labels": {"scale": list(labels.scale)}}).outputs(head_out)
    pred = mapped["score"].numpy().astype(np.float64)
    if not np.isfinite(pred).all():
        return {"n": len(pred), "srcc": None, "plcc": None, "nonfinite": True}
    dist_true = labels.dists() if kind == "distribution" and labels.bins else None
    dist_pred = mapped["dist"].numpy() if dist_true is not None else None
    return _clean(evaluate_predictions(labels.scores(), pred, labels.threshold, dist_true, dist_pred))


def _srcc_key(m: dict | None) -> float:
    v = (m or {}).get("srcc")
    return -math.inf if v is None else float(v)


def plot_curve(metrics_path: Path, png_path: Path) -> None:
    """Training loss per step and val SRCC per epoch, one PNG."""
    plot_losses(metrics_path, png_path, metric="srcc", label="val SRCC")


# ---------------------------------------------------------------------------------------------------- loop


def _loader(stream: Stream, cfg: IAATrainConfig, start: int, total: int, rank: int, world: int, device) -> DataLoader:
    sampler = StepBatches(len(stream.dataset), stream.batch_size, mix_seed(cfg.seed, stream.name), start, total,
                          rank, world)
    # Own generator: creating the iterator must not draw from the global torch RNG, whose state the checkpoints
    # carry (a resumed run creates its iterator at another point of the run).
    return DataLoader(stream.dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", generator=torch.Generator(),
                      prefetch_factor=4 if cfg.num_workers > 0 else None)


def train_iaa(cfg: IAATrainConfig, *, run_dir: Path, ckpt: Path | None, encoder, kind: str, bins: int | None,
              labels: LabelSet, val_labels: LabelSet, streams: list[Stream], val: ViewImages | None, device,
              lambda_u: float = 0.0, lambda_f: float = 0.0, embed_dim: int | None = None,
              distill_loss: str = "emd", temperature: float = 1.0, resolved: dict | None = None,
              extra_meta: dict | None = None, on_progress: Callable[[dict], None] | None = None,
              on_status: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) one IAA run; returns the run summary (see finetune / distill for its keys)."""
    status = on_status or (lambda m: None)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    main_stream = streams[-1]
    per_rank = len(main_stream.dataset) // world
    if per_rank == 0:
        raise cfg.error(f"{len(main_stream.dataset)} {main_stream.name} items cannot feed {world} processes")
    steps_per_epoch = max(1, per_rank // main_stream.batch_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total / steps_per_epoch)
    warmup = round(total * cfg.warmup_pct / 100)
    schedule = cosine_schedule(total, warmup, final=cfg.min_lr_pct / 100)

    head = build_head(kind, encoder.pooled_dim, bins)
    proj = nn.Linear(encoder.pooled_dim, embed_dim) if lambda_f > 0 else None
    model = IAANet(encoder, head, proj).to(device)
    ema = ModelEma(model, cfg.ema) if cfg.ema else None
    lr_enc = cfg.lr if cfg.lr_encoder is None else cfg.lr_encoder
    heads = nn.ModuleList([m for m in (head, proj) if m is not None])
    optimizer = torch.optim.AdamW(param_groups([("encoder", model.encoder), ("heads", heads)], [lr_enc, cfg.lr],
                                               cfg.weight_decay))
    autocast, scaler = autocast_for(device, cfg.amp)
    loss_fn = IAALoss(kind, cfg.w_plcc, lambda_u if len(streams) > 1 else 0.0, lambda_f, distill_loss, temperature)
    metrics = MetricsWriter(run_dir / METRICS_NAME, enabled=main)
    keep = cfg.keep if val is not None and len(val) >= 2 else "last"
    head_meta = {"kind": kind, "bins": bins, "in_dim": encoder.pooled_dim, "normalize": False}
    meta_extra = {"trained_by": f"cskd {cfg.command}", "eval_view": dict(EVAL_VIEW), **(extra_meta or {})}

    step, best = 0, None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scaler)
        step = int(state["step"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        metrics.truncate_after(step)
        done = [r for r in read_metrics(run_dir / METRICS_NAME) if r.get("type") == "eval" and r.get("epoch", 0) > 0]
        best = max(done, key=_srcc_key, default=None) if keep == "best" else None
        status(f"resuming {run_dir} from {ckpt.name} (step {step} of {total})")
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_NAME).unlink(missing_ok=True)
        res = {"command": cfg.command, "head": head_meta, "labels": labels_meta(labels), "keep": keep,
               "lr_encoder": lr_enc, "steps_per_epoch": steps_per_epoch, "total_steps": total, "epochs": n_epochs,
               "warmup_steps": warmup, "world_size": world, "encoder": encoder.describe(),
               "streams": {s.name: {"items": len(s.dataset), "batch_size": s.batch_size} for s in streams},
               "val_labels": len(val) if val is not None else 0, **(resolved or {})}
        write_config(run_dir / CONFIG_NAME, {**cfg.to_dict(), "resolved": json_safe(res)})

    eval_loader = None
    if val is not None and len(val) >= 2:
        eval_loader = DataLoader(val, batch_size=cfg.eval_batch_size or cfg.batch_size, num_workers=cfg.num_workers,
                                 collate_fn=collate)
    elif main:
        status("fewer than 2 val labels: no validation, the final weights are kept")

    def run_eval(epoch: int) -> dict | None:
        if not main or eval_loader is None:
            return None
        t0 = time.perf_counter()
        m = evaluate_val(scored(), eval_loader, device, autocast, kind, val_labels)
        rec = {"type": "eval", "split": "val", "step": step, "epoch": epoch, **m, "eval_s": time.perf_counter() - t0}
        metrics.write(rec)
        srcc = "-" if m.get("srcc") is None else f"{m['srcc']:.4f}"
        status(f"epoch {epoch} step {step}: val SRCC {srcc}")
        return rec

    def scored() -> IAANet:
        """The weights that are validated and saved: the EMA when there is one."""
        return ema.module if ema is not None else unwrap(model)

    def save_model(rec: dict | None, epoch: int) -> None:
        save_iaa_model(run_dir, scored().encoder, scored().head, head_meta, labels_meta(labels),
                       extra={**meta_extra, "epoch": epoch, "step": step, "keep": keep,
                              "val": {k: v for k, v in (rec or {}).items() if k not in ("type", "eval_s")}})

    if ckpt is None:
        run_eval(0)
    model = wrap_ddp(model, device)
    loaders = [_loader(s, cfg, step, total, rank, world, device) for s in streams]
    params = [p for p in model.parameters() if p.requires_grad]
    t_log, n_log, last = time.perf_counter(), 0, {}
    model.train()
    for batches in zip(*loaders):
        epoch = step // steps_per_epoch
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * schedule[step]
        batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]
        lab, unl = batches[0], (batches[1] if len(batches) > 1 else None)
        x = torch.cat([b["image"] for b in batches])
        with autocast:
            out, emb = model(x)
        parts = loss_fn(out, emb, lab, unl)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(parts["loss"]).backward()
            scaler.unscale_(optimizer)
        else:
            parts["loss"].backward()
        values = {k: float(v.detach()) for k, v in parts.items()}
        if cfg.clip_grad > 0:
            values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        values = all_reduce_mean(values, device)
        check_finite({k: v for k, v in values.items() if scaler is None or k != "grad_norm"}, step, epoch,
                     lr_flags="--lr (or --lr-encoder)")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        if ema is not None:
            ema.update(unwrap(model), step)
        n_log += x.shape[0] * world
        if main and (step % cfg.log_every == 0 or step == total):
            elapsed = time.perf_counter() - t_log
            last = {"type": "train", "step": step, "epoch": epoch, "lr": optimizer.param_groups[-1]["lr"], **values,
                    "img_s": n_log / elapsed if elapsed > 0 else None}
            metrics.write(last)
            t_log, n_log = time.perf_counter(), 0
        if main and on_progress:
            on_progress({"step": step, "total": total, "epoch": epoch, "loss": values["loss"],
                         "img_s": last.get("img_s")})
        if step % steps_per_epoch == 0 or step == total:
            done_epoch = math.ceil(step / steps_per_epoch)
            rec = run_eval(done_epoch)
            if main and keep == "best" and rec is not None and (best is None or _srcc_key(rec) > _srcc_key(best)):
                best = rec
                save_model(rec, done_epoch)
            if main:
                extra = {"config": cfg.to_dict(), **({"ema": ema.state_dict()} if ema is not None else {})}
                save_checkpoint(run_dir / CKPT_DIR, done_epoch, model, optimizer, scaler, step, extra=extra,
                                keep=cfg.keep_checkpoints)
            dist.barrier()

    result = {"run_dir": str(run_dir), "command": cfg.command, "step": step, "epochs": n_epochs,
              "steps_per_epoch": steps_per_epoch, "keep": keep, "head": kind, "bins": bins}
    if main:
        evals = [r for r in read_metrics(run_dir / METRICS_NAME) if r.get("type") == "eval"]
        final = evals[-1] if evals and evals[-1].get("epoch", 0) > 0 else None
        if keep == "last" or best is None:
            best = final
            save_model(final, n_epochs)
        strip = ("type", "eval_s", "split")
        result["val"] = {k: v for k, v in (best or {}).items() if k not in strip} or None
        result["val_last"] = {k: v for k, v in (final or {}).items() if k not in strip} or None
        init = [r for r in evals if r.get("epoch") == 0]
        result["initial"] = {k: v for k, v in init[0].items() if k not in strip} if init else None
        result["best_epoch"] = (best or {}).get("epoch")
        plot_curve(run_dir / METRICS_NAME, run_dir / CURVE_NAME)
    dist.barrier()
    return result
