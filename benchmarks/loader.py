"""How many loader workers keep one training step fed? Cached-view items/s per worker from the originals, from the
originals with JPEG draft decoding, and from a view store; and the training-step rate of three students.

    python benchmarks/loader.py --markdown                      # the shared photos (../shared/data/photos)
    python benchmarks/loader.py --photos DIR --n 200 --sizes 224 --students mobilenetv3_small_100 --markdown

Data: two feature caches extracted here with a tiny random-init teacher (``timm:test_vit@none``: the features do
not matter, only the views), one of --n ImageNet-sized photos (``imagenet-sample/``, about 500x375) and one of
the high-resolution wallpapers (``wallpapers/``, up to 5120 px), each with --views cached views per image (view 0
the teacher's eval view, the rest random crops of 25-100 % of the area, as `cskd extract --views` draws them),
and, per student size S, a view store of the smallest multiple of 32 that covers S with jitter (160 -> 192,
224 -> 256, 384 -> 448; `cskd cache add-views`).

Loader rate: `data.datasets.CachedViews` exactly as `cskd distill` builds its unlabelled stream (one cached view
per item and pass, jittered) at S x S, iterated in this process with one torch thread (what one DataLoader
worker does), over every row --passes times; items/s is the median over --repeat runs. (a) ``originals``:
``--view-pixels exact`` (full decodes, as cskd 0.2), (b) ``draft``: ``--view-pixels originals`` (draft mode),
(c) ``store``. Each item is hashed-checked against the cache the first time a process reads its file (as in
training), so the first pass pays the sha256 too; --passes 2 (default) shows the steady state in the second.

Student rate: `align.train_step` (AdamW, the cosine loss to a random 512-d target through the projection head)
on random input at 224 px, batch --batch-size, all --threads, median over --steps after one warm-up step.
``workers to feed`` = student img/s / loader items/s per worker (store and originals).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import write_outputs  # noqa: E402
from cskd_cache.cache.paths import resolve_paths  # noqa: E402
from cskd_cache.cache.reader import open_cache  # noqa: E402
from cskd_cache.cache.view_store import needed_size, open_store  # noqa: E402
from cskd_cache.data.datasets import CachedViews  # noqa: E402
from cskd_cache.stages.add_views import run_add_views  # noqa: E402
from cskd_cache.stages.extract import ExtractConfig, run_extract  # noqa: E402
from cskd_cache.stages.view_pixels import suggest_size  # noqa: E402

MODES = ("originals", "draft", "store")


def _subset(src: Path, n: int, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    for p in files:
        os.symlink(p.resolve(), dst / p.name)
    return dst


def _cache(images: Path, out: Path, views: int) -> Path:
    run_extract(ExtractConfig(teacher="timm:test_vit@none", out=str(out), images=[str(images)], views=views,
                              num_workers=0, batch_size=16, tokens=False, device="cpu"))
    return out


def _rate(cache, paths, size: int, mode: str, store, passes: int) -> tuple[float, float]:
    """(items/s over all passes, items/s of the last pass)."""
    cfg = {"size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    ds = CachedViews(paths, cfg, rows=np.arange(len(cache)), boxes=cache.boxes, jitter=True, seed=0,
                     digests=cache.digests, sizes=cache.sizes, store=store if mode == "store" else None,
                     draft=mode == "draft")
    n = len(ds)
    t0 = time.perf_counter()
    last = t0
    for p in range(passes):
        last = time.perf_counter()
        for i in range(p * n, (p + 1) * n):
            ds[i]
    end = time.perf_counter()
    return passes * n / (end - t0), n / (end - last)


def _student_rate(name: str, batch: int, steps: int) -> float:
    from cskd_cache.losses.align import AlignLoss
    from cskd_cache.models.align_heads import AlignHeads, AlignModel
    from cskd_cache.models.runs import build_encoder
    from cskd_cache.stages.align import train_step

    torch.manual_seed(0)
    student = build_encoder(f"timm:{name}", size=224)
    model = AlignModel(student, AlignHeads(student.pooled_dim, student.grid_dim, 512, None, (7, 7)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = AlignLoss(1.0, 0.0, 0.0, 2.0)
    batch_d = {"image": torch.randn(batch, 3, 224, 224), "embed": torch.nn.functional.normalize(
        torch.randn(batch, 512), dim=-1)}
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        train_step(model, loss, batch_d, opt, torch.device("cpu"))
        if s:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def _fed(cache, paths, store, mode: str, student: str, device: str, workers: int, batch: int, steps: int) -> dict:
    """On a GPU: the loader alone with ``workers`` DataLoader workers, the student's AMP step alone on random input,
    and both together (the step fed by the loader), in items/s, at 224 px with jittered views."""
    from torch.utils.data import DataLoader

    from cskd_cache.data.datasets import StepBatches, collate
    from cskd_cache.losses.align import AlignLoss
    from cskd_cache.models.align_heads import AlignHeads, AlignModel
    from cskd_cache.models.runs import build_encoder
    from cskd_cache.stages.align import train_step
    from cskd_cache.train.engine import autocast_for

    cfg = {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    ds = CachedViews(paths, cfg, rows=np.arange(len(cache)), boxes=cache.boxes, jitter=True, seed=0,
                     digests=cache.digests, sizes=cache.sizes, store=store if mode == "store" else None,
                     draft=mode == "draft", embed=cache.embed)
    dev = torch.device(device)
    torch.manual_seed(0)
    enc = build_encoder(f"timm:{student}", size=224)
    model = AlignModel(enc, AlignHeads(enc.pooled_dim, enc.grid_dim, cache.embed_dim, None, (7, 7))).to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = AlignLoss(1.0, 0.0, 0.0, 2.0)
    autocast, scaler = autocast_for(dev, True)

    def loader():
        sampler = StepBatches(len(ds), batch, 0, 0, steps + 2)
        return DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                          pin_memory=dev.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers else None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(it, fn):
        t0 = None
        for k, b in enumerate(it):
            fn(b)
            if k == 1:  # the first two batches start the workers and warm the kernels
                sync()
                t0 = time.perf_counter()
        sync()
        return steps * batch / (time.perf_counter() - t0)

    def step(b):
        train_step(model, loss, {"image": b["image"].to(dev, non_blocking=True).contiguous(
            memory_format=torch.channels_last), "embed": b["embed"].to(dev, non_blocking=True)}, opt, dev,
            autocast=autocast, scaler=scaler)

    fixed = next(iter(loader()))
    return {"mode": mode, "student": student, "workers": workers, "batch": batch,
            "loader_img_s": timed(loader(), lambda b: None),
            "step_img_s": timed([fixed] * (steps + 2), step),
            "fed_img_s": timed(loader(), step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    ap.add_argument("--n", type=int, default=120, help="ImageNet-sized photos to use")
    ap.add_argument("--wallpapers", type=int, default=24, help="wallpapers to use")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--sizes", default="160,224,384")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--students", default="mobilenetv3_small_100,efficientnet_b0,resnet50")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="cuda: also measure the GPU step fed by --workers workers")
    ap.add_argument("--fed", action="store_true", help="measure the fed step on --device even when it is the CPU "
                                                       "(a dry run of the GPU part)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--csv")
    args = ap.parse_args()
    if not (args.photos / "imagenet-sample").is_dir():
        sys.exit(f"{args.photos}: no imagenet-sample/ here; pass --photos (the shared photos folder)")
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cskd-loader-"))
    rows, out = [], {"loader": [], "students": []}
    try:
        sets = {"ImageNet-sized": _subset(args.photos / "imagenet-sample", args.n, work / "imagenet")}
        if args.wallpapers:
            sets["wallpapers"] = _subset(args.photos / "wallpapers", args.wallpapers, work / "wallpapers")
        torch.set_num_threads(1)  # one loader worker
        for name, folder in sets.items():
            c = _cache(folder, work / f"cache-{name}", args.views)
            cache = open_cache(c)
            paths = resolve_paths(cache)
            px = float(np.mean(np.prod(cache.sizes.astype(np.float64), axis=1)))
            for size in sizes:
                store_size = suggest_size(needed_size([size, size], jitter=True))
                st = run_add_views(c, store_size, num_workers=0)
                store = open_store(cache, store_size)
                rates = {}
                for mode in MODES:
                    runs = [_rate(cache, paths, size, mode, store, args.passes) for _ in range(args.repeat)]
                    rates[mode] = statistics.median(r[1] for r in runs)
                row = {"photos": name, "mean_mpix": px / 1e6, "size": size, "store": store_size,
                       "store_kb_per_view": st.bytes_per_view / 1e3,
                       **{f"{m}_img_s": rates[m] for m in MODES},
                       "draft_x": rates["draft"] / rates["originals"], "store_x": rates["store"] / rates["originals"]}
                rows.append(row)
                out["loader"].append(row)
                print(json.dumps(row), flush=True)
        torch.set_num_threads(args.threads)
        students = []
        for s in [x for x in args.students.split(",") if x]:
            r = _student_rate(s, args.batch_size, args.steps)
            feed = {m: r / next(x[f"{m}_img_s"] for x in rows if x["photos"] == "ImageNet-sized" and x["size"] == 224)
                    for m in MODES} if any(x["size"] == 224 for x in rows) else {}
            students.append({"student": s, "threads": args.threads, "img_s": r,
                             **{f"workers_{m}": v for m, v in feed.items()}})
            print(json.dumps(students[-1]), flush=True)
        out["students"] = students
        if args.device.startswith("cuda") or args.fed:
            c = work / "cache-ImageNet-sized"
            cache = open_cache(c)
            store = open_store(cache, 256)
            out["gpu"] = []
            for mode in MODES:
                r = _fed(cache, resolve_paths(cache), store, mode, "mobilenetv3_small_100", args.device,
                         args.workers, args.gpu_batch, max(4, len(cache) * args.passes // args.gpu_batch))
                out["gpu"].append(r)
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))

    def markdown(rows):
        lines = ["| photos | mean Mpx | student px | store px | store KB/view | originals img/s | draft img/s | "
                 "store img/s | draft / originals | store / originals |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['photos']} | {r['mean_mpix']:.2f} | {r['size']} | {r['store']} | "
                         f"{r['store_kb_per_view']:.1f} | {r['originals_img_s']:.1f} | {r['draft_img_s']:.1f} | "
                         f"{r['store_img_s']:.1f} | {r['draft_x']:.2f}x | {r['store_x']:.2f}x |")
        if students:
            lines += ["", f"| student (224 px, batch {args.batch_size}, {args.threads} threads) | train img/s | "
                          "workers to feed it: originals | draft | store |", "|---|---|---|---|---|"]
            for s in students:
                lines.append(f"| {s['student']} | {s['img_s']:.1f} | {s.get('workers_originals', math.nan):.2f} | "
                             f"{s.get('workers_draft', math.nan):.2f} | {s.get('workers_store', math.nan):.2f} |")
        if out.get("gpu"):
            lines += ["", f"| GPU, mobilenetv3_small_100 224 px, batch {args.gpu_batch}, {args.workers} workers | "
                          "loader img/s | step alone img/s | step fed by the loader img/s |", "|---|---|---|---|"]
            for g in out["gpu"]:
                lines.append(f"| {g['mode']} | {g['loader_img_s']:.0f} | {g['step_img_s']:.0f} | "
                             f"{g['fed_img_s']:.0f} |")
        return "\n".join(lines)

    write_outputs(rows, args, markdown, list(rows[0]) if rows else [])


if __name__ == "__main__":
    main()
