"""Does CSKD help? The whole chain on one labelled set, one table: teacher, labels-only student, CSKD student.

    # the proxy quality experiment (real photos, graded degradations, a real pretrained teacher, 10% of labels)
    python benchmarks/srcc.py --proxy-from ../shared/data/photos --work runs/srcc --markdown

    # any labelled set: a DATASET_SPEC plus the unlabelled images to extract (the labelled ones are among them)
    python benchmarks/srcc.py --labels ava:/data/AVA --images /data/AVA/images --images /data/unlabelled \
        --teacher open_clip:ViT-L-14@/models/vitl14.pt --teacher-model run:runs/align-vitl --work runs/ava

Steps (each writes under --work and is skipped when its output is already there, so a rerun only evaluates; a
finished or half-finished run made with other settings is refused, not compared; a killed run resumes). The
label-dependent runs go to --work/--runs (default fFRACTION), so label fractions share the proxy, cache and Stage I:

1. ``proxy``   (with --proxy-from) `cskd_cache.inspect.proxy_quality`: every source photo (or a seeded --photos
               sample) pristine + --per-image degraded versions (--kinds, 5 levels), score = 10 - 1.8 x level
               (with --content-weight W: (1-W) x that + W x a per-content-group preference), split by source
               photo; each train photo also gets --unlabelled-per-image more versions that are never labels.
2. ``cache``   `cskd extract` with the feature teacher (default: EfficientNet-Lite0, ImageNet-pretrained, the only
               real pretrained image backbone offline; stands in for CLIP), --views views, tokens at native grid.
               With --proxy-from it holds the train photos' versions only (``pool.txt``): Stage I and Stage II never
               see a val or test photo, not even unlabelled.
3. ``teacher`` `cskd finetune` of --teacher-model (default: that same pretrained EfficientNet-Lite0 as a trainable
               py: student) on --label-fraction of the train labels: the Stage II IAA teacher (or --teacher-run).
4. ``labels-only`` `cskd finetune` of the student (random init) on the same labels: the baseline.
5. ``align``   `cskd align` of the student (random init) on the cache: Stage I (--align-steps, --align-w-token,
               --standardize-global), in --work/--align-name.
6. ``cskd``    `cskd distill --teacher run:TEACHER --student run:ALIGN`: labelled EMD + --lambda-u x EMD to the
               teacher's distribution on every unlabelled cached view, views jittered (--consistency,
               --attn-distance, --rounds, --refine-teacher, --distill-lr-encoder as in `cskd distill`). With
               --warm-start the student is ``stage1-only`` instead (the aligned student fine-tuned, head included).
7. ``distill-only`` (--ablation) the same distillation into a random-init student: what Stage I adds (with
               --warm-start, from ``labels-only``).
   ``stage1-only`` (--stage1-only) `cskd finetune` of the Stage I student on the labels, as long as labels-only:
               what Stage II adds.
8. ``probe``   (--probe) the training-free kNN probe of the Stage I encoder and of a random-init one: from the
               labelled train images to the other train labels, before any Stage II.
9. ``all-labels`` (--all-labels-steps N) the student on *every* train label, a reference.

Every model is evaluated on the test split with `cskd evaluate` (SRCC, PLCC, accuracy, bootstrap 95% intervals over
test images). The last lines compare CSKD with the labels-only student: the SRCC difference with a paired bootstrap
interval (same resampled test images for both) and whether the two SRCC intervals are disjoint.

Where no CLIP weights exist this is a proxy: "quality" here is synthetic degradation, not human aesthetics, and the
teacher is an ImageNet CNN. It shows the mechanism (a stronger teacher's knowledge reaches a small random-init
student through unlabelled images) with real photos and a real pretrained network; it is not an AVA result.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cskd_cache.evaluate.metrics import bootstrap_ci, srcc  # noqa: E402

LITE0_TEACHER = "py:cskd_cache.models.zoo.efficientnet_lite0:teacher"
LITE0_STUDENT = "py:cskd_cache.models.zoo.efficientnet_lite0:student"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def done(run: Path, marker: str) -> bool:
    return (run / marker).is_file()


def step_proxy(args, work: Path) -> str:
    from cskd_cache.data.sources import scan_images
    from cskd_cache.inspect.proxy_quality import build_proxy_set

    out = work / "proxy"
    recipe = {k: getattr(args, k) for k in ("proxy_from", "photos", "per_image", "unlabelled_per_image", "kinds",
                                            "content_weight", "seed")}
    saved = out / "recipe.json"
    if saved.is_file() and json.loads(saved.read_text()) != recipe:
        sys.exit(f"error: {out} was built with {saved.read_text().strip()}; this run asks for {json.dumps(recipe)}. "
                 "Use another --work")
    if not (out / "labels.csv").is_file() or (args.unlabelled_per_image and not (out / "unlabelled.csv").is_file()):
        src = Path(args.proxy_from)
        if not src.is_dir():
            sys.exit(f"error: --proxy-from {src} is not a folder of photos (e.g. ../shared/data/photos)")
        files = [str(p) for p in scan_images(src)]
        if args.photos and args.photos < len(files):  # a seeded sample, the same rule as `cskd proxy-set --n`
            pick = np.random.default_rng(args.seed).choice(len(files), size=args.photos, replace=False)
            files = [files[i] for i in sorted(pick)]
        log(f"proxy set: {len(files)} photos from {src} -> {out}")
        build_proxy_set(files, out, per_image=args.per_image, seed=args.seed, workers=args.workers,
                        unlabelled_per_image=args.unlabelled_per_image, kinds=args.kinds.split(","),
                        content_weight=args.content_weight)
    if not saved.is_file():
        saved.write_text(json.dumps(recipe) + "\n")
    return f"csv:{out / 'labels.csv'}"


def proxy_pool(work: Path, extras: bool) -> Path:
    """pool.txt: the train photos' labelled versions (and, with ``extras``, their unlabelled extras): the only
    images cached."""
    proxy, pool = work / "proxy", work / "pool.txt"
    with open(proxy / "labels.csv", newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f) if r["split"] == "train"]
    if extras:
        with open(proxy / "unlabelled.csv", newline="") as f:
            paths += [r["path"] for r in csv.DictReader(f)]
    text = "".join(f"{(proxy / p).resolve()}\n" for p in paths)
    if not pool.is_file() or pool.read_text() != text:
        pool.write_text(text)
    return pool


def step_cache(args, work: Path, images: list[str], lists: list[str]) -> str:
    from cskd_cache.stages.extract import ExtractConfig, run_extract

    out = work / "cache"
    if not done(out, "manifest.json") or not json.loads((out / "manifest.json").read_text()).get("complete"):
        log(f"extract: {args.teacher} over {', '.join(images + lists)} -> {out}")
        res = run_extract(ExtractConfig(teacher=args.teacher, out=str(out), images=images, lists=lists,
                                        views=args.views, batch_size=32, num_workers=args.workers))
        log(f"extract: {res.rows} rows, {res.images_per_s:.1f} img/s")
    if args.view_store:
        from cskd_cache.stages.add_views import run_add_views
        r = run_add_views(out, args.view_store, num_workers=args.workers)
        log(f"add-views: {r.store}, {r.bytes_per_view:,.0f} bytes per view")
    return str(out)


def finished(cfg) -> bool:
    """True when the run in ``cfg.out`` is complete (loss_curve.png is written last). A finished or half-finished
    run trained with other settings is an error, not something to compare silently: the config's own
    ``changed`` decides, as `--resume` does."""
    out = Path(cfg.out)
    if not (out / "config.yaml").is_file():
        return False
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    diff = cfg.changed(saved)
    if diff:
        sys.exit(f"error: {out} was trained with other settings ({', '.join(diff)}); remove it or use another "
                 "--work / --runs / --tag")
    return done(out, "loss_curve.png")


def train_kwargs(args, steps: int) -> dict:
    """The schedule every run shares: a fixed number of optimiser steps, validated every --eval-every steps, the
    best val step kept; resumable."""
    return dict(epochs=1, max_steps=steps, eval_every=args.eval_every, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed if args.train_seed is None else args.train_seed, num_workers=args.workers, resume=True)


def finetune(args, labels: str, model: str, out: Path, steps: int, size: int | None, lr_encoder: float | None,
             label_fraction: float | None = None, ema: float = 0.0):
    from cskd_cache.stages.finetune import FinetuneConfig, run_finetune

    fraction = args.label_fraction if label_fraction is None else label_fraction
    cfg = FinetuneConfig(model=model, labels=labels, out=str(out), label_fraction=fraction, size=size,
                         lr_encoder=lr_encoder, ema=ema, trust_code=True,  # its own runs, whose py: spec it wrote
                         **train_kwargs(args, steps))
    if not finished(cfg):
        log(f"finetune {model} -> {out}")
        s = run_finetune(cfg)
        log(f"finetune {out.name}: val SRCC {s['val']['srcc']:.3f} (step {s['val']['step']})")


def align(args, cache: str, out: Path):
    # label-independent and shared by every replicate: --train-seed reseeds the label-dependent runs only
    from cskd_cache.stages.align import AlignConfig, run_align

    cfg = AlignConfig(cache=cache, student=args.student, out=str(out), size=args.size,
                      standardize_global=args.standardize_global, view_pixels=args.view_pixels,
                      w_token=args.align_w_token, **{**train_kwargs(args, args.align_steps), "lr": args.align_lr,
                                                     "eval_every": None, "seed": args.seed})
    if not finished(cfg):
        log(f"align {args.student} on {cache} -> {out}")
        s = run_align(cfg)
        f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731 (too few held-out rows: no figure)
        log(f"align: held-out global cos {f3(s['initial']['global_cos'])} -> {f3(s['global_cos'])}, "
            f"kNN agreement {f3(s['initial']['knn_agreement'])} -> {f3(s['knn_agreement'])}")


def distill(args, labels: str, cache: str, teacher_run: Path, student: str, out: Path, lr_encoder: float | None):
    from cskd_cache.stages.distill import DistillConfig
    from cskd_cache.stages.rounds import run_rounds

    cfg = DistillConfig(labels=labels, cache=cache, teacher=f"run:{teacher_run}", student=student, out=str(out),
                        label_fraction=args.label_fraction, size=args.size, lambda_u=args.lambda_u,
                        unlabelled_ratio=args.unlabelled_ratio, ema=args.ema, jitter_views=args.jitter_views,
                        trust_code=True, view_pixels=args.view_pixels, lr_encoder=lr_encoder,
                        consistency=args.consistency, attn_distance=args.attn_distance, rounds=args.rounds,
                        refine_teacher=args.refine_teacher, label_views=args.label_views,
                        pool_labelled=args.pool_labelled, bn_stats=args.bn_stats,
                        **{**train_kwargs(args, args.distill_steps), "lr": args.distill_lr or args.lr})
    if not finished(cfg):
        log(f"distill {student} from run:{teacher_run} -> {out}")
        s = run_rounds(cfg)
        log(f"distill {out.name}: val SRCC {s['val']['srcc']:.3f}; {s['unlabelled_rows']} unlabelled rows, "
            f"{s['heldout_rows']} held out")


def knn_probe_score(args, labels: str, cache: str, encoder_spec: str, out: Path) -> dict:
    """The training-free probe of an encoder, before any Stage II: its pooled features of every cache row (view
    0), then similarity-weighted kNN regression (k = 10) from the --label-fraction train labels to the other train
    labels in the cache. Never touches val or test images. Cached in ``out`` (probe.json)."""
    f = out / "probe.json"
    if f.is_file():
        return json.loads(f.read_text())
    import torch

    from cskd_cache.cache.paths import resolve_paths
    from cskd_cache.cache.reader import open_cache
    from cskd_cache.inspect.neighbors import embed_rows, knn_probe
    from cskd_cache.labels import load_labels
    from cskd_cache.labels.link import link_labels
    from cskd_cache.labels.targets import keep_fraction
    from cskd_cache.models.runs import build_encoder

    c = open_cache(cache)
    ls = load_labels(labels, check_images=False)
    link = link_labels(ls, c, {})
    kept = {lb.key for lb in keep_fraction(ls, args.label_fraction, 0).labels if lb.split == "train"}
    rows = np.asarray(link.rows)
    train_rows, train_y, test_rows, test_y = [], [], [], []
    for lb, r in zip(ls.labels, rows):
        if lb.split != "train" or r < 0:
            continue
        (train_rows if lb.key in kept else test_rows).append(r)
        (train_y if lb.key in kept else test_y).append(lb.score)
    torch.manual_seed(args.seed)
    enc = build_encoder(encoder_spec, size=None if encoder_spec.startswith("run:") else args.size,
                        trust_code=True).eval()
    with torch.no_grad():
        feats = embed_rows(c, enc, resolve_paths(c, {}), num_workers=args.workers)
    res = knn_probe(feats, np.array(train_rows), np.array(train_y), np.array(test_rows), np.array(test_y), 10, None,
                    n_boot=200, seed=args.seed)
    res.pop("predictions")
    res = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(res, indent=2, default=float))
    return res


def evaluate(args, labels: str, run: Path) -> dict:
    from cskd_cache.evaluate.evaluate import EvalConfig, run_evaluate

    out = run / "eval-test"
    if not done(out, "metrics.json"):
        run_evaluate(EvalConfig(model=str(run), labels=labels, out=str(out), split="test",
                                num_workers=args.workers, bootstrap=args.bootstrap, seed=args.seed,
                                trust_code=True, group_by=args.group_by))
    m = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    m["_pred"] = {r["key"]: float(r["pred"]) for r in rows}
    m["_true"] = {r["key"]: float(r["true"]) for r in rows}
    m["_group"] = {r["key"]: r["group"] for r in rows if r.get("group")}
    return m


def paired_diff(a: dict, b: dict, n: int, seed: int, group_by: str | None = None) -> tuple[float, float, float]:
    """SRCC(a) - SRCC(b) on the test images both scored, with a paired bootstrap interval (photo-level with
    ``group_by``: every version of a source photo resampled together)."""
    from cskd_cache.evaluate.evaluate import group_keys

    keys = sorted(set(a["_pred"]) & set(b["_pred"]))
    t = np.array([a["_true"][k] for k in keys])
    pa, pb = np.array([a["_pred"][k] for k in keys]), np.array([b["_pred"][k] for k in keys])
    both = np.stack([pa, pb], 1)
    groups = group_keys(keys, group_by, a.get("_group")) if group_by else None
    lo, hi = bootstrap_ci(lambda tt, pp: srcc(tt, pp[:, 0]) - srcc(tt, pp[:, 1]), t, both, n=n, seed=seed,
                          groups=groups)
    return srcc(t, pa) - srcc(t, pb), lo, hi


def srcc_by_kind(labels_csv: Path, res: dict) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """SRCC within each degradation kind of the proxy set: which distortions a model ranks, which it cannot see.

    Returns ({kind: test images}, {model: {kind: SRCC}}); pristine photos all score 10 and are left out."""
    with open(labels_csv, newline="") as f:
        kind = {r["path"]: r["kind"] for r in csv.DictReader(f)}
    counts: dict[str, int] = {}
    table = {}
    for name, m in res.items():
        groups: dict[str, list[str]] = {}
        for key in m["_pred"]:
            if kind.get(key, "pristine") != "pristine":
                groups.setdefault(kind[key], []).append(key)
        groups = {k: ks for k, ks in groups.items() if len(ks) >= 2}
        table[name] = {k: srcc([m["_true"][x] for x in ks], [m["_pred"][x] for x in ks]) for k, ks in groups.items()}
        counts.update({k: len(ks) for k, ks in groups.items()})
    return dict(sorted(counts.items())), table


def fmt_ci(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci")
    return f"{m[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[name]:.3f}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=SCHEDULE_NOTE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--proxy-from", help="folder of photos to build the proxy quality set from")
    src.add_argument("--labels", help="DATASET_SPEC of a labelled set (ava:ROOT, csv:FILE, ...)")
    p.add_argument("--images", action="append", default=[], help="unlabelled image folders to extract (with --labels)")
    p.add_argument("--work", required=True, help="folder for every intermediate (reruns reuse what is there)")
    p.add_argument("--runs", default=None,
                   help="subfolder of --work for the label-dependent runs (teacher, students; default "
                        "'fFRACTION', so several label fractions share one proxy, cache and Stage I)")
    p.add_argument("--tag", default="", help="suffix of the CSKD and distill-only run names (a Stage II variant)")
    p.add_argument("--align-name", default="align", help="Stage I run folder under --work (a Stage I variant)")
    p.add_argument("--teacher", default=LITE0_TEACHER, help=f"feature teacher spec for the cache ({LITE0_TEACHER})")
    p.add_argument("--teacher-model", default=LITE0_STUDENT,
                   help=f"encoder fine-tuned as the IAA teacher ({LITE0_STUDENT}; e.g. run:ALIGN_RUN)")
    p.add_argument("--teacher-run", default=None,
                   help="use this finished teacher run (same labels and fraction) instead of training RUNS/teacher")
    p.add_argument("--teacher-size", type=int, default=None, help="input size of the IAA teacher (default: its own)")
    p.add_argument("--student", default="timm:mobilenetv3_small_100", help="student spec (random init)")
    p.add_argument("--size", type=int, default=224, help="student input size (default 224)")
    p.add_argument("--label-fraction", type=float, default=0.1, help="share of train labels used (default 0.1)")
    p.add_argument("--photos", type=int, default=None, help="with --proxy-from: a seeded sample of N photos")
    p.add_argument("--per-image", type=int, default=4, help="degraded versions per proxy photo (default 4)")
    p.add_argument("--kinds", default="blur,noise,jpeg,exposure,colour", help="proxy degradations")
    p.add_argument("--content-weight", type=float, default=0.0,
                   help="proxy variant: score = (1-W) x quality + W x a per-content-group preference "
                        "(`proxy_quality`; default 0: quality only)")
    p.add_argument("--unlabelled-per-image", type=int, default=8,
                   help="unlabelled extra versions per train photo, with --proxy-from (default 8; 0: the train "
                        "split alone is the pool)")
    p.add_argument("--views", type=int, default=2, help="cached views per image (default 2)")
    p.add_argument("--teacher-steps", type=int, default=400, help="optimiser steps of the IAA teacher (default 400)")
    p.add_argument("--baseline-steps", type=int, default=600, help="labels-only student steps (default 600)")
    p.add_argument("--align-steps", type=int, default=600, help="Stage I steps (default 600)")
    p.add_argument("--distill-steps", type=int, default=600, help="Stage II steps (default 600)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="validate every N steps; the best val step is kept (default 50)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--align-lr", type=float, default=1e-3, help="Stage I learning rate (default 1e-3)")
    p.add_argument("--align-w-token", type=float, default=None,
                   help="Stage I token-loss weight (default: align's, 1 with tokens; the global weight is 1)")
    p.add_argument("--distill-lr", type=float, default=None,
                   help="learning rate of both distillations, heads and encoder (default: --lr); e.g. lower for "
                        "--warm-start, which continues trained scorers")
    p.add_argument("--distill-lr-encoder", type=float, default=None,
                   help="encoder learning rate of the CSKD distillation, i.e. for the aligned student (default: "
                        "--lr); distill-only keeps --lr")
    p.add_argument("--lambda-u", type=float, default=4.0,
                   help="weight of the distillation loss (default 4, the README study's first curve; `cskd distill` "
                   "defaults to 1, the curve the README leads with; neither won at every label fraction)")
    p.add_argument("--unlabelled-ratio", type=float, default=1.0,
                   help="unlabelled images per labelled image in a distill step (default 1)")
    p.add_argument("--consistency", type=float, default=0.0, help="`cskd distill --consistency` (default 0)")
    p.add_argument("--attn-distance", type=float, default=0.0, help="`cskd distill --attn-distance` (ViT students)")
    p.add_argument("--rounds", type=int, default=1, help="`cskd distill --rounds` (default 1)")
    p.add_argument("--refine-teacher", action="store_true", help="`cskd distill --refine-teacher` (with --rounds)")
    p.add_argument("--standardize-global", action="store_true",
                   help="Stage I aligns to per-dimension standardised embeddings (`cskd align --standardize-global`)")
    p.add_argument("--jitter-views", action=argparse.BooleanOptionalAction, default=True,
                   help="distil with a mild crop + flip inside each cached view (`cskd distill --jitter-views`, "
                        "the default)")
    p.add_argument("--label-views", default="cached", choices=("cached", "eval"),
                   help="which cached views a labelled image shows in distillation (`cskd distill --label-views`; "
                        "default cached)")
    p.add_argument("--pool-labelled", action=argparse.BooleanOptionalAction, default=True,
                   help="the teacher's targets cover the labelled train images too (`cskd distill --pool-labelled`, "
                        "the default); --no-pool-labelled: only the images without a label")
    p.add_argument("--bn-stats", default="joint", choices=("joint", "separate", "labelled"),
                   help="`cskd distill --bn-stats`: one forward of labelled + unlabelled items (joint, the default), "
                        "a forward each (separate), or a forward each with only the labelled one moving the "
                        "batch-norm running statistics (labelled)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="weight EMA decay of every student run (labels-only, distill, all-labels); the teacher "
                        "never (default 0 = off)")
    p.add_argument("--ablation", action="store_true", help="also distil into a random-init student (no Stage I)")
    p.add_argument("--stage1-only", action="store_true",
                   help="also `cskd finetune` the Stage I student on the labels alone, as long as labels-only: the "
                        "chain without Stage II")
    p.add_argument("--warm-start", action="store_true",
                   help="Stage II starts from the fine-tuned students instead of a fresh head (`cskd distill "
                        "--student run:FINETUNE_RUN`, --head-init auto): CSKD from stage1-only (implies "
                        "--stage1-only), distill-only from labels-only; each keeps its step 0 if no step beats it "
                        "on val")
    p.add_argument("--no-cskd", action="store_true", help="skip Stage I and the CSKD student (with --ablation)")
    p.add_argument("--probe", action="store_true",
                   help="also score the training-free kNN probe of the Stage I encoder and of a random-init one")
    p.add_argument("--all-labels-steps", type=int, default=0,
                   help="also train the student on all train labels for N steps, as a reference (default 0: no)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--group-by", default=None,
                   help="resample whole groups in every bootstrap: a regex on the label key whose first group names "
                        "the source photo (default with --proxy-from: '^(.*)__', the versions of one photo; "
                        "otherwise: images)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--view-store", type=int, default=None, metavar="SIZE",
                   help="also cut the cache's views into a view store of this size (`cskd cache add-views`)")
    p.add_argument("--view-pixels", default="auto", choices=("auto", "store", "originals", "exact"),
                   help="where align and distill read cached views (`--view-pixels`; default auto)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the proxy sample and split, the label fraction's draw and the bootstrap; also of "
                        "every training run unless --train-seed is given (default 0)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of every training run only (initialisation, batch order, view jitter), the data left "
                        "as --seed drew it: with its own --runs, one more replicate of the label-dependent runs")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return p


SCHEDULE_NOTE = """Schedules are in optimiser steps, never in epochs: every run trains its --*-steps steps at every
--label-fraction (a pass over 5% of the labels is a handful of steps, over 100% twenty times as many), is
validated every --eval-every steps, and keeps its best val step. So the curve over label fractions compares the
same budget, and no count is tuned to one fraction."""


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.proxy_from and args.group_by is None:
        args.group_by = r"^(.*)__"  # the proxy set's NAME__kind.png: versions of one photo are not independent
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = work / (args.runs or f"f{args.label_fraction:g}")
    t0 = time.perf_counter()
    if args.proxy_from:
        labels = step_proxy(args, work)
        images, lists = [], [str(proxy_pool(work, args.unlabelled_per_image > 0))]
    else:
        labels, images, lists = args.labels, args.images, []
        if not images:
            sys.exit("error: --labels needs --images (the unlabelled folders, labelled images included)")
    cache = step_cache(args, work, images, lists)

    runs, tag = {}, args.tag
    align_dir = work / args.align_name
    teacher_dir = Path(args.teacher_run) if args.teacher_run else runs_dir / "teacher"
    if not args.teacher_run:
        finetune(args, labels, args.teacher_model, teacher_dir, args.teacher_steps, args.teacher_size, 3e-4)
    elif not done(teacher_dir, "loss_curve.png"):
        sys.exit(f"error: --teacher-run {teacher_dir} is not a finished run")
    finetune(args, labels, args.student, runs_dir / "labels-only", args.baseline_steps, args.size, None, ema=args.ema)
    runs["teacher (fine-tuned, labels only)"] = teacher_dir
    runs["student, labels only"] = runs_dir / "labels-only"
    if not args.no_cskd:
        align(args, cache, align_dir)
        s1 = runs_dir / ("stage1-only" if args.align_name == "align" else f"stage1-only-{args.align_name}")
        with_s1 = args.stage1_only or args.warm_start
        if with_s1:  # before CSKD, which --warm-start starts from it
            finetune(args, labels, f"run:{align_dir}", s1, args.baseline_steps, args.size, None, ema=args.ema)
        distill(args, labels, cache, teacher_dir, f"run:{s1 if args.warm_start else align_dir}",
                runs_dir / f"cskd{tag}", args.distill_lr_encoder)
        runs["student, CSKD (align + distill)"] = runs_dir / f"cskd{tag}"
        if with_s1:
            runs["student, Stage I only (align + finetune)"] = s1
    if args.ablation or args.no_cskd:
        student = f"run:{runs_dir / 'labels-only'}" if args.warm_start else args.student
        distill(args, labels, cache, teacher_dir, student, runs_dir / f"distill-only{tag}", None)
        runs["student, distill only (no Stage I)"] = runs_dir / f"distill-only{tag}"
    if args.all_labels_steps:
        finetune(args, labels, args.student, runs_dir / "all-labels", args.all_labels_steps, args.size, None, 1.0,
                 ema=args.ema)
        runs["reference: student on all train labels"] = runs_dir / "all-labels"

    log("evaluating on the test split")
    res = {name: evaluate(args, labels, run) for name, run in runs.items()}
    params = {name: json.loads((run / "iaa_model.json").read_text())["encoder"].get("params") for name, run in
              runs.items()}

    header = ["model", "params", "n", "SRCC [95% CI]", "PLCC [95% CI]", "accuracy"]
    lines = [[name, f"{params[name] / 1e6:.2f}M" if params[name] else "-", str(m["n"]), fmt_ci(m, "srcc"),
              fmt_ci(m, "plcc"), f"{m['acc']:.3f}" if m.get("acc") is not None else "-"] for name, m in res.items()]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        w = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(header)))
        for ln in lines:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(ln)))

    summary = {name: {k: v for k, v in m.items() if not k.startswith("_") and k != "skipped"} for name, m in res.items()}
    if args.proxy_from:
        counts, by_kind = srcc_by_kind(work / "proxy" / "labels.csv", res)
        print("\nSRCC within each degradation kind (test split; pristine photos only count in the overall SRCC):")
        print("| model | " + " | ".join(f"{k} (n={n})" for k, n in counts.items()) + " |")
        print("|---|" + "---|" * len(counts))
        for name, row in by_kind.items():
            print(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in counts) + " |")
        summary["srcc_by_kind"] = by_kind

    base = res["student, labels only"]
    print()
    for key, name in (("cskd_minus_labels_only", "student, CSKD (align + distill)"),
                      ("distill_only_minus_labels_only", "student, distill only (no Stage I)")):
        if name in res:
            d, lo, hi = paired_diff(res[name], base, args.bootstrap, args.seed, args.group_by)
            disjoint = res[name]["srcc_ci"][0] > base["srcc_ci"][1]
            print(f"{name.split(', ')[1]} - labels-only SRCC: {d:+.3f} (paired bootstrap 95% CI [{lo:+.3f}, "
                  f"{hi:+.3f}]); SRCC intervals disjoint: {'yes' if disjoint else 'no'}")
            summary[key] = {"srcc": d, "ci": [lo, hi], "intervals_disjoint": bool(disjoint)}
    if "student, CSKD (align + distill)" in res and "student, distill only (no Stage I)" in res:
        d1, lo1, hi1 = paired_diff(res["student, CSKD (align + distill)"], res["student, distill only (no Stage I)"],
                                   args.bootstrap, args.seed, args.group_by)
        print(f"CSKD - distill-only SRCC (what Stage I adds): {d1:+.3f} (paired bootstrap 95% CI "
              f"[{lo1:+.3f}, {hi1:+.3f}])")
        summary["cskd_minus_distill_only"] = {"srcc": d1, "ci": [lo1, hi1]}
    s1_name = "student, Stage I only (align + finetune)"
    if s1_name in res:
        d2, lo2, hi2 = paired_diff(res["student, CSKD (align + distill)"], res[s1_name], args.bootstrap, args.seed,
                                   args.group_by)
        print(f"CSKD - Stage I only SRCC (what Stage II adds): {d2:+.3f} (paired bootstrap 95% CI "
              f"[{lo2:+.3f}, {hi2:+.3f}])")
        summary["cskd_minus_stage1_only"] = {"srcc": d2, "ci": [lo2, hi2]}
    if args.probe and not args.no_cskd:
        summary["probe"] = {
            "aligned": knn_probe_score(args, labels, cache, f"run:{align_dir}", align_dir / "probe"),
            "random_init": knn_probe_score(args, labels, cache, args.student, work / f"probe-random-{args.size}")}
        print("kNN probe SRCC (label-fraction train labels -> other train labels): aligned "
              f"{summary['probe']['aligned']['srcc']:.3f}, random init {summary['probe']['random_init']['srcc']:.3f}")
    summary["args"] = vars(args)
    (runs_dir / f"srcc{tag}.json").write_text(json.dumps(summary, indent=2, default=str))
    from cskd_cache.inspect.compare import build_compare

    # the same runs side by side, labels-only first: its paired SRCC differences are the ones printed above
    order = ["student, labels only", *[n for n in runs if n != "student, labels only"]]
    page = build_compare([runs[n] for n in order], runs_dir / f"compare{tag}.html", args.bootstrap, args.seed,
                         labels=order)
    log(f"done in {time.perf_counter() - t0:.0f} s; numbers in {runs_dir / f'srcc{tag}.json'}, runs side by side "
        f"in {page['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
