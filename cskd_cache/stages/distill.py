"""`cskd distill`: Stage II, semi-supervised IAA distillation from a teacher into any student, cache-first.

Data:

- **unlabelled** = every feature-cache row except those linked to a val or test label (`labels.link`): a
  val/test image must never be trained on, not even without its label, or the val/test numbers leak. With
  ``pool_labelled`` off the train images whose labels are in use are left out too, so the teacher speaks only
  where no label does. Each item
  is one cached view (box + flip from the cache) rebuilt at the student's size; its target is the teacher's
  prediction on exactly that view (a predictions cache, `teacher_predictions`) and, with ``lambda_f`` > 0, the cached
  CLIP embedding of that view. With ``jitter_views`` (the default) the student sees a mild crop + flip inside
  the cached view instead, against the same targets (`data.datasets`): a consistency augmentation. Without it
  the student memorises the V fixed inputs of each row (proxy benchmark: val SRCC peaked at epoch 4 and fell;
  with it, it kept rising and test SRCC went from 0.528 to 0.627);
- **labelled** = the train-split labels (after ``label_fraction``). A label linked to a cache row shows that
  row's cached views (``label_views`` "cached", the default: random crops down to a quarter of the picture too,
  each under the whole picture's label, and each with its own cached embedding) or only its view 0, the eval view
  (``label_views`` "eval": the pixels `cskd finetune` trains on and `cskd evaluate` scores); the README's study
  measured both. An unlinked label is read from disk with the eval view (+ the mild augmentation unless
  ``augment`` is off, as in finetune). The val split is the validation set, the test split is untouched.

Teachers (``teacher``):

- ``cache-head``: a linear head (an MLP with ``teacher_hidden`` > 0) fitted on the cached, L2-normalised CLIP
  embeddings of the linked train labels (`cache_head`), saved as RUN_DIR/teacher/cache_head.*; its predictions
  go to RUN_DIR/teacher/predictions. Needs no image decoding and fits in seconds;
- ``run:TEACHER_RUN``: a `cskd finetune` (or distill) run; its predictions on every cached view are computed
  once into TEACHER_RUN/predictions/<ID>/ (`teacher_predictions.default_predictions_dir`; or ``predictions``) and
  reused by later runs whose teacher weights and feature cache match (`teacher_predictions` documents the fingerprint;
  a stale directory is recomputed, or refused with ``stale_predictions="error"``). Under torchrun each rank
  computes a share.

Teacher and student heads agree: a distribution head on datasets with vote histograms (distillation loss EMD
between the softmaxed outputs, or KL at ``temperature``), a scalar head otherwise (MSE to the teacher's 0..1
score). Loss = labelled + ``lambda_u`` x distillation + ``lambda_f`` x feature alignment (`losses.iaa.IAALoss`);
``unlabelled_ratio`` unlabelled items per labelled item in each step. A batch-norm student sees them in one
forward (``bn_stats`` "joint"), or the labelled items in a forward of their own (``bn_stats`` "separate"; with
"labelled" it is the only one that moves the running statistics; `models.batch_norm` says why). Everything else
is `iaa_task`'s and the engine's.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import dist
from ..cache.paths import check_images, parse_image_root, resolve_paths
from ..cache.reader import FeatureCache, open_cache
from ..data.datasets import CachedViews
from ..errors import MissingFile, TrainError
from ..evaluate.metrics import evaluate_predictions
from ..labels.labelset import LabelSet
from ..labels.link import LinkResult, link_labels
from ..labels.targets import head_fits, head_text, label_targets, labels_meta
from ..models.cache_head import (
    HEAD_JSON,
    HEAD_WEIGHTS,
    fit_cache_head,
    load_cache_head,
    predict_embeddings,
    save_cache_head,
)
from ..models.batch_norm import BN_STATS
from ..models.runs import build_encoder
from ..models.scorer import IAA_JSON, IAA_WEIGHTS, head_to_scores
from ..train.engine import CONFIG_NAME, fit, plan_steps, resolve_device, seed_everything
from ..train.run_dir import prepare_run_dir
from ..train.run_log import read_resolved
from .finetune import report_labels
from .iaa_task import IAATask, IAATrainConfig, Stream, prepare_labels, resumed_start, starting_head
from .teacher_predictions import (
    Predictions,
    check_predictions_dir,
    default_predictions_dir,
    describe_teacher,
    ensure_predictions,
    run_teacher_compute,
)
from .view_pixels import resolve_view_pixels, store_may_serve

__all__ = ["DistillConfig", "DistillError", "run_distill", "unlabelled_pool"]


# Besides its lock, a distill --out may hold the earlier collaborative rounds before the last round starts in it.
OWN_NAMES = re.compile(r"\.cskd\.lock|rounds")


class DistillError(TrainError):
    """A bad `distill` request; the message names the fix."""


@dataclass
class DistillConfig(IAATrainConfig):
    cache: str = ""
    teacher: str = "cache-head"
    student: str = ""
    lambda_u: float = 1.0
    lambda_f: float = 0.0
    distill_loss: str = "emd"
    temperature: float = 1.0
    unlabelled_ratio: float = 1.0
    cache_image_root: list[str] = field(default_factory=list)
    predictions: str | None = None
    stale_predictions: str = "recompute"
    teacher_hidden: int = 0
    teacher_steps: int = 1000
    teacher_lr: float = 3e-3
    teacher_batch_size: int = 64
    augment: bool = True
    jitter_views: bool = True
    no_verify: bool = False  # skip the one-time sha256 check of the cache's shards (`cache.integrity`)
    labels_outside_cache: bool = False  # the labelled images are deliberately not in the cache: 0 links is fine
    consistency: float = 0.0  # off until the ablation shows it earns its place (losses.consistency)
    rounds: int = 1  # collaborative rounds (`rounds`): each round's student teaches the next
    refine_teacher: bool = False  # rounds >= 2: the teacher is itself refined on labels + the student's labels
    refine_lr_encoder: float = 3e-4  # the refined teacher's encoder lr (it starts fine-tuned, as an aligned one)
    attn_distance: float = 0.0  # ViT students: keep per-layer attention distances near the aligned start's
    # the profile --attn-distance keeps: "student" (its own at the start of Stage II) or "teacher" (the CLIP
    # teacher's, stored in the cache by `cskd extract --attention-stats`, matched by relative depth)
    attn_reference: str = "student"
    label_views: str = "cached"  # which cached views a labelled image shows (module docstring)
    # the teacher also speaks for the labelled train images in use, beside their labels; False: only for the rest
    pool_labelled: bool = True
    # batch-norm students: "joint" (labelled and unlabelled items in one forward), "separate" or "labelled"
    bn_stats: str = "joint"

    error: ClassVar[type] = DistillError
    command: ClassVar[str] = "distill"
    required: ClassVar[tuple[str, ...]] = ("cache", "student", "labels", "out")

    def validate(self) -> None:
        super().validate()
        if self.teacher != "cache-head" and not (self.teacher.startswith("run:") and len(self.teacher) > 4):
            raise DistillError(f"--teacher {self.teacher!r}: use cache-head or run:TEACHER_RUN (the --out of a "
                               "`cskd finetune` run)")
        if self.lambda_u < 0 or self.lambda_f < 0 or self.consistency < 0 or self.attn_distance < 0:
            raise DistillError("--lambda-u, --lambda-f, --consistency and --attn-distance must be >= 0")
        if self.refine_teacher and not str(self.teacher).startswith("run:"):
            raise DistillError(f"--refine-teacher refines a run: teacher (a finetune run); --teacher {self.teacher} "
                               "is not one")
        if self.label_views not in ("eval", "cached"):
            raise DistillError(f"--label-views must be eval or cached, got {self.label_views!r}")
        if self.bn_stats not in BN_STATS:
            raise DistillError(f"--bn-stats must be {', '.join(BN_STATS[:-1])} or {BN_STATS[-1]}, got "
                               f"{self.bn_stats!r}")
        if self.attn_reference not in ("student", "teacher"):
            raise DistillError(f"--attn-reference must be student or teacher, got {self.attn_reference!r}")
        if self.consistency > 0 and not self.jitter_views:
            raise DistillError("--consistency compares two jitters of each cached view; it needs --jitter-views "
                               "(without jitter both views are the same pixels and agree trivially)")
        if self.distill_loss not in ("emd", "kl"):
            raise DistillError(f"--distill-loss must be emd or kl, got {self.distill_loss!r}")
        if self.temperature <= 0:
            raise DistillError("--temperature must be > 0")
        if self.unlabelled_ratio <= 0:
            raise DistillError("--unlabelled-ratio must be > 0")
        if self.stale_predictions not in ("recompute", "error"):
            raise DistillError(f"--stale-predictions must be recompute or error, got {self.stale_predictions!r}")
        if self.rounds < 1:
            raise DistillError(f"--rounds must be >= 1, got {self.rounds}")
        if self.teacher_steps < 1 or self.teacher_hidden < 0:
            raise DistillError("--teacher-steps must be >= 1 and --teacher-hidden >= 0")


def unlabelled_pool(labels: LabelSet, link: LinkResult, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(cache rows usable as unlabelled data, cache rows held out because a val/test label links to them)."""
    held = sorted({int(r) for lb, r in zip(labels.labels, link.rows) if r >= 0 and lb.split in ("val", "test")})
    held = np.asarray(held, np.int64)
    return np.setdiff1d(np.arange(n_rows, dtype=np.int64), held), held


def _teacher_val(preds: Predictions, val: LabelSet, rows: np.ndarray) -> dict | None:
    """The teacher's val metrics on view 0 of the val labels linked to the cache (None under 2 such labels)."""
    ok = rows >= 0
    if ok.sum() < 2:
        return None
    name = "logits" if preds.kind == "distribution" else "score"
    out = torch.from_numpy(preds.arrays[name][rows[ok], 0])
    mapped = head_to_scores(out, preds.kind, preds.scale)
    truth = val.scores()[ok]
    m = evaluate_predictions(truth, mapped["score"].numpy().astype(np.float64), val.threshold)
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in m.items()}


def _cache_head_teacher(cfg: DistillConfig, cache: FeatureCache, labels: LabelSet, train: LabelSet,
                        train_rows: np.ndarray, kind: str, bins: int | None, run_dir: Path, resume: bool,
                        status) -> tuple[dict, Path]:
    tdir = run_dir / "teacher"
    if dist.rank() == 0:
        if resume and (tdir / HEAD_JSON).is_file() and (tdir / HEAD_WEIGHTS).is_file():
            load_cache_head(tdir)  # fails loudly if unreadable, instead of silently refitting another teacher
        else:
            linked = train_rows >= 0
            sub = dataclasses.replace(train, labels=[lb for lb, ok in zip(train.labels, linked) if ok])
            t0 = time.perf_counter()
            head, info = fit_cache_head(cache.embed[train_rows[linked]], label_targets(sub, kind), kind, bins,
                                        cfg.teacher_hidden, cfg.teacher_steps, cfg.teacher_lr, seed=cfg.seed)
            info["seconds"] = time.perf_counter() - t0
            save_cache_head(tdir, head, labels_meta(labels),
                            {**info, "feature_cache_fingerprint": cache.manifest.get("fingerprint")})
            status(f"cache-head teacher fitted on {info['images']} linked train images x {cache.n_views} views "
                   f"in {info['seconds']:.1f} s")
    dist.barrier()
    teacher = describe_teacher("cache-head", "cache-head", tdir, HEAD_JSON, HEAD_WEIGHTS)
    return teacher, Path(cfg.predictions) if cfg.predictions else tdir / "predictions"


def _ensure(cfg: DistillConfig, cache: FeatureCache, teacher: dict, pred_dir: Path, make_compute, status,
            on_teacher_progress) -> tuple[Predictions, bool]:
    """Reuse or compute the predictions; under torchrun every rank computes its share of the shards."""
    main = dist.rank() == 0
    return ensure_predictions(pred_dir, cache, teacher, make_compute, cfg.stale_predictions,
                              on_status=status if main else None,
                              on_progress=on_teacher_progress if main else None)


def _link(cfg: DistillConfig, labels: LabelSet, train: LabelSet, cache: FeatureCache,
          status) -> tuple[LinkResult, dict, np.ndarray, np.ndarray, list[str]]:
    """(link, label key -> cache row, unlabelled pool, held-out rows, image path per cache row)."""
    image_root = parse_image_root(cfg.cache_image_root)
    link = link_labels(labels, cache, image_root)
    if link.linked == 0 and not cfg.labels_outside_cache:
        roots = "; ".join(f"{n}: {r}" for n, r in cache.roots.items())
        raise DistillError(f"none of the {len(labels.labels):,} labels of {cfg.labels} links to a row of cache "
                           f"{cache.path}, by path or by content: the label paths probably do not match the cache's "
                           f"images (its roots: {roots}). Extract the labelled images into the cache, map the "
                           "cache's roots with --cache-image-root OLD=NEW, or pass --labels-outside-cache if the "
                           "cache deliberately holds only other images")
    pool, held = unlabelled_pool(labels, link, len(cache))
    if not cfg.pool_labelled:
        used = {lb.key for lb in train.labels}
        pool = np.setdiff1d(pool, [r for lb, r in zip(labels.labels, link.rows) if r >= 0 and lb.key in used])
    if len(pool) == 0:
        raise DistillError(f"{cache.path}: every cache row belongs to a val/test label"
                           f"{'' if cfg.pool_labelled else ' or to a train label in use (--no-pool-labelled)'}, so no "
                           "unlabelled data is left; extract unlabelled images into the cache")
    status(link.summary())
    if len(held):
        status(f"{len(held)} cache rows are val/test images and were left out of the unlabelled pool")
    paths = resolve_paths(cache, image_root)
    if not store_may_serve(cache, cfg.view_pixels):
        check_images(cache, paths, pool)  # else once the pixel source is known: a store needs no originals
    return link, {lb.key: int(r) for lb, r in zip(labels.labels, link.rows)}, pool, held, paths


def _run_teacher(cfg: DistillConfig, cache: FeatureCache, paths: list[str], device, status):
    """(teacher description, predictions dir, make_compute) of a ``run:`` teacher."""
    tdir = Path(cfg.teacher[4:]).expanduser()
    if not (tdir / IAA_JSON).is_file() or not (tdir / IAA_WEIGHTS).is_file():
        raise MissingFile(f"--teacher {cfg.teacher}: no {IAA_JSON} + {IAA_WEIGHTS} in {tdir}; point at the --out of "
                          "a finished `cskd finetune` run")

    def make_compute():
        from ..models.scorer import load_iaa_model

        scorer = load_iaa_model(tdir, device, trust_code=cfg.trust_code)
        store, _ = resolve_view_pixels(cache, cfg.view_pixels, scorer.input_cfg, jitter=False,
                                       verify=not cfg.no_verify, status=status)
        if store is None:
            check_images(cache, paths, range(len(cache)))
        status(f"computing teacher predictions on {len(cache)} rows x {cache.n_views} views")
        return run_teacher_compute(scorer, cache, paths, device, cfg.teacher_batch_size, cfg.num_workers, cfg.amp,
                                   cfg.max_pixels, store=store, draft=cfg.view_pixels != "exact")
    pred_dir = Path(cfg.predictions) if cfg.predictions else default_predictions_dir(tdir, cache)
    return describe_teacher("run", cfg.teacher, tdir, IAA_JSON, IAA_WEIGHTS), pred_dir, make_compute


def _streams(cfg: DistillConfig, cache: FeatureCache, train: LabelSet, train_rows, pool, paths, preds: Predictions,
             kind: str, input_cfg: dict, store=None) -> list[Stream]:
    embed = cache.embed if cfg.lambda_f > 0 else None
    name = "logits" if kind == "distribution" else "score"
    pixels = {"store": store, "sizes": cache.sizes, "draft": cfg.view_pixels != "exact"}
    lab = CachedViews(train.paths(), input_cfg, rows=train_rows, boxes=cache.boxes, embed=embed,
                      targets=label_targets(train, kind), augment=cfg.augment, jitter=cfg.jitter_views,
                      view=0 if cfg.label_views == "eval" else "random", seed=cfg.seed, max_pixels=cfg.max_pixels,
                      digests=cache.digests, **pixels)
    unl = CachedViews([paths[r] for r in pool], input_cfg, rows=pool, boxes=cache.boxes, embed=embed,
                      digests=cache.digests, teacher={name: preds.arrays[name]}, jitter=cfg.jitter_views,
                      seed=cfg.seed, max_pixels=cfg.max_pixels, pair=cfg.consistency > 0, **pixels)
    return [Stream("labelled", lab, cfg.batch_size),
            Stream("unlabelled", unl, max(1, round(cfg.batch_size * cfg.unlabelled_ratio)))]


def run_distill(cfg: DistillConfig, on_progress: Callable[[dict], None] | None = None,
                on_status: Callable[[str], None] | None = None,
                on_teacher_progress: Callable[[int, int], None] | None = None) -> dict:
    """Train (or resume) a distill run; returns its summary: ``val`` (metrics of the kept iaa_model), ``val_last``,
    ``initial``, ``best_epoch``, ``link`` (by_path, by_content, unlinked, first_unlinked), ``unlabelled_rows``,
    ``heldout_rows`` (cache rows excluded because val/test labels link to them), ``teacher`` (kind, spec,
    predictions, computed, val), label counts, seconds."""
    cfg = dataclasses.replace(cfg, cache_image_root=list(cfg.cache_image_root or []))
    cfg.validate()
    if cfg.rounds != 1:
        raise DistillError(f"rounds={cfg.rounds}: several rounds run through `stages.rounds.run_rounds`")
    if cfg.predictions:
        check_predictions_dir(cfg.predictions)  # before any work: it may be the cache itself, or a user's folder
    status = on_status or (lambda m: None)
    t0 = time.perf_counter()
    dist.init_if_needed()
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out)
    labels, train, val, kind, bins = prepare_labels(cfg)
    report_labels(labels, train, val, status)
    head_state = starting_head(cfg, cfg.student, "--student", kind, bins, labels)  # before the run directory exists
    cache = open_cache(cfg.cache, verify=not cfg.no_verify)
    link, row_of, pool, held, paths = _link(cfg, labels, train, cache, status)
    attn_teacher = _teacher_profile(cfg, cache)
    train_rows = np.array([row_of[lb.key] for lb in train.labels], np.int64)
    val_rows = np.array([row_of[lb.key] for lb in val.labels], np.int64)
    ckpt = prepare_run_dir(cfg, run_dir, own=OWN_NAMES)
    dist.barrier()
    # a resumed run keeps what its first start decided: the attention reference (the starting weights are gone),
    # and where training started (a run made before --head-init started with a fresh head)
    resolved = read_resolved(run_dir / CONFIG_NAME) if ckpt is not None else None
    head_state = resumed_start(head_state, resolved)

    if cfg.teacher == "cache-head":
        teacher, pred_dir = _cache_head_teacher(cfg, cache, labels, train, train_rows, kind, bins, run_dir,
                                                ckpt is not None, status)
        head, _ = load_cache_head(run_dir / "teacher")

        def make_compute():
            return lambda a, b: predict_embeddings(head, cache.embed[a:b])
    else:
        teacher, pred_dir, make_compute = _run_teacher(cfg, cache, paths, device, status)
    _check_teacher(cfg, teacher, kind, bins, labels)
    preds, computed = _ensure(cfg, cache, teacher, pred_dir, make_compute, status, on_teacher_progress)

    seed_everything(cfg.seed)
    try:
        student = build_encoder(cfg.student, pretrained_ok=ckpt is None, size=cfg.size, trust_code=cfg.trust_code)
    except (ValueError, FileNotFoundError) as e:
        raise DistillError(f"--student {cfg.student}: {e}") from e
    store, pixels = resolve_view_pixels(cache, cfg.view_pixels, student.input_cfg, jitter=cfg.jitter_views,
                                        verify=not cfg.no_verify,
                                        status=status if dist.rank() == 0 else (lambda m: None))
    if store is None and store_may_serve(cache, cfg.view_pixels):
        check_images(cache, paths, pool)
    streams = _streams(cfg, cache, train, train_rows, pool, paths, preds, kind, student.input_cfg, store)
    # validation decodes whole, as `cskd evaluate` and `cskd predict` do, so a val score is the score they give
    val_ds = (CachedViews(val.paths(), student.input_cfg, max_pixels=cfg.max_pixels, draft=False)
              if len(val) else None)
    link_info = {"by_path": link.by_path, "by_content": link.by_content, "unlinked": len(link.unlinked),
                 "first_unlinked": link.unlinked[:5]}
    teacher_info = {"kind": teacher["kind"], "spec": teacher["spec"], "predictions": str(pred_dir),
                    "computed": computed, "val": _teacher_val(preds, val, val_rows)}
    facts = {"label_counts": labels.counts(), "train_labels_used": len(train),
             "train_labels_linked": int((train_rows >= 0).sum()), "link": link_info, "unlabelled_rows": len(pool),
             "heldout_rows": len(held), "cache": {"path": str(cache.path), "fingerprint": cache.manifest.get(
                 "fingerprint"), "rows": len(cache), "views": cache.n_views},
             "teacher": {k: v for k, v in teacher_info.items() if k != "computed"},
             "predictions_fingerprint": preds.manifest["fingerprint"], "view_pixels": pixels}
    task = IAATask(cfg, encoder=student, kind=kind, bins=bins, labels=labels, val_labels=val, streams=streams,
                   val=val_ds, device=device, lambda_u=cfg.lambda_u, lambda_f=cfg.lambda_f, embed_dim=cache.embed_dim,
                   distill_loss=cfg.distill_loss, temperature=cfg.temperature, facts=facts, status=status,
                   consistency=cfg.consistency, attn_distance=cfg.attn_distance, bn_stats=cfg.bn_stats,
                   attn_reference=(resolved or {}).get("attn_reference"), attn_teacher=attn_teacher,
                   head_state=head_state,
                   extra_meta={"labels_spec": cfg.labels, "teacher": cfg.teacher, "cache": str(cache.path),
                               "cache_fingerprint": cache.manifest.get("fingerprint")})
    result = fit(task, cfg, run_dir=run_dir, ckpt=ckpt, device=device, plan=plan_steps(cfg, task.steps_per_epoch()),
                 on_progress=on_progress, on_status=status)
    result.update({"train_labels": len(train), "train_labels_linked": int((train_rows >= 0).sum()),
                   "train_labels_total": labels.counts()["train"], "val_labels": len(val), "link": link_info,
                   "unlabelled_rows": len(pool), "heldout_rows": len(held), "teacher": teacher_info,
                   "broken_images": len(train.unreadable) + len(val.unreadable), "seconds": time.perf_counter() - t0})
    return result


def _teacher_profile(cfg: DistillConfig, cache) -> list[float] | None:
    """--attn-reference teacher: the cached teacher's per-layer mean attention distance (over rows, views and
    heads) as a fraction of uniform attention's on its grid, so that it can meet a student of another input size
    and patch; refused before the run directory exists when the cache holds no statistics."""
    if cfg.attn_distance <= 0 or cfg.attn_reference != "teacher":
        return None
    info = cache.manifest.get("storage", {}).get("attention_stats")
    if not info:
        raise DistillError(f"--attn-reference teacher: cache {cache.path} holds no attention statistics; extract it "
                           "with `cskd extract --attention-stats` (a ViT teacher), or use --attn-reference student")
    d = cache.read_all("attn_distance").astype(np.float64)
    return [float(v) for v in d.mean(axis=(0, 1, 3)) / info["uniform_distance"]]


def _check_teacher(cfg: DistillConfig, teacher: dict, kind: str, bins: int | None, labels: LabelSet) -> None:
    th = teacher["head"]
    if not head_fits(th, kind, bins):
        raise DistillError(f"--teacher {cfg.teacher} has a {head_text(th['kind'], th.get('bins'))}, the student gets a "
                           f"{head_text(kind, bins)} for {cfg.labels}; train the teacher on the same dataset (or pass "
                           "the matching --head)")
    if not np.allclose(teacher["scale"], labels.scale):
        raise DistillError(f"--teacher {cfg.teacher} scores on {teacher['scale']}, {cfg.labels} on "
                           f"{list(labels.scale)}; train the teacher on the same dataset")
