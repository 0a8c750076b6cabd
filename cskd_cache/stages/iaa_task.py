"""Stage II for the engine, shared by `cskd finetune` and `cskd distill`: the config, the task, validation.

Both commands train one `models.scorer.IAAModel` (an encoder from any encoder spec + a score head, + a projection
head when the feature-alignment loss is on) on one or two streams of `data.datasets.CachedViews`:

- ``labelled``: train-split labels, with the supervised loss of `losses.iaa.IAALoss`;
- ``unlabelled`` (distill only): cached views with the teacher's prediction on that exact view, weighted by
  ``lambda_u``; with ``lambda_f`` > 0 the projected features also align to the cached CLIP embedding.

Each step takes ``batch_size`` labelled items and ``round(batch_size * unlabelled_ratio)`` unlabelled ones and runs
them through the model as one batch (``bn_stats`` "joint"), or, for a batch-norm student, the labelled items as a
batch of their own and the unlabelled ones as another (``bn_stats`` "separate"; "labelled": that second batch
leaves the running statistics alone; `models.batch_norm`). An epoch is one pass over the main stream (unlabelled
when there is one, else labelled); the other stream cycles as often as needed. Batches are a pure function of the step
(`data.datasets.StepBatches`), so a resumed run reaches the same weights as an uninterrupted one.

Validation: the val split, eval view only (`data.transforms.eval_tensor`), at step 0 and after every epoch;
SRCC, PLCC, MAE, accuracy at the dataset threshold (and EMD with a distribution head on a binned dataset), on the
native score scale, as ``{"type": "eval", "split": "val", ...}`` lines in metrics.jsonl. ``keep="best"`` (the
default) writes iaa_model.* whenever val SRCC improves on every earlier epoch, so the final model is the
best-by-val-SRCC epoch; ``keep="last"`` (or no val images) writes the final weights. The test split is never read.

Where training starts (``head_init``): an encoder spec that names a finetune/distill run (``run:RUN``, a scorer
already trained on labels) starts with that run's score head too ("auto", the default), and then step 0 counts
for ``keep="best"``: the starting model is a candidate like any epoch, so on the val split the kept model is
never below the run it started from (the README's study measures what that buys on test). Any other spec, or
"fresh", starts a new head, and step 0 (a random head) does not count.

Defaults: AdamW lr 1e-3 for the heads and the encoder (``lr_encoder`` overrides the encoder's: lower it, e.g.
1e-4, when fine-tuning a pretrained or aligned encoder), weight decay 0.05 (not on biases/norms), 5 % linear
warm-up then cosine to 1 %, gradient clipping at 1.0, no weight EMA (``ema`` = DECAY > 0 validates and saves an
exponential moving average of the weights instead, `train.ema`), AMP (bf16, else fp16 + scaler) on CUDA only,
10 epochs unless ``max_steps``, batch 32, seed 0. RUN_DIR holds config.yaml, metrics.jsonl, loss_curve.png (train
loss and val SRCC), checkpoints/epoch-NNNN/ (the newest ``keep_checkpoints``) and iaa_model.json +
iaa_model.safetensors (`models.scorer.load_iaa_model`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import dist
from ..data.datasets import CachedViews, StepBatches, collate, mix_seed
from ..data.transforms import EVAL_VIEW
from ..errors import TrainError
from ..evaluate.metrics import evaluate_predictions
from ..labels.labelset import LabelSet
from ..labels.targets import head_fits, head_text, labels_meta, resolve_head, split_labels
from ..losses.attention_distance import AttentionDistanceLoss
from ..losses.iaa import IAALoss
from ..models.attention_probe import AttentionProbe
from ..models.batch_norm import bn_layers, forward_split
from ..models.runs import run_score_head
from ..models.scorer import IAAModel, build_head, head_to_scores, save_iaa_model
from ..train.config import TRAIN_RENAMES, TrainConfig
from ..train.engine import Task, param_groups

__all__ = ["IAATrainConfig", "IAATask", "Stream", "prepare_labels", "evaluate_val", "starting_head",
           "resumed_start"]


@dataclass
class IAATrainConfig(TrainConfig):
    """Options shared by finetune and distill (each adds its own; see their modules)."""

    labels: str = ""
    label_image_root: str | None = None  # where the label reader looks for images (its default: beside the labels)
    val_fraction: float = 0.05
    split_seed: int = 0
    label_fraction: float = 1.0
    label_seed: int = 0
    head: str = "auto"
    w_plcc: float = 0.0
    keep: str = "best"
    eval_batch_size: int | None = None
    head_init: str = "auto"  # "auto": a run: encoder spec of a finetune/distill run keeps its score head; "fresh"

    error: ClassVar[type] = TrainError
    command: ClassVar[str] = "train"
    required: ClassVar[tuple[str, ...]] = ("labels", "out")
    renamed: ClassVar[dict] = {**TRAIN_RENAMES, "image_root": ("label_image_root", 1)}

    def validate(self) -> None:
        super().validate()
        err = self.error
        if not 0 < self.label_fraction <= 1:
            raise err(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise err(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.head not in ("auto", "distribution", "scalar"):
            raise err(f"--head must be auto, distribution or scalar, got {self.head!r}")
        if self.keep not in ("best", "last"):
            raise err(f"--keep must be best or last, got {self.keep!r}")
        if self.head_init not in ("auto", "fresh"):
            raise err(f"--head-init must be auto or fresh, got {self.head_init!r}")
        if self.w_plcc < 0:
            raise err("--w-plcc must be >= 0")


def prepare_labels(cfg: IAATrainConfig) -> tuple[LabelSet, LabelSet, LabelSet, str, int | None]:
    """(all labels, train labels after --label-fraction, val labels, head kind, bins)."""
    labels, train, val = split_labels(cfg.labels, image_root=cfg.label_image_root, val_fraction=cfg.val_fraction,
                                      split_seed=cfg.split_seed, label_fraction=cfg.label_fraction,
                                      label_seed=cfg.label_seed, error=cfg.error)
    kind, bins = resolve_head(cfg.head, labels, cfg.error)
    return labels, train, val, kind, bins


def resumed_start(head_state: dict[str, torch.Tensor] | None,
                  resolved: dict | None) -> dict[str, torch.Tensor] | None:
    """``starting_head``'s answer for a run that may be resuming (``resolved``: its config.yaml's, None for a new
    run): a resumed run starts as its first start did, and one made before ``head_init`` existed started fresh."""
    return head_state if resolved is None or resolved.get("head_init") == "run" else None


def starting_head(cfg: IAATrainConfig, spec: str, flag: str, kind: str, bins: int | None,
                  labels: LabelSet) -> dict[str, torch.Tensor] | None:
    """The score-head weights training starts from (module docstring, ``head_init``), or None for a fresh head.
    A run whose head cannot serve these labels is refused, naming the fix, before the run directory exists."""
    found = run_score_head(spec) if cfg.head_init == "auto" else None
    if found is None:
        return None
    state, meta = found
    h, scale = meta.get("head") or {}, (meta.get("labels") or {}).get("scale")
    if not head_fits(h, kind, bins) or h.get("normalize"):
        raise cfg.error(f"{flag} {spec}: its {head_text(h.get('kind'), h.get('bins'))} cannot start training for "
                        f"{cfg.labels}, which needs a {head_text(kind, bins)}; pass --head-init fresh to train a new "
                        "head on its encoder")
    if scale is None or not np.allclose(scale, labels.scale):
        raise cfg.error(f"{flag} {spec}: its head scores on {scale}, {cfg.labels} on {list(labels.scale)}; pass "
                        "--head-init fresh to train a new head on its encoder")
    return state


@dataclass
class Stream:
    name: str  # "labelled" or "unlabelled"
    dataset: CachedViews
    batch_size: int


def _clean(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}


@torch.no_grad()
def evaluate_val(model: IAAModel, loader: DataLoader, device, autocast, kind: str, labels: LabelSet) -> dict:
    """Val metrics on the native scale, with the same score mapping as `IAAScorer` (what evaluate will see)."""
    was = model.training
    model.eval()
    outs = []
    for batch in loader:
        with autocast:
            out = model(batch["image"].to(device, non_blocking=True))
        outs.append((out[0] if isinstance(out, tuple) else out).float().cpu())
    model.train(was)
    mapped = head_to_scores(torch.cat(outs), kind, labels.scale)
    pred = mapped["score"].numpy().astype(np.float64)
    if not np.isfinite(pred).all():
        return {"n": len(pred), "srcc": None, "plcc": None, "nonfinite": True}
    dist_true = labels.dists() if kind == "distribution" and labels.bins else None
    dist_pred = mapped["dist"].numpy() if dist_true is not None else None
    return _clean(evaluate_predictions(labels.scores(), pred, labels.threshold, dist_true, dist_pred))


def _srcc_key(m: dict | None) -> float:
    v = (m or {}).get("srcc")
    return -math.inf if v is None else float(v)


_STRIP = ("type", "eval_s", "split")


class IAATask(Task):
    """Stage II for the engine (module docstring). ``streams``: labelled first, then unlabelled (distill)."""

    eval_tags = {"split": "val"}
    curve = {"metric": "srcc", "label": "val SRCC"}

    def __init__(self, cfg: IAATrainConfig, *, encoder, kind: str, bins: int | None, labels: LabelSet,
                 val_labels: LabelSet, streams: list[Stream], val: CachedViews | None, device, lambda_u: float = 0.0,
                 lambda_f: float = 0.0, embed_dim: int | None = None, distill_loss: str = "emd",
                 temperature: float = 1.0, facts: dict | None = None, extra_meta: dict | None = None, status=None,
                 consistency: float = 0.0, attn_distance: float = 0.0, attn_reference: list[float] | None = None,
                 attn_teacher: list[float] | None = None, bn_stats: str = "joint",
                 head_state: dict[str, torch.Tensor] | None = None):
        self.cfg, self.kind, self.bins, self.labels, self.val_labels = cfg, kind, bins, labels, val_labels
        self.streams, self.device = streams, device
        head = build_head(kind, encoder.pooled_dim, bins)
        if head_state is not None:  # `starting_head`: a scorer trained on labels, so step 0 is a real candidate
            head.load_state_dict(head_state)
        proj = nn.Linear(encoder.pooled_dim, embed_dim) if lambda_f > 0 else None
        self.model = IAAModel(encoder, head, proj=proj).to(device)
        # --bn-stats separate / labelled (`models.batch_norm`); a student without batch norm gains nothing from two
        # forwards. self.frozen: the layers whose running statistics the unlabelled forward leaves alone
        layers = bn_layers(self.model) if bn_stats != "joint" and len(streams) > 1 else []
        self.split, self.frozen = bool(layers), (layers if bn_stats == "labelled" else [])
        self.loss_fn = IAALoss(kind, cfg.w_plcc, lambda_u if len(streams) > 1 else 0.0, lambda_f, distill_loss,
                               temperature, consistency if len(streams) > 1 else 0.0)
        self.keep = cfg.keep if val is not None and len(val) >= 2 else "last"
        self.count_initial = head_state is not None
        self.head_meta = {"kind": kind, "bins": bins, "in_dim": encoder.pooled_dim, "normalize": False}
        self.meta_extra = {"trained_by": f"cskd {cfg.command}", "eval_view": dict(EVAL_VIEW), **(extra_meta or {})}
        self.facts = {"head": self.head_meta, "labels": labels_meta(labels), "keep": self.keep,
                      "lr_encoder": cfg.lr if cfg.lr_encoder is None else cfg.lr_encoder, "encoder": encoder.describe(),
                      "streams": {s.name: {"items": len(s.dataset), "batch_size": s.batch_size} for s in streams},
                      "val_labels": len(val) if val is not None else 0,
                      "head_init": "run" if head_state is not None else "fresh", **(facts or {})}
        self.attn_distance, self.probe = attn_distance, None
        if attn_distance > 0:
            self.probe = AttentionProbe(encoder)
            if attn_reference is not None:
                ref = attn_reference
            elif attn_teacher is not None:  # relative to uniform attention: rescaled to the student's own grid
                from ..models.attention_stats import depth_matched

                uniform = float(self.probe.dist.double().mean())
                ref = [v * uniform for v in depth_matched(attn_teacher, len(self.probe.sites))]
            else:
                ref = self._reference(streams[-1].dataset)
            self.attn_loss = AttentionDistanceLoss(torch.tensor(ref))
            self.facts["attn_reference"] = [float(v) for v in ref]
        self.eval_loader = None
        if val is not None and len(val) >= 2:
            self.eval_loader = DataLoader(val, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                          num_workers=cfg.num_workers, collate_fn=collate)
        elif dist.rank() == 0 and status:
            status("fewer than 2 val labels: no validation, the final weights are kept")
        self.best = None

    @torch.no_grad()
    def _reference(self, dataset: CachedViews, n: int = 32) -> list[float]:
        """The student's own per-layer attention distances before Stage II (the aligned encoder as it starts), on
        the first ``n`` items of the main stream: a pure function of the data and the starting weights."""
        batch = collate(dataset.__getitems__(list(range(min(n, len(dataset))))))
        encoder = self.model.encoder
        was = encoder.training
        encoder.eval()
        self.probe.start()
        encoder(batch["image"].to(self.device))
        ref = self.probe.profile()
        encoder.train(was)
        return ref.tolist()

    def steps_per_epoch(self) -> int:
        main = self.streams[-1]
        per_rank = len(main.dataset) // dist.world_size()
        if per_rank == 0:
            raise self.cfg.error(f"{len(main.dataset)} {main.name} items cannot feed {dist.world_size()} processes")
        return max(1, per_rank // main.batch_size)

    def param_groups(self, cfg: IAATrainConfig) -> list[dict]:
        heads = nn.ModuleList([m for m in (self.model.head, self.model.proj) if m is not None])
        lr_encoder = cfg.lr if cfg.lr_encoder is None else cfg.lr_encoder
        return param_groups([("encoder", self.model.encoder), ("heads", heads)], [lr_encoder, cfg.lr],
                            cfg.weight_decay)

    def resolved(self) -> dict:
        return self.facts

    def batches(self, start: int, plan):
        loaders = []
        for s in self.streams:
            sampler = StepBatches(len(s.dataset), s.batch_size, mix_seed(self.cfg.seed, s.name), start, plan.total,
                                  dist.rank(), dist.world_size())
            loaders.append(DataLoader(s.dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                                      collate_fn=collate, pin_memory=self.device.type == "cuda",
                                      generator=torch.Generator(),
                                      prefetch_factor=4 if self.cfg.num_workers > 0 else None))
        return zip(*loaders)

    def forward(self, model, batches, autocast):
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]
        lab, unl = batches[0], (batches[1] if len(batches) > 1 else None)
        images = [b["image"] for b in batches] + ([unl["image2"]] if unl is not None and "image2" in unl else [])
        x = torch.cat(images)
        if self.probe is not None:
            self.probe.start()
        out, emb = self._run(model, x, lab["image"].shape[0], autocast)
        n = sum(b["image"].shape[0] for b in batches)  # the second views come last, for consistency only
        out2 = out[n:] if len(images) > len(batches) else None
        parts = self.loss_fn(out[:n], emb[:n] if emb is not None else None, lab, unl, out2)
        if self.probe is not None:  # the attention weights of this very forward
            parts["attn_distance"] = self.attn_loss(self.probe.profile())
            parts["loss"] = parts["loss"] + self.attn_distance * parts["attn_distance"]
        return parts, x.shape[0]

    def _run(self, model, x: torch.Tensor, n_lab: int, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(outputs, projected features or None) of every item of x, labelled items first. With ``bn_stats``
        separate or labelled, the labelled items form a batch of their own and the rest another (with labelled, one
        that leaves the running statistics alone)."""
        if self.split:
            outs = forward_split(model, x, n_lab, self.frozen, autocast)
        else:
            with autocast:
                outs = [model(x)]
        outs = [o if isinstance(o, tuple) else (o, None) for o in outs]
        out = torch.cat([o for o, _ in outs])
        return out, (torch.cat([e for _, e in outs]) if outs[0][1] is not None else None)

    def evaluate(self, model, autocast) -> dict | None:
        if self.eval_loader is None:
            return None
        return evaluate_val(model, self.eval_loader, self.device, autocast, self.kind, self.val_labels)

    def eval_message(self, m: dict) -> str:
        return f"val SRCC {'-' if m.get('srcc') is None else format(m['srcc'], '.4f')}"

    def on_resume(self, records: list[dict]) -> None:
        first = 0 if self.count_initial else 1
        done = [r for r in records if r.get("type") == "eval" and r.get("epoch", 0) >= first]
        self.best = max(done, key=_srcc_key, default=None) if self.keep == "best" else None

    def _save(self, model: IAAModel, record: dict | None, epoch: int, step: int) -> None:
        save_iaa_model(Path(self.cfg.out), model.encoder, model.head, self.head_meta, labels_meta(self.labels),
                       extra={**self.meta_extra, "epoch": epoch, "step": step, "keep": self.keep,
                              "val": {k: v for k, v in (record or {}).items() if k not in ("type", "eval_s")}})

    def on_eval(self, record: dict | None, epoch: int, step: int, model) -> None:
        if epoch == 0 and not self.count_initial:  # a fresh head's step 0 is no candidate
            return
        if self.keep == "best" and record is not None and (self.best is None or
                                                           _srcc_key(record) > _srcc_key(self.best)):
            self.best = record
            self._save(model, record, epoch, step)

    def finish(self, model, records: list[dict], step: int) -> dict:
        evals = [r for r in records if r.get("type") == "eval"]
        final = evals[-1] if evals and evals[-1].get("epoch", 0) > 0 else None
        best = self.best
        if self.keep == "last" or best is None:
            best = final
            self._save(model, final, math.ceil(step / self.steps_per_epoch()), step)
        init = [r for r in evals if r.get("epoch") == 0]
        return {"command": self.cfg.command, "keep": self.keep, "head": self.kind, "bins": self.bins,
                "val": {k: v for k, v in (best or {}).items() if k not in _STRIP} or None,
                "val_last": {k: v for k, v in (final or {}).items() if k not in _STRIP} or None,
                "initial": {k: v for k, v in init[0].items() if k not in _STRIP} if init else None,
                "best_epoch": (best or {}).get("epoch")}
