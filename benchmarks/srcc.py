"""Does CSKD help? The whole chain on one labelled set, one table: teacher, labels-only student, CSKD student.

    # the proxy quality experiment (real photos, graded degradations, a real pretrained teacher, 10% of labels)
    python benchmarks/srcc.py --proxy-from ../shared/data/photos --work runs/srcc --markdown

    # any labelled set: a DATASET_SPEC plus the unlabelled images to extract (the labelled ones are among them)
    python benchmarks/srcc.py --labels ava:/data/AVA --images /data/AVA/images --images /data/unlabelled \
        --teacher open_clip:ViT-L-14@/models/vitl14.pt --teacher-model run:runs/align-vitl --work runs/ava

Steps (each writes under --work and is skipped when its output is already there, so a rerun only evaluates; a
finished student run made with another --ema is refused, not compared):

1. ``proxy``   (with --proxy-from) `cskd_cache.inspect.proxy_quality`: every source photo pristine + 4 degraded versions
               (blur, noise, JPEG, exposure, colour; 5 levels), score = 10 - 1.8 x level, split by source photo;
               each train photo also gets --unlabelled-per-image more versions that are never labels.
2. ``cache``   `cskd extract` with the feature teacher (default: EfficientNet-Lite0, ImageNet-pretrained, the only
               real pretrained image backbone offline; stands in for CLIP), --views views, tokens at native grid.
               With --proxy-from it holds the train photos' versions only (``pool.txt``): Stage I and Stage II never
               see a val or test photo, not even unlabelled.
3. ``labels-only`` `cskd finetune` of the student (random init) on --label-fraction of the train labels: the
               baseline.
4. ``align``   `cskd align` of the student (random init) on the cache: Stage I (--standardize-global: to
               per-dimension standardised embeddings).
5. ``teacher`` `cskd finetune` of --teacher-model (default: that same pretrained EfficientNet-Lite0 as a trainable
               py: student) on the same labels: the Stage II IAA teacher.
6. ``cskd``    `cskd distill --teacher run:TEACHER --student run:ALIGN`: labelled EMD + --lambda-u x EMD to the
               teacher's distribution on every unlabelled cached view (val/test images are never in that pool),
               shown with a mild crop + flip inside the view (--jitter-views, the default; labels-only trains with
               the same augmentation).
7. ``distill-only`` (--ablation) `cskd distill` from a random-init student: what Stage I adds.
8. ``all-labels`` (--all-labels-epochs N) `cskd finetune` of the student on *every* train label: not a CSKD
               result but a reference, what this student reaches in this budget when labels are not scarce.

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
    if not (out / "labels.csv").is_file() or (args.unlabelled_per_image and not (out / "unlabelled.csv").is_file()):
        src = Path(args.proxy_from)
        if not src.is_dir():
            sys.exit(f"error: --proxy-from {src} is not a folder of photos (e.g. ../shared/data/photos)")
        files = [str(p) for p in scan_images(src)]
        log(f"proxy set: {len(files)} photos from {src} -> {out}")
        build_proxy_set(files, out, per_image=args.per_image, seed=args.seed, workers=args.workers,
                        unlabelled_per_image=args.unlabelled_per_image)
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


def finished(out: Path, **settings) -> bool:
    """True when the run in ``out`` is complete (loss_curve.png is written last). A finished run trained with
    other ``settings`` (config keys: ema, jitter_views) is an error, not something to compare silently; a key
    its config lacks (runs from before it existed) counts as off."""
    if not done(out, "loss_curve.png"):
        return False
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    for key, want in settings.items():
        have = type(want)(saved.get(key) or 0)
        if have != want:
            flag = "--" + key.replace("_", "-")
            sys.exit(f"error: {out} was trained with {flag} {have}, this run asks for {want}; remove it or use "
                     "another --work")
    return True


def finetune(args, labels: str, model: str, out: Path, epochs: int, size: int | None, lr_encoder: float | None,
             label_fraction: float | None = None, ema: float = 0.0):
    from cskd_cache.stages.finetune import FinetuneConfig, run_finetune

    fraction = args.label_fraction if label_fraction is None else label_fraction
    if not finished(out, ema=ema):
        log(f"finetune {model} -> {out}")
        s = run_finetune(FinetuneConfig(model=model, labels=labels, out=str(out), label_fraction=fraction,
                                        epochs=epochs, batch_size=args.batch_size, size=size, lr=args.lr,
                                        lr_encoder=lr_encoder, seed=args.seed, num_workers=args.workers, ema=ema,
                                        trust_code=True))  # its own runs, whose py: zoo spec it wrote
        log(f"finetune {out.name}: val SRCC {s['val']['srcc']:.3f} (epoch {s['best_epoch']})")


def align(args, cache: str, out: Path):
    from cskd_cache.stages.align import AlignConfig, run_align

    if not finished(out, standardize_global=args.standardize_global):
        log(f"align {args.student} on {cache} -> {out}")
        s = run_align(AlignConfig(cache=cache, student=args.student, out=str(out), epochs=args.align_epochs,
                                  batch_size=args.batch_size, size=args.size, lr=args.lr, seed=args.seed,
                                  num_workers=args.workers, standardize_global=args.standardize_global,
                                  view_pixels=args.view_pixels))
        log(f"align: held-out global cos {s['initial']['global_cos']:.3f} -> {s['global_cos']:.3f}, "
            f"kNN agreement {s['initial']['knn_agreement']:.3f} -> {s['knn_agreement']:.3f}")


def distill(args, labels: str, cache: str, teacher_run: Path, student: str, out: Path):
    from cskd_cache.stages.distill import DistillConfig, run_distill

    if not finished(out, ema=args.ema, jitter_views=args.jitter_views):
        log(f"distill {student} from run:{teacher_run} -> {out}")
        s = run_distill(DistillConfig(labels=labels, cache=cache, teacher=f"run:{teacher_run}", student=student,
                                      out=str(out), label_fraction=args.label_fraction, epochs=args.distill_epochs,
                                      batch_size=args.batch_size, size=args.size, lr=args.lr,
                                      lambda_u=args.lambda_u, unlabelled_ratio=args.unlabelled_ratio, seed=args.seed,
                                      num_workers=args.workers, ema=args.ema,
                                      jitter_views=args.jitter_views, trust_code=True,
                                      view_pixels=args.view_pixels))
        log(f"distill {out.name}: val SRCC {s['val']['srcc']:.3f}; {s['unlabelled_rows']} unlabelled rows, "
            f"{s['heldout_rows']} held out")


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
    return m


def paired_diff(a: dict, b: dict, n: int, seed: int, group_by: str | None = None) -> tuple[float, float, float]:
    """SRCC(a) - SRCC(b) on the test images both scored, with a paired bootstrap interval (photo-level with
    ``group_by``: every version of a source photo resampled together)."""
    from cskd_cache.evaluate.evaluate import group_keys

    keys = sorted(set(a["_pred"]) & set(b["_pred"]))
    t = np.array([a["_true"][k] for k in keys])
    pa, pb = np.array([a["_pred"][k] for k in keys]), np.array([b["_pred"][k] for k in keys])
    both = np.stack([pa, pb], 1)
    groups = group_keys(keys, group_by) if group_by else None
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
        table[name] = {k: srcc([m["_true"][x] for x in ks], [m["_pred"][x] for x in ks]) for k, ks in groups.items()}
        counts.update({k: len(ks) for k, ks in groups.items()})
    return dict(sorted(counts.items())), table


def fmt_ci(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci")
    return f"{m[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[name]:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--proxy-from", help="folder of photos to build the proxy quality set from")
    src.add_argument("--labels", help="DATASET_SPEC of a labelled set (ava:ROOT, csv:FILE, ...)")
    p.add_argument("--images", action="append", default=[], help="unlabelled image folders to extract (with --labels)")
    p.add_argument("--work", required=True, help="folder for every intermediate (reruns reuse what is there)")
    p.add_argument("--teacher", default=LITE0_TEACHER, help=f"feature teacher spec for the cache ({LITE0_TEACHER})")
    p.add_argument("--teacher-model", default=LITE0_STUDENT,
                   help=f"encoder fine-tuned as the IAA teacher ({LITE0_STUDENT}; e.g. run:ALIGN_RUN)")
    p.add_argument("--student", default="timm:mobilenetv3_small_100", help="student spec (random init)")
    p.add_argument("--size", type=int, default=224, help="student input size (default 224)")
    p.add_argument("--label-fraction", type=float, default=0.1, help="share of train labels used (default 0.1)")
    p.add_argument("--per-image", type=int, default=4, help="degraded versions per proxy photo (default 4)")
    p.add_argument("--unlabelled-per-image", type=int, default=8,
                   help="unlabelled extra versions per train photo, with --proxy-from (default 8; 0: the train "
                        "split alone is the pool)")
    p.add_argument("--views", type=int, default=2, help="cached views per image (default 2)")
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--baseline-epochs", type=int, default=40,
                   help="labels-only epochs (more than distill: it sees far fewer images per epoch)")
    p.add_argument("--align-epochs", type=int, default=6)
    p.add_argument("--distill-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-u", type=float, default=4.0,
                   help="weight of the distillation loss (default 4: at 1 the 284 labels, seen ~10x per epoch, "
                   "are memorised)")
    p.add_argument("--unlabelled-ratio", type=float, default=1.0,
                   help="unlabelled images per labelled image in a distill step (default 1)")
    p.add_argument("--standardize-global", action="store_true",
                   help="Stage I aligns to per-dimension standardised embeddings (`cskd align --standardize-global`)")
    p.add_argument("--jitter-views", action=argparse.BooleanOptionalAction, default=True,
                   help="distil with a mild crop + flip inside each cached view (`cskd distill --jitter-views`, "
                        "the default)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="weight EMA decay of every student run (labels-only, distill, all-labels); the teacher "
                        "never (default 0 = off)")
    p.add_argument("--ablation", action="store_true", help="also distil into a random-init student (no Stage I)")
    p.add_argument("--all-labels-epochs", type=int, default=0,
                   help="also train the student on all train labels for N epochs, as a reference (default 0: no)")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args(argv)

    if args.proxy_from and args.group_by is None:
        args.group_by = r"^(.*)__"  # the proxy set's NAME__kind.png: versions of one photo are not independent
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.proxy_from:
        labels = step_proxy(args, work)
        images, lists = [], [str(proxy_pool(work, args.unlabelled_per_image > 0))]
    else:
        labels, images, lists = args.labels, args.images, []
        if not images:
            sys.exit("error: --labels needs --images (the unlabelled folders, labelled images included)")
    cache = step_cache(args, work, images, lists)

    runs = {}
    finetune(args, labels, args.student, work / "labels-only", args.baseline_epochs, args.size, None, ema=args.ema)
    align(args, cache, work / "align")
    finetune(args, labels, args.teacher_model, work / "teacher", args.teacher_epochs, None, 3e-4)
    runs["teacher (fine-tuned, labels only)"] = work / "teacher"
    runs["student, labels only"] = work / "labels-only"
    distill(args, labels, cache, work / "teacher", f"run:{work / 'align'}", work / "cskd")
    runs["student, CSKD (align + distill)"] = work / "cskd"
    if args.ablation:
        distill(args, labels, cache, work / "teacher", args.student, work / "distill-only")
        runs["student, distill only (no Stage I)"] = work / "distill-only"
    if args.all_labels_epochs:
        finetune(args, labels, args.student, work / "all-labels", args.all_labels_epochs, args.size, None, 1.0,
                 ema=args.ema)
        runs["reference: student on all train labels"] = work / "all-labels"

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

    if args.proxy_from:
        counts, by_kind = srcc_by_kind(work / "proxy" / "labels.csv", res)
        print("\nSRCC within each degradation kind (test split; pristine photos only count in the overall SRCC):")
        print("| model | " + " | ".join(f"{k} (n={n})" for k, n in counts.items()) + " |")
        print("|---|" + "---|" * len(counts))
        for name, row in by_kind.items():
            print(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in counts) + " |")

    base, cskd = res["student, labels only"], res["student, CSKD (align + distill)"]
    d, lo, hi = paired_diff(cskd, base, args.bootstrap, args.seed, args.group_by)
    disjoint = cskd["srcc_ci"][0] > base["srcc_ci"][1]
    print(f"\nCSKD - labels-only SRCC: {d:+.3f} (paired bootstrap 95% CI [{lo:+.3f}, {hi:+.3f}]); "
          f"SRCC intervals disjoint: {'yes' if disjoint else 'no'}")
    summary = {name: {k: v for k, v in m.items() if not k.startswith("_") and k != "skipped"} for name, m in res.items()}
    if args.proxy_from:
        summary["srcc_by_kind"] = by_kind
    summary["cskd_minus_labels_only"] = {"srcc": d, "ci": [lo, hi], "intervals_disjoint": bool(disjoint)}
    if args.ablation:  # what Stage I adds: the same distillation with and without the aligned start
        d1, lo1, hi1 = paired_diff(cskd, res["student, distill only (no Stage I)"], args.bootstrap, args.seed,
                                   args.group_by)
        print(f"CSKD - distill-only SRCC (what Stage I adds): {d1:+.3f} (paired bootstrap 95% CI "
              f"[{lo1:+.3f}, {hi1:+.3f}])")
        summary["cskd_minus_distill_only"] = {"srcc": d1, "ci": [lo1, hi1]}
    summary["args"] = vars(args)
    (work / "srcc.json").write_text(json.dumps(summary, indent=2, default=str))
    from cskd_cache.inspect.compare import build_compare

    # the same runs side by side, labels-only first: its paired SRCC differences are the ones printed above
    order = ["student, labels only", *[n for n in runs if n != "student, labels only"]]
    page = build_compare([runs[n] for n in order], work / "compare.html", args.bootstrap, args.seed, labels=order)
    log(f"done in {time.perf_counter() - t0:.0f} s; numbers in {work / 'srcc.json'}, runs side by side in {page['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
