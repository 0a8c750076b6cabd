"""The Stage II study on one proxy variant: label-efficiency curve, Stage II ablation, Stage I variants.

    # the two proxy variants of the README (different photos, splits, degradations, label recipes)
    python benchmarks/study.py --variant degradation --work runs/study/A
    python benchmarks/study.py --variant content --work runs/study/B
    # then the tables and the curve of both
    python benchmarks/study.py --report runs/study/A runs/study/B --plot docs/img/label_efficiency.png

Every row is one `benchmarks/srcc.py` protocol run (schedules in optimiser steps, the same at every label
fraction; best val step kept; photo-level bootstrap), sharing the proxy set, the cache and Stage I where the
row does not change them; a rerun reuses every finished run. What runs, per variant:

- the curve: label fractions 5%, 10%, 25%, 100%; labels-only, distill-only and CSKD students (and the teacher);
  with the study's lambda_u 4 (phase ``curve``) and with `cskd distill`'s default 1 (``curve-lu1``);
- the Stage II ablation at 10% labels: consistency 1, rounds 2 and 3, rounds 2 with the teacher refined; the attention-distance constraint with a
  ViT student (``vit_tiny_patch16_224`` at 112 px, its own labels-only / CSKD runs), on and off;
- the Stage I variants at 10% labels, each with the training-free kNN probe scored before its Stage II: no token
  loss, twice the Stage I steps, a 3x lower encoder learning rate in CSKD's distillation, standardised global
  targets;
- exposure: at 100% labels, distill-only and CSKD with the baseline's 300 steps (equal labelled images).
- weight: that CSKD row again with lambda_u 1 instead of 4 (does the teacher's weight drown the labels?), and
  lambda_u 1 at 10% labels (a row of the Stage II ablation) and at 25%.
- stage1-only: at every fraction, the Stage I student fine-tuned on the labels alone as long as labels-only (the
  chain without Stage II), beside the lambda_u 1 curve (the chain without Stage I is distill-only).
- diagnose-low: at 5% labels, the aligned student through distill with the teacher left out (lambda_u 0), as long
  as Stage I only and as the curve: where Stage II falls below Stage I only, is it the teacher or the pipeline?
- self: at every fraction, CSKD with Stage I only as its teacher instead of Lite0 fine-tuned (an aligned teacher,
  as in the paper; self-training, since it is the student's own architecture), lambda_u 1.
- seeds: at 100% and 5% labels, the lambda_u 1 chain (teacher, labels-only, Stage I only, distill-only, CSKD) again
  with two more training seeds (the variant's --seed + 1 and + 2), in fF-seedN; the report gives each seed and the
  mean over seeds.
- bn: at 100% and 5% labels, distill-only and CSKD (lambda_u 1) with the labelled items in a batch-norm batch of
  their own (``--bn-stats labelled``: only they move the running statistics; ``separate``: both batches do), for
  the first seed and replicate 1, paired with their joint runs.
- warm: at 100% and 5% labels, Stage II started from the fine-tuned students instead of a fresh head (CSKD from
  Stage I only, distill-only from labels-only; ``--warm-start``), lambda_u 1, first seed and replicate 1;
  warm-lr: the same with Stage II at lr 3e-4; warm-curve: warm at the curve's other fractions, first seed;
  warm-seed: at 10% labels the chain, with a new head and warm, again with replicate 1.
- diagnose: at 100% labels, distill-only as well as CSKD with lambda_u 1; both with lambda_u 0 (the teacher left
  out); both with eval label views (a labelled image shown whole, never as a crop), also at 10%; both with
  lambda_u 1 and the teacher's targets only on the images without a label (``--no-pool-labelled``).

Paired differences (same resampled test photos) are against the CSKD default of the same fraction, and for the
curve against the labels-only student.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import srcc  # noqa: E402

PHOTOS = str(ROOT.parent / "shared" / "data" / "photos" / "imagenet-sample")
SIZE = 128
COMMON = ["--student", "timm:mobilenetv3_small_100", "--size", str(SIZE), "--teacher-size", str(SIZE),
          "--teacher-steps", "120", "--baseline-steps", "300", "--align-steps", "300", "--distill-steps", "200",
          "--eval-every", "25", "--bootstrap", "1000"]
# Two proxies built differently: other photos and split (seed), other degradation kinds, versions per photo,
# unlabelled extras, and a score that depends on content as well as on quality.
VARIANTS = {
    "degradation": ["--photos", "320", "--seed", "0", "--per-image", "4", "--unlabelled-per-image", "4"],
    "content": ["--photos", "320", "--seed", "1", "--per-image", "3", "--unlabelled-per-image", "5",
                "--kinds", "blur,noise,jpeg,exposure", "--content-weight", "0.5"],
}
FRACTIONS = (0.05, 0.1, 0.25, 1.0)
CURVE_ORDER = (0.05, 1.0, 0.25, 0.1)  # the ends first: a curve cut short still spans the range
REF = 0.1
VIT = ["--student", "timm:vit_tiny_patch16_224", "--size", "112", "--runs", "vit-f0.1", "--align-name", "align-vit"]
# name -> (extra srcc.py arguments, runs folder, run name, Stage I folder)
ABLATION = {
    "consistency 1": (["--consistency", "1", "--tag=-cons"], "f0.1", "cskd-cons", "align"),
    "rounds 2": (["--rounds", "2", "--tag=-r2"], "f0.1", "cskd-r2", "align"),
    "rounds 3": (["--rounds", "3", "--tag=-r3"], "f0.1", "cskd-r3", "align"),
    "rounds 2, refine-teacher": (["--rounds", "2", "--refine-teacher", "--tag=-r2refine"], "f0.1", "cskd-r2refine",
                                 "align"),
    "lambda_u 1": (["--lambda-u", "1", "--tag=-lu1"], "f0.1", "cskd-lu1", "align"),
    "ViT student, CSKD": (VIT, "vit-f0.1", "cskd", "align-vit"),
    "ViT student, CSKD + attention distance 1": (VIT + ["--attn-distance", "1", "--tag=-attn"], "vit-f0.1",
                                                 "cskd-attn", "align-vit"),
}
STAGE1 = {
    "no token loss (global only)": (["--align-name", "align-notok", "--align-w-token", "0"], "f0.1", "cskd-notok",
                                    "align-notok"),
    "Stage I twice as long (600 steps)": (["--align-name", "align-long", "--align-steps", "600"], "f0.1",
                                          "cskd-long", "align-long"),
    "encoder lr 3e-4 in distill": (["--distill-lr-encoder", "3e-4", "--tag=-lrenc"], "f0.1", "cskd-lrenc",
                                   "align"),
    "standardised global targets": (["--align-name", "align-std", "--standardize-global"], "f0.1", "cskd-std",
                                    "align-std"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(work: Path, variant: str, extra: list[str]) -> None:
    argv = ["--proxy-from", PHOTOS, "--work", str(work), *VARIANTS[variant], *COMMON, *extra]
    log("srcc.py " + " ".join(extra))
    srcc.main(argv)


# phase -> (extra srcc.py arguments, run-name tag, what it is): the curve at the study's lambda_u 4, and at
# `cskd distill`'s default 1, the chain a user of the README runs; one weight at every label fraction, not one each
CURVES = {"curve": ([], "", "lambda_u 4"),
          "curve-lu1": (["--lambda-u", "1", "--tag=-lu1"], "-lu1", "lambda_u 1, `cskd distill`'s default")}
PHASES = ("core", "stage2", "stage1", "curve", "stage2b", "stage1b", "vit", "exposure", "weight", "diagnose",
          "curve-lu1", "stage1-only", "diagnose-low", "seeds", "self", "bn", "warm", "warm-lr", "warm-curve",
          "warm-seed")
# The chain against each stage skipped: distill-only skips Stage I; Stage I only (the aligned student fine-tuned on
# the labels, as long as labels-only) skips Stage II. Run beside the lambda_u 1 curve, whose runs it reuses.
STAGE1_ONLY = [*CURVES["curve-lu1"][0], "--stage1-only"]
# One training seed says nothing of how much a rerun moves: at SEED_FRACTIONS the whole label-dependent chain again
# with other training seeds (teacher, labels-only, Stage I only, distill-only, CSKD; the proxy, split, cache and
# Stage I unchanged), each in its own runs folder (`replicate`).
REPLICATES = (1, 2)  # training seed = the variant's --seed (the first run's) + K
SEED_FRACTIONS = (1.0, 0.05)  # where the chain came closest to a baseline, and where labels are fewest
# Where Stage II falls below Stage I only at few labels: the aligned student through distill's pipeline with the
# teacher left out (lambda_u 0), as long as Stage I only (300 steps, eval label views) and as the curve (200 steps,
# cached label views). CSKD only: the Stage I only run is the pair.
# label -> (extra srcc.py arguments, run-name tag)
LOW = {"lambda_u 0, 300 steps, eval label views": (["--distill-steps", "300", "--lambda-u", "0", "--label-views",
                                                    "eval"], "-s300-lu0"),
       "lambda_u 0, 200 steps, cached label views": (["--lambda-u", "0"], "-lu0"),
       # one unlabelled item per step instead of 32: do the unlabelled items' batch-norm statistics cost the
       # labelled ones, even with no loss on them?
       "lambda_u 0, 300 steps, eval label views, 1 unlabelled item per step":
           (["--distill-steps", "300", "--lambda-u", "0", "--label-views", "eval", "--unlabelled-ratio", "0.03"],
            "-s300-lu0-r1")}
LOW_CONTROL, LOW_ONE_ITEM = LOW["lambda_u 0, 300 steps, eval label views"][1], LOW[
    "lambda_u 0, 300 steps, eval label views, 1 unlabelled item per step"][1]
LOW_FRACTION = 0.05
# The paper's Stage II teacher is itself an aligned learner. Here the teacher is Lite0 fine-tuned directly, which
# at few labels ranks no better than the aligned student fine-tuned (Stage I only); this row makes Stage I only the
# teacher (self-training of the aligned student on the unlabelled views, Noisy-Student style: same size, views
# jittered), lambda_u 1, at every fraction. CSKD only.
SELF = (["--lambda-u", "1", "--tag=-lu1-self"], "-lu1-self")
# The batch-norm lead of diagnose-low (one unlabelled item per step beat 32 with no loss on them): distill-only
# and CSKD, lambda_u 1, with the labelled items in a forward of their own (`cskd distill --bn-stats`), at
# SEED_FRACTIONS, in the first seed's folder and replicate 1's, paired with the joint runs there.
# --bn-stats value -> (extra srcc.py arguments, run-name tag)
BN = {mode: (["--lambda-u", "1", "--bn-stats", mode, f"--tag=-lu1-bn{mode[0]}"], f"-lu1-bn{mode[0]}")
      for mode in ("labelled", "separate")}
BN_REPLICATES = (0, 1)  # 0: the first seed's own folder
# Stage II started from the fine-tuned students (`cskd distill --student run:FINETUNE_RUN`: head included, step 0
# kept when no step beats it on val), so that on val the chain can only match or beat skipping Stage II: CSKD from
# Stage I only, distill-only from labels-only (the chain without Stage I, started the same way). At SEED_FRACTIONS,
# in the first seed's folder and replicate 1's, lambda_u 1.
# label -> (extra srcc.py arguments, run-name tag): the default learning rate, and 3e-4, the rate the study already
# gives a model that continues from trained weights (the Lite0 teacher's encoder, --refine-lr-encoder)
WARMS = {"lr 1e-3 (the default)": (["--lambda-u", "1", "--warm-start", "--tag=-lu1-warm"], "-lu1-warm"),
         "lr 3e-4": (["--lambda-u", "1", "--warm-start", "--distill-lr", "3e-4", "--tag=-lu1-warm-lr3e-4"],
                     "-lu1-warm-lr3e-4")}
WARM = WARMS["lr 1e-3 (the default)"]
# At 100% labels the curve's distillation (200 steps x 32 labelled) sees fewer labelled images than labels-only
# (300 x 32): this row gives both distilled students the baseline's 300 steps, so label exposure is equal.
EXPOSURE = (1.0, ["--distill-steps", "300", "--tag=-s300"], "-s300")
# A diagnostic of that row: with every label in hand, does the teacher's 4x weight drown the labels? The same 300
# steps with lambda_u 1, CSKD only.
WEIGHT = (1.0, ["--distill-steps", "300", "--lambda-u", "1", "--tag=-s300-lu1"], "-s300-lu1")
# the second halves (b) are the costlier rows, run when the budget allows
LATER = {"rounds 3", "rounds 2, refine-teacher", "Stage I twice as long (600 steps)", "standardised global targets"}
WEIGHT_ONLY = {"lambda_u 1"}
# Where the chain falls short of labels-only (A at 100% labels), which part costs? Each row: CSKD and distill-only
# at that label fraction with the 300 steps of labels-only. lambda_u 0 keeps the teacher out (the aligned student
# trained on the labels alone, through distill's own data pipeline; its random-init twin is the pipeline's control,
# to be read against labels-only); eval label views show a labelled image its whole picture only, as finetune does.
DIAGNOSE = {
    "lambda_u 1": (WEIGHT[0], [a for a in WEIGHT[1] if not a.startswith("--tag")], WEIGHT[2]),  # + distill-only
    "lambda_u 0 (no teacher), eval label views": (1.0, ["--distill-steps", "300", "--lambda-u", "0",
                                                        "--label-views", "eval"], "-s300-lu0"),
    "eval label views": (1.0, ["--distill-steps", "300", "--label-views", "eval"], "-s300-eval"),
    "eval label views, 10% labels": (REF, ["--label-views", "eval"], "-eval"),
    "lambda_u 1, the teacher only on images without a label": (1.0, ["--distill-steps", "300", "--lambda-u", "1",
                                                                      "--no-pool-labelled"], "-s300-lu1-nopool"),
}


def replicate(variant: str, k: int, fraction: float) -> list[str]:
    """srcc.py arguments of replicate K: training seed = the variant's --seed (its first runs' seed) + K, in its own
    runs folder fFRACTION-seedN."""
    seed = int(VARIANTS[variant][VARIANTS[variant].index("--seed") + 1]) + k
    return ["--runs", f"f{fraction:g}-seed{seed}", "--train-seed", str(seed)]


def study(work: Path, variant: str, phases: list[str]) -> None:
    t0 = time.perf_counter()
    ref = ["--label-fraction", str(REF)]
    for phase in phases:
        if phase == "core":
            run(work, variant, [*ref, "--ablation", "--probe"])
        curve, _, one = phase.partition(":")  # curve:F runs that one label fraction
        if curve in CURVES:
            for f in (CURVE_ORDER if not one else [float(one)]):
                run(work, variant, ["--label-fraction", str(f), "--ablation", *CURVES[curve][0]])
        if phase in ("stage1", "stage1b"):
            for label, (extra, runs, name, align) in STAGE1.items():
                if (label in LATER) != (phase == "stage1b"):
                    continue
                tag = [] if any(x.startswith("--tag") for x in extra) else [f"--tag={name[len('cskd'):]}"]
                run(work, variant, [*ref, "--probe", *extra, *tag])
        if phase == "exposure":
            run(work, variant, ["--label-fraction", str(EXPOSURE[0]), "--ablation", *EXPOSURE[1]])
        if phase == "weight":  # and the same weight at the ablation's fraction, where the labels are few
            run(work, variant, ["--label-fraction", str(WEIGHT[0]), *WEIGHT[1]])
            for f in (REF, 0.25):  # 25% needs the curve's CSKD there to be compared with
                run(work, variant, ["--label-fraction", str(f), *ABLATION["lambda_u 1"][0]])
        if phase == "stage1-only":
            for f in CURVE_ORDER:
                run(work, variant, ["--label-fraction", str(f), *STAGE1_ONLY])
        if curve == "seeds":  # seeds:K runs replicate K only
            for f in SEED_FRACTIONS:
                for k in (REPLICATES if not one else [int(one)]):
                    run(work, variant, ["--label-fraction", str(f), "--ablation", *STAGE1_ONLY,
                                        *replicate(variant, k, f)])
        if curve == "bn":  # bn:K in replicate K's folder only
            for f in sorted(SEED_FRACTIONS):  # few labels first, where the lead came from
                for k in (BN_REPLICATES if not one else [int(one)]):
                    for extra, _ in BN.values():
                        run(work, variant, ["--label-fraction", str(f), "--ablation", *extra,
                                            *(replicate(variant, k, f) if k else [])])
        if curve == "warm-seed":  # warm-seed:F: at fraction F (default 10%) the chain again with replicate 1
            f = float(one) if one else REF
            for extra in ([*STAGE1_ONLY], WARM[0]):
                run(work, variant, ["--label-fraction", str(f), "--ablation", *extra, *replicate(variant, 1, f)])
        if phase == "warm-curve":  # the warm chain at the other fractions of the curve, first seed
            for f in (x for x in CURVE_ORDER if x not in SEED_FRACTIONS):
                run(work, variant, ["--label-fraction", str(f), "--ablation", *WARM[0]])
        if curve in ("warm", "warm-lr"):  # warm:K in replicate K's folder only
            extra = (WARMS["lr 3e-4"] if curve == "warm-lr" else WARM)[0]
            for f in sorted(SEED_FRACTIONS):
                for k in (BN_REPLICATES if not one else [int(one)]):
                    run(work, variant, ["--label-fraction", str(f), "--ablation", *extra,
                                        *(replicate(variant, k, f) if k else [])])
        if phase == "self":
            for f in CURVE_ORDER:
                run(work, variant, ["--label-fraction", str(f), *SELF[0],
                                    "--teacher-run", str(work / f"f{f:g}" / "stage1-only")])
        if curve == "diagnose-low":  # diagnose-low:K in replicate K's folder (after seeds:K)
            for extra, tag in LOW.values():
                run(work, variant, ["--label-fraction", str(LOW_FRACTION), *extra, f"--tag={tag}",
                                    *(replicate(variant, int(one), LOW_FRACTION) if one else [])])
        if phase == "diagnose":
            for f, extra, tag in DIAGNOSE.values():
                run(work, variant, ["--label-fraction", str(f), "--ablation", *extra, f"--tag={tag}"])
        if phase in ("stage2", "stage2b", "vit"):
            for label, (extra, runs, name, align) in ABLATION.items():
                if label not in WEIGHT_ONLY and (runs == "vit-f0.1") == (phase == "vit") and (phase == "vit" or
                                                                 (label in LATER) == (phase == "stage2b")):
                    teacher = ["--teacher-run", str(work / f"f{REF:g}" / "teacher")] if runs != f"f{REF:g}" else []
                    run(work, variant, [*ref, *extra, *teacher])
    log(f"phases {', '.join(phases)} done in {time.perf_counter() - t0:.0f} s")


# --- the report -------------------------------------------------------------------------------------------------


def load(run_dir: Path) -> dict | None:
    m = run_dir / "eval-test" / "metrics.json"
    if not m.is_file():
        return None
    out = json.loads(m.read_text())
    with open(run_dir / "eval-test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out["_pred"] = {r["key"]: float(r["pred"]) for r in rows}
    out["_true"] = {r["key"]: float(r["true"]) for r in rows}
    return out


def ci(m: dict) -> str:
    return f"{m['srcc']:.3f} [{m['srcc_ci'][0]:.3f}, {m['srcc_ci'][1]:.3f}]"


def diff(a: dict, b: dict) -> str:
    d, lo, hi = srcc.paired_diff(a, b, 1000, 0, r"^(.*)__")
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def probe(work: Path, align: str) -> str:
    f = work / align / "probe" / "probe.json"
    return f"{json.loads(f.read_text())['srcc']:.3f}" if f.is_file() else "-"


def correlation(pairs: list[tuple[float, float]], what: str) -> None:
    """How well the training-free probe predicts the SRCC after Stage II."""
    if len(pairs) < 3:
        return
    from cskd_cache.evaluate.metrics import srcc as spearman

    p, s = np.array(pairs).T
    print(f"\nkNN probe vs final SRCC over {what}: Pearson {np.corrcoef(p, s)[0, 1]:+.2f}, "
          f"Spearman {spearman(p, s):+.2f}")


def report(works: list[Path], plot: Path | None) -> None:
    curves, all_pairs = {}, []
    for work in works:
        name = work.name
        for _, tag, what in CURVES.values():
            curve = curve_table(work, tag, what)
            if curve and (tag or name not in curves):  # the plot shows the default's curve where it ran
                s1 = {f: load(work / f"f{f:g}" / "stage1-only") for f in curve}
                if all(s1.values()):  # the chain without Stage II, beside the one without Stage I
                    curve = {f: {**ms, "Stage I only": s1[f]} for f, ms in curve.items()}
                warm = {f: load(work / f"f{f:g}" / f"cskd{WARM[1]}") for f in curve}
                if tag and all(warm.values()):  # the chain with Stage II started from Stage I only
                    curve = {f: {**ms, "CSKD warm": warm[f]} for f, ms in curve.items()}
                curves[name] = (curve, what)
        weights = {f: (load(work / f"f{f:g}" / f"cskd{CURVES['curve-lu1'][1]}"), load(work / f"f{f:g}" / "cskd"))
                   for f in FRACTIONS}
        weights = {f: w for f, w in weights.items() if all(w)}
        if weights:
            print(f"\n{name}, CSKD lambda_u 1 - lambda_u 4 (paired): " + ", ".join(
                f"{f:.0%} {diff(a, b)}" for f, (a, b) in weights.items()))
        lu, c4, lab = (load(work / "f0.25" / k) for k in ("cskd-lu1", "cskd", "labels-only"))
        if lu is not None and c4 is not None and lab is not None:
            print(f"\n{name}, 25% labels with lambda_u 1: {ci(lu)}; - CSKD default {diff(lu, c4)}, - labels-only "
                  f"{diff(lu, lab)}")
        d = work / f"f{EXPOSURE[0]:g}"
        eq = {k: load(d / f"{k}{EXPOSURE[2]}") for k in ("distill-only", "cskd")}
        lab = load(d / "labels-only")
        if lab is not None and all(eq.values()):
            print(f"\n{name}, {EXPOSURE[0]:.0%} labels with Stage II given the baseline's 300 steps (equal labelled "
                  "images): ")
            print(f"distill-only {ci(eq['distill-only'])}, CSKD {ci(eq['cskd'])}; CSKD - labels-only "
                  f"{diff(eq['cskd'], lab)}, CSKD - distill-only {diff(eq['cskd'], eq['distill-only'])}, "
                  f"distill-only - labels-only {diff(eq['distill-only'], lab)}")
            lu1 = load(d / f"cskd{WEIGHT[2]}")
            if lu1 is not None:
                print(f"the same CSKD with lambda_u 1: {ci(lu1)}; - labels-only {diff(lu1, lab)}, - CSKD with lambda_u 4 "
                      f"{diff(lu1, eq['cskd'])}")
        skipped_stage(work)
        low(work)
        self_taught(work)
        seeds(work)
        batch_norm(work)
        warm_start(work)
        warm_chain(work)
        diagnose(work)
        pseudo_labels(work)
        ref = work / f"f{REF:g}"
        base, lab = load(ref / "cskd"), load(ref / "labels-only")
        if base is None:
            continue
        print(f"\n### {name}: Stage II ablation at {REF:.0%} labels (paired vs the CSKD default)\n")
        print("| variant | CSKD SRCC [95% CI] | - CSKD default | - labels-only |")
        print("|---|---|---|---|")
        print(f"| CSKD default (consistency 0, 1 round) | {ci(base)} | - | {diff(base, lab)} |")
        vit_lab, vit_base = load(work / "vit-f0.1" / "labels-only"), load(work / "vit-f0.1" / "cskd")
        for label, (_, runs, run_name, _) in ABLATION.items():
            m = load(work / runs / run_name)
            if m is None:
                continue
            if runs == "vit-f0.1" and run_name == "cskd" and vit_lab is not None:
                print(f"| ViT student, labels-only | {ci(vit_lab)} | - | - |")
            if runs == "vit-f0.1":
                vs = "-" if run_name == "cskd" or vit_base is None else diff(m, vit_base)
                print(f"| {label} | {ci(m)} | {vs} (vs ViT CSKD) | {diff(m, vit_lab) if vit_lab else '-'} "
                      "(vs ViT labels-only) |")
            else:
                print(f"| {label} | {ci(m)} | {diff(m, base)} | {diff(m, lab)} |")
        print(f"\n### {name}: Stage I variants at {REF:.0%} labels (kNN probe before Stage II; paired vs distill-only)"
              "\n")
        print("| Stage I | kNN probe SRCC | CSKD SRCC [95% CI] | - distill-only | - CSKD default |")
        print("|---|---|---|---|---|")
        do = load(ref / "distill-only")
        rand = work / f"probe-random-{SIZE}" / "probe.json"
        rp = f"{json.loads(rand.read_text())['srcc']:.3f}" if rand.is_file() else "-"
        print(f"| none (distill-only, random init) | {rp} | {ci(do)} | - | {diff(do, base)} |")
        print(f"| default (300 steps, global + token) | {probe(work, 'align')} | {ci(base)} | {diff(base, do)} | - |")
        pairs = [(rp, do["srcc"]), (probe(work, "align"), base["srcc"])]
        for label, (_, runs, run_name, align) in STAGE1.items():
            m = load(work / runs / run_name)
            if m is None:
                continue
            print(f"| {label} | {probe(work, align)} | {ci(m)} | {diff(m, do)} | {diff(m, base)} |")
            if align != "align":
                pairs.append((probe(work, align), m["srcc"]))
        pairs = [(float(p), s) for p, s in pairs if p != "-"]
        all_pairs += pairs
        correlation(pairs, f"{name}'s {len(pairs)} encoders (random init included)")
    correlation(all_pairs, f"all {len(all_pairs)} encoders of {', '.join(w.name for w in works)}")
    if plot:
        plot_curves(curves, plot)


def curve_table(work: Path, tag: str, what: str) -> dict:
    """One label-efficiency table (the fractions where every run of ``tag`` finished); returns its runs."""
    import yaml

    curve = {}
    for f in FRACTIONS:
        d = work / f"f{f:g}"
        ms = {k: load(d / k) for k in ("teacher", "labels-only")} | {k: load(d / f"{k}{tag}")
                                                                     for k in ("distill-only", "cskd")}
        if any(v is None for v in ms.values()):
            continue
        if not curve:
            print(f"\n### {work.name}: label-efficiency curve, {what} (test SRCC [95% photo-level CI]; paired vs "
                  "labels-only)\n")
            print("| labels | train labels | teacher | labels-only | distill-only | CSKD | "
                  "distill-only - labels-only | CSKD - labels-only | CSKD - distill-only |")
            print("|---|---|---|---|---|---|---|---|---|")
        n = (yaml.safe_load((d / "labels-only" / "config.yaml").read_text()).get("resolved") or {}).get(
            "train_labels_used")
        print(f"| {f:.0%} | {n if n is not None else '-'} | {ci(ms['teacher'])} | {ci(ms['labels-only'])} | "
              f"{ci(ms['distill-only'])} | {ci(ms['cskd'])} | {diff(ms['distill-only'], ms['labels-only'])} | "
              f"{diff(ms['cskd'], ms['labels-only'])} | {diff(ms['cskd'], ms['distill-only'])} |")
        curve[f] = ms
    return curve


def finished_rows(work: Path, runs: tuple[str, ...]) -> list[tuple]:
    """(fraction, *metrics of ``runs``) for every label fraction where all of ``runs`` finished."""
    rows = []
    for f in FRACTIONS:
        ms = [load(work / f"f{f:g}" / k) for k in runs]
        if all(m is not None for m in ms):
            rows.append((f, *ms))
    return rows


def warm_chain(work: Path) -> None:
    """The chain with Stage II started from Stage I only, at every fraction where it ran (the first seed), against
    each stage skipped: Stage I only, and distill-only (started from labels-only, and from random init)."""
    tag, warm = CURVES["curve-lu1"][1], WARM[1]
    rows = finished_rows(work, ("labels-only", "stage1-only", f"distill-only{tag}", f"distill-only{warm}",
                                f"cskd{warm}"))
    if not rows:
        return
    print(f"\n### {work.name}: the chain with Stage II started from Stage I only, against each stage skipped "
          "(lambda_u 1, first training seed; test SRCC [95% photo-level CI]; paired)\n")
    print("| labels | Stage I only | distill-only warm | CSKD warm | kept step | CSKD warm - Stage I only | "
          "CSKD warm - distill-only warm | CSKD warm - distill-only | CSKD warm - labels-only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f, lab, s1, do, dw, c in rows:
        print(f"| {f:.0%} | {ci(s1)} | {ci(dw)} | {ci(c)} | {kept_step(work / f'f{f:g}' / f'cskd{warm}')} | "
              f"{diff(c, s1)} | {diff(c, dw)} | {diff(c, do)} | {diff(c, lab)} |")


def skipped_stage(work: Path) -> None:
    """The lambda_u 1 chain against each of its stages skipped: Stage I only (aligned, fine-tuned on the labels)
    and distill-only (no Stage I), with labels-only (neither) for reference."""
    tag = CURVES["curve-lu1"][1]
    rows = finished_rows(work, ("labels-only", "stage1-only", f"distill-only{tag}", f"cskd{tag}"))
    if not rows:
        return
    print(f"\n### {work.name}: the chain (lambda_u 1) against each stage skipped (test SRCC [95% photo-level CI]; "
          "paired)\n")
    print("| labels | labels-only | Stage I only | distill-only | CSKD | CSKD - Stage I only | CSKD - distill-only | "
          "Stage I only - labels-only |")
    print("|---|---|---|---|---|---|---|---|")
    for f, lab, s1, do, c in rows:
        print(f"| {f:.0%} | {ci(lab)} | {ci(s1)} | {ci(do)} | {ci(c)} | {diff(c, s1)} | {diff(c, do)} | "
              f"{diff(s1, lab)} |")


def low(work: Path) -> None:
    """LOW's rows beside Stage I only and the lambda_u 1 CSKD of that fraction: is it the teacher's term or
    distill's own pipeline that costs where Stage II falls below Stage I only?"""
    folders = [work / f"f{LOW_FRACTION:g}", *sorted(work.glob(f"f{LOW_FRACTION:g}-seed*"))]
    for d in folders:
        low_table(work, d)
    # over the training seeds where every run finished: the mean of each paired difference
    names = ("stage1-only", f"cskd{LOW_CONTROL}", f"cskd{LOW_ONE_ITEM}", f"cskd{CURVES['curve-lu1'][1]}")
    runs = [ms for ms in ([load(d / n) for n in names] for d in folders) if all(m is not None for m in ms)]
    if len(runs) >= 2:
        s1, l0, r1, c = zip(*runs)
        print(f"\n{work.name}, {LOW_FRACTION:.0%} labels, mean over {len(runs)} training seeds (paired): "
              f"1 unlabelled item per step - 32 {seed_diff(list(zip(r1, l0)))}; CSKD lambda_u 1 - lambda_u 0 "
              f"{seed_diff(list(zip(c, l0)))}; lambda_u 0 - Stage I only {seed_diff(list(zip(l0, s1)))}; "
              f"1 unlabelled item per step - Stage I only {seed_diff(list(zip(r1, s1)))}")


def low_table(work: Path, d: Path) -> None:
    s1, c = load(d / "stage1-only"), load(d / f"cskd{CURVES['curve-lu1'][1]}")
    rows = [(k, m) for k, m in ((k, load(d / f"cskd{tag}")) for k, (_, tag) in LOW.items()) if m is not None]
    if s1 is None or c is None or not rows:
        return
    seed = f", training seed {d.name.rsplit('-seed', 1)[1]}" if "-seed" in d.name else ""
    print(f"\n### {work.name}: the aligned student at {LOW_FRACTION:.0%} labels, with and without the teacher{seed} "
          "(test SRCC; paired)\n")
    print("| run | SRCC [95% CI] | - Stage I only | CSKD (lambda_u 1) - it |")
    print("|---|---|---|---|")
    print(f"| Stage I only (`cskd finetune`, 300 steps) | {ci(s1)} | - | {diff(c, s1)} |")
    for k, m in rows:
        print(f"| distill, {k} | {ci(m)} | {diff(m, s1)} | {diff(c, m)} |")
    print(f"| CSKD, lambda_u 1 (200 steps, cached label views) | {ci(c)} | {diff(c, s1)} | - |")


def self_taught(work: Path) -> None:
    """CSKD taught by Stage I only (an aligned teacher) beside CSKD taught by Lite0 fine-tuned, and each baseline."""
    tag = CURVES["curve-lu1"][1]
    rows = finished_rows(work, ("labels-only", "stage1-only", f"distill-only{tag}", f"cskd{tag}", f"cskd{SELF[1]}"))
    if not rows:
        return
    print(f"\n### {work.name}: CSKD taught by Stage I only (an aligned teacher) instead of Lite0 fine-tuned "
          "(lambda_u 1; test SRCC; paired)\n")
    print("| labels | Stage I only (the teacher) | CSKD, Lite0 teacher | CSKD, Stage I only teacher | - Stage I only | "
          "- CSKD, Lite0 teacher | - labels-only | - distill-only |")
    print("|---|---|---|---|---|---|---|---|")
    for f, lab, s1, do, c, st in rows:
        print(f"| {f:.0%} | {ci(s1)} | {ci(c)} | {ci(st)} | {diff(st, s1)} | {diff(st, c)} | {diff(st, lab)} | "
              f"{diff(st, do)} |")


def seed_diff(pairs: list[tuple[dict, dict]]) -> str:
    """The mean over training seeds of SRCC(a) - SRCC(b), with a paired photo-level bootstrap interval: each
    resample of test photos scores every seed's pair on the same photos."""
    from cskd_cache.evaluate.evaluate import group_keys
    from cskd_cache.evaluate.metrics import bootstrap_ci, srcc as spearman

    keys = sorted(set.intersection(*(set(m["_pred"]) for pair in pairs for m in pair)))
    t = np.array([pairs[0][0]["_true"][k] for k in keys])
    p = np.stack([np.array([m["_pred"][k] for k in keys]) for pair in pairs for m in pair], 1)

    def mean_diff(tt, pp):
        return float(np.mean([spearman(tt, pp[:, 2 * i]) - spearman(tt, pp[:, 2 * i + 1])
                              for i in range(len(pairs))]))

    lo, hi = bootstrap_ci(mean_diff, t, p, n=1000, seed=0, groups=group_keys(keys, r"^(.*)__", None))
    return f"{mean_diff(t, p):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def seed_folders(work: Path, f: float) -> list[tuple[str, Path]]:
    """(training seed, runs folder) of fraction f: the first seed's own folder, then each replicate's."""
    import yaml

    first = work / f"f{f:g}" / "labels-only" / "config.yaml"
    if not first.is_file():
        return []
    return [(str(yaml.safe_load(first.read_text())["seed"]), work / f"f{f:g}")] + sorted(
        (d.name.rsplit("-seed", 1)[1], d) for d in work.glob(f"f{f:g}-seed*"))


def seeds(work: Path) -> None:
    """The chain with every training seed that ran, per fraction of SEED_FRACTIONS: one row per seed, then the mean
    over seeds of each paired difference."""
    tag = CURVES["curve-lu1"][1]
    names = {"labels-only": "labels-only", "Stage I only": "stage1-only", "distill-only": f"distill-only{tag}",
             "CSKD": f"cskd{tag}"}
    for f in sorted(SEED_FRACTIONS):
        runs = {}
        for seed, d in seed_folders(work, f):
            ms = {k: load(d / v) for k, v in names.items()} | {"teacher": load(d / "teacher")}
            if all(ms.values()):
                runs[seed] = ms
        if len(runs) >= 2:
            seed_table(work, f, names, runs)


def seed_table(work: Path, f: float, names: dict, runs: dict) -> None:
    print(f"\n### {work.name}: {f:.0%} labels, lambda_u 1, by training seed (test SRCC; paired)\n")
    print("| seed | teacher | labels-only | Stage I only | distill-only | CSKD | CSKD - labels-only | "
          "CSKD - Stage I only | CSKD - distill-only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, ms in runs.items():
        print(f"| {seed} | " + " | ".join(f"{ms[k]['srcc']:.3f}" for k in ("teacher", *names)) +
              f" | {diff(ms['CSKD'], ms['labels-only'])} | {diff(ms['CSKD'], ms['Stage I only'])} | "
              f"{diff(ms['CSKD'], ms['distill-only'])} |")
    mean = {k: np.mean([ms[k]["srcc"] for ms in runs.values()]) for k in ("teacher", *names)}
    print(f"| mean of {len(runs)} | " + " | ".join(f"{mean[k]:.3f}" for k in ("teacher", *names)) + " | " +
          " | ".join(seed_diff([(ms["CSKD"], ms[b]) for ms in runs.values()])
                     for b in ("labels-only", "Stage I only", "distill-only")) + " |")


BN_PAIRS = (("distill-only", "distill-only joint"), ("CSKD", "CSKD joint"), ("CSKD", "Stage I only"),
            ("CSKD", "distill-only"), ("CSKD", "labels-only"))


def bn_runs(work: Path, mode: str, f: float) -> dict:
    """training seed -> the runs BN_PAIRS compares for one --bn-stats mode at fraction f (seeds where all finished)."""
    tag, bn = CURVES["curve-lu1"][1], BN[mode][1]
    names = {"labels-only": "labels-only", "Stage I only": "stage1-only", "distill-only joint": f"distill-only{tag}",
             "CSKD joint": f"cskd{tag}", "distill-only": f"distill-only{bn}", "CSKD": f"cskd{bn}"}
    return {seed: ms for seed, ms in ((seed, {k: load(d / v) for k, v in names.items()})
                                      for seed, d in seed_folders(work, f)) if all(ms.values())}


def batch_norm(work: Path) -> None:
    """BN's rows of each --bn-stats mode beside the joint runs of the same seed folder: what it changes, and where
    the chain then stands against each stage skipped; a table per mode and fraction (per seed, then the mean over
    seeds), then those means of every mode and fraction in one table."""
    summary = []
    for mode in BN:
        for f in sorted(SEED_FRACTIONS):
            runs = bn_runs(work, mode, f)
            if not runs:
                continue
            print(f"\n### {work.name}: {f:.0%} labels, lambda_u 1, --bn-stats {mode} (test SRCC; paired)\n")
            print("| seed | distill-only | CSKD | " + " | ".join(f"{a} - {b}" for a, b in BN_PAIRS) + " |")
            print("|---|---|---|" + "---|" * len(BN_PAIRS))
            for seed, ms in runs.items():
                print(f"| {seed} | {ci(ms['distill-only'])} | {ci(ms['CSKD'])} | " +
                      " | ".join(diff(ms[a], ms[b]) for a, b in BN_PAIRS) + " |")
            means = [seed_diff([(ms[a], ms[b]) for ms in runs.values()]) for a, b in BN_PAIRS]
            if len(runs) >= 2:
                mean = {k: np.mean([ms[k]["srcc"] for ms in runs.values()]) for k in ("distill-only", "CSKD")}
                print(f"| mean of {len(runs)} | {mean['distill-only']:.3f} | {mean['CSKD']:.3f} | " +
                      " | ".join(means) + " |")
            summary.append(f"| {mode} | {f:.0%} | {len(runs)} | " + " | ".join(means) + " |")
    if summary:
        print(f"\n### {work.name}: batch-norm statistics, each mode against joint (lambda_u 1; mean over training "
              "seeds of the paired differences)\n")
        print("| --bn-stats | labels | seeds | " + " | ".join(f"{a} - {b}" for a, b in BN_PAIRS) + " |")
        print("|---|---|---|" + "---|" * len(BN_PAIRS))
        print("\n".join(summary))


WARM_PAIRS = (("CSKD warm", "Stage I only"), ("CSKD warm", "distill-only warm"), ("CSKD warm", "distill-only"),
              ("CSKD warm", "labels-only"), ("CSKD warm", "CSKD"), ("distill-only warm", "labels-only"))


def kept_step(run: Path) -> int:
    return int(json.loads((run / "iaa_model.json").read_text())["step"])


def warm_start(work: Path) -> None:
    """WARMS' rows beside the runs of the same seed folder: the chain started from Stage I only against each stage
    skipped (Stage I only; distill-only started from labels-only, and from random init), and against the chain
    started fresh; the step each warm run kept (0: its starting model). Per variant and fraction a table per seed,
    then the mean over seeds of every paired difference in one table."""
    tag = CURVES["curve-lu1"][1]
    summary = []
    for label, (_, warm) in WARMS.items():
        names = {"labels-only": "labels-only", "Stage I only": "stage1-only", "distill-only": f"distill-only{tag}",
                 "CSKD": f"cskd{tag}", "distill-only warm": f"distill-only{warm}", "CSKD warm": f"cskd{warm}"}
        for f in FRACTIONS:
            runs = {seed: (d, ms) for seed, d, ms in ((seed, d, {k: load(d / v) for k, v in names.items()})
                                                     for seed, d in seed_folders(work, f)) if all(ms.values())}
            if not runs:
                continue
            print(f"\n### {work.name}: {f:.0%} labels, Stage II started from the fine-tuned students, {label} "
                  "(lambda_u 1; test SRCC; paired)\n")
            print("| seed | distill-only warm | CSKD warm | kept steps | " +
                  " | ".join(f"{a} - {b}" for a, b in WARM_PAIRS) + " |")
            print("|---|---|---|---|" + "---|" * len(WARM_PAIRS))
            kept = []
            for seed, (d, ms) in runs.items():
                kept.append((kept_step(d / names["distill-only warm"]), kept_step(d / names["CSKD warm"])))
                print(f"| {seed} | {ci(ms['distill-only warm'])} | {ci(ms['CSKD warm'])} | {kept[-1][0]}, "
                      f"{kept[-1][1]} | " + " | ".join(diff(ms[a], ms[b]) for a, b in WARM_PAIRS) + " |")
            means = [seed_diff([(ms[a], ms[b]) for _, ms in runs.values()]) for a, b in WARM_PAIRS]
            if len(runs) >= 2:
                mean = {k: np.mean([ms[k]["srcc"] for _, ms in runs.values()])
                        for k in ("distill-only warm", "CSKD warm")}
                print(f"| mean of {len(runs)} | {mean['distill-only warm']:.3f} | {mean['CSKD warm']:.3f} | - | " +
                      " | ".join(means) + " |")
            at0 = sum(c == 0 for _, c in kept)
            summary.append(f"| {label} | {f:.0%} | {len(runs)} | {at0} of {len(kept)} | " + " | ".join(means) + " |")
    if summary:
        print(f"\n### {work.name}: Stage II started from the fine-tuned students (lambda_u 1; mean over training seeds "
              "of the paired differences)\n")
        print("| Stage II | labels | seeds | CSKD warm kept step 0 | " +
              " | ".join(f"{a} - {b}" for a, b in WARM_PAIRS) + " |")
        print("|---|---|---|---|" + "---|" * len(WARM_PAIRS))
        print("\n".join(summary))


def pseudo_labels(work: Path) -> None:
    """How good the teacher's targets are where no label exists: SRCC of its predicted mean score against the true
    score of the unlabelled extras (known to the proxy, never shown to any run), over every cached view of them."""
    from cskd_cache.cache.paths import resolve_paths
    from cskd_cache.cache.reader import open_cache
    from cskd_cache.evaluate.metrics import srcc as spearman
    from cskd_cache.inspect.proxy_quality import level_score
    from cskd_cache.stages.teacher_predictions import default_predictions_dir, read_predictions

    proxy = work / "proxy"
    if not (proxy / "unlabelled.csv").is_file() or not (work / "cache" / "manifest.json").is_file():
        return
    w = json.loads((proxy / "recipe.json").read_text()).get("content_weight") or 0.0
    pref: dict[str, float] = {}
    if w:  # the content variant: (1 - W) x quality + W x the photo's content preference
        with open(proxy / "content.csv", newline="") as f:
            pref = {r["source"]: float(r["preference"]) for r in csv.DictReader(f)}
    with open(proxy / "unlabelled.csv", newline="") as f:
        true = {str((proxy / r["path"]).resolve()):
                (1 - w) * level_score(int(r["level"])) + w * pref.get(r["source"], 0.0) for r in csv.DictReader(f)}
    cache = open_cache(work / "cache")
    paths = [str(Path(p).resolve()) for p in resolve_paths(cache, {})]
    rows = [i for i, p in enumerate(paths) if p in true]
    y = np.array([true[paths[i]] for i in rows])
    cells = []
    for f in FRACTIONS:
        t = work / f"f{f:g}" / "teacher"
        d = default_predictions_dir(t, cache) if (t / "iaa_model.json").is_file() else None
        if d is None or not d.is_dir():
            continue
        logits = read_predictions(d, cache).arrays["logits"][rows]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        mean = (p / p.sum(-1, keepdims=True) * np.arange(1, p.shape[-1] + 1)).sum(-1)  # (rows, views)
        cells.append(f"{f:.0%} {spearman(np.repeat(y, mean.shape[1]), mean.reshape(-1)):.3f}")
    if cells:
        print(f"\n{work.name}: the teacher's SRCC on the {len(rows)} unlabelled extras (every cached view; their true "
              f"scores are the proxy's, never shown to a run), by the teacher's label fraction: {', '.join(cells)}")


def diagnose(work: Path) -> None:
    """The rows of DIAGNOSE beside that fraction's default, each paired with labels-only and with each other."""
    rows = {"default (lambda_u 4, cached label views)": (EXPOSURE[0], EXPOSURE[2]),
            **{k: (f, tag) for k, (f, _, tag) in DIAGNOSE.items()}}
    found = []
    for label, (f, tag) in rows.items():
        d = work / f"f{f:g}"
        ms = {k: load(d / f"{k}{tag}") for k in ("cskd", "distill-only")} | {"lab": load(d / "labels-only")}
        if all(ms.values()):
            found.append((label, f, ms))
    if not found:
        return
    print(f"\n### {work.name}: what costs where the chain falls short (Stage II as long as labels-only at 100%)\n")
    print("| variant | labels | distill-only | CSKD | distill-only - labels-only | CSKD - labels-only | "
          "CSKD - distill-only | CSKD - that fraction's default CSKD |")
    print("|---|---|---|---|---|---|---|---|")
    for label, f, ms in found:
        base = load(work / f"f{f:g}" / ("cskd" + (EXPOSURE[2] if f == EXPOSURE[0] else "")))
        vs = "-" if base is None or label.startswith("default") else diff(ms["cskd"], base)
        print(f"| {label} | {f:.0%} | {ci(ms['distill-only'])} | {ci(ms['cskd'])} | "
              f"{diff(ms['distill-only'], ms['lab'])} | {diff(ms['cskd'], ms['lab'])} | "
              f"{diff(ms['cskd'], ms['distill-only'])} | {vs} |")


LEGEND = {"cskd": "CSKD", "CSKD warm": "CSKD, Stage II from Stage I only"}


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4), squeeze=False)
    styles = {"labels-only": ("tab:gray", "o"), "Stage I only": ("tab:orange", "D"), "distill-only": ("tab:blue", "s"),
              "cskd": ("tab:red", "^"), "CSKD warm": ("tab:purple", "v"), "teacher": ("tab:green", "x")}
    for ax, (name, (curve, what)) in zip(axes[0], curves.items()):
        fs = sorted(curve)
        shown = {k: v for k, v in styles.items() if k in curve[fs[0]]}
        for j, (key, (color, marker)) in enumerate(shown.items()):
            x = np.array(fs) * (1 + 0.05 * (j - (len(shown) - 1) / 2))  # side by side: intervals stay visible
            y = np.array([curve[f][key]["srcc"] for f in fs])
            lo = np.array([curve[f][key]["srcc_ci"][0] for f in fs])
            hi = np.array([curve[f][key]["srcc_ci"][1] for f in fs])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker=marker, color=color, capsize=3,
                        label=LEGEND.get(key, key), linestyle="--" if key == "teacher" else "-")
        ax.set_xscale("log")
        ax.set_xticks(fs, [f"{f:.0%}" for f in fs])
        ax.minorticks_off()
        ax.set_xlabel("share of train labels")
        ax.set_ylabel("test SRCC (95% photo-level CI)")
        ax.set_title(f"proxy {name}: {what.split(',')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\ncurve: {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), help="run the study on this proxy variant")
    p.add_argument("--work", help="the variant's work folder")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated, in order (default {','.join(PHASES)}): core = 10%% labels with the "
                        "distill-only ablation and the probe; curve (or curve:F, one fraction); stage2; stage1; stage2b; stage1b; vit; "
                        "exposure = 100%% labels with Stage II as long as labels-only; weight = that CSKD with "
                        "lambda_u 1; diagnose = what costs at 100%% labels (lambda_u 1 and 0, eval label views); "
                        "curve-lu1 = the curve with lambda_u 1; stage1-only = the Stage I student fine-tuned on "
                        "the labels at every fraction (the chain without Stage II); seeds = the chain at 100%% and "
                        "5%% labels with two more training seeds (seeds:K, the K-th only); diagnose-low = the "
                        "aligned student through distill without the teacher at 5%% (diagnose-low:K, in replicate "
                        "K's folder); self = CSKD with Stage I only as the teacher; bn = distill-only and CSKD with "
                        "--bn-stats labelled and separate at 100%% and 5%% labels, first seed and replicate 1 "
                        "(bn:K, one); warm = distill-only and CSKD started from the fine-tuned students (labels-only, "
                        "Stage I only) at 100%% and 5%% labels, first seed and replicate 1 (warm:K, one); "
                        "warm-lr = the same at Stage II lr 3e-4; warm-curve = warm at 10%% and 25%%, first seed; "
                        "warm-seed = the chain, fresh and warm, with replicate 1 at 10%% (warm-seed:F at F)")
    p.add_argument("--report", nargs="+", type=Path, help="print the tables of these work folders")
    p.add_argument("--plot", type=Path, help="with --report: the label-efficiency curve PNG")
    a = p.parse_args(argv)
    if a.report:
        report(a.report, a.plot)
        return 0
    if not a.variant or not a.work:
        p.error("--variant and --work (or --report)")
    study(Path(a.work), a.variant, [x for x in a.phases.split(",") if x])
    return 0


if __name__ == "__main__":
    sys.exit(main())
