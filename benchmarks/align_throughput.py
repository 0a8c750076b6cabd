"""How much does training on cached targets save? `cskd align` vs the same student taught by a live teacher.

    python benchmarks/align_throughput.py --markdown            # 3 students, ViT-B-32 teacher (~10 min, 2 cores)
    python benchmarks/align_throughput.py --quick               # the same, smaller (~2-3 min): a check
    python benchmarks/align_throughput.py --students timm:resnet18 --steps 12 --repeat 3 --csv align.csv

Set-up (not timed): N images (default 256) are picked evenly from the sorted, recursive list of
``../shared/data/photos`` (ImageNet-sample photos ~500x375 and a few multi-megapixel wallpapers; --images
DIR for another folder; N procedural photos from `cskd_cache.inspect.samples` when neither exists). The teacher
extracts them once with `run_extract` (--views 2: view 0 = its eval view, view 1 = a seeded random crop;
tokens at its native grid) into a temporary cache (or into --work DIR, reused by later runs).

Per student (timm, random init) everything below runs in this one process, batch --batch-size (32), torch
intra-op threads = usable CPUs (--threads), --num-workers DataLoader workers (2; each runs 1 torch thread as
DataLoader workers do). Every DataLoader here draws the N rows in the same seeded random order, so all
loops and terms see the same batches and the same cached views.

Two training loops, each --warmup W steps then --steps S timed steps (img/s = S * batch / wall seconds):

- ``cached``: what `cskd align` runs. The align DataLoader (`CachedViews`: decode, the row's cached view
  rebuilt at the student's input size, cached embed + tokens read from the HDF5 cache) feeds
  `cskd_cache.stages.align.train_step` (forward, AlignLoss = global cosine + token smooth-L1, backward, clipping,
  AdamW step). The time blocked on the DataLoader (``data wait``) and in train_step (``step``) are summed
  separately: the share of data wait shows whether data or compute limits the cached run.
- ``live``: the same student, batches, views and train_step, but the targets come from the teacher at every
  step. A DataLoader decodes each image once and cuts two tensors from it with `views.render`: the
  student's view and the teacher's (same box + flip, teacher preprocess size and normalisation). The teacher
  runs under ``torch.inference_mode`` and gives what the cache would hold: the L2-normalised embedding and the
  patch tokens (average-pooled to the cache's grid when that is smaller). Its loop records data wait, teacher
  and step time.

Three terms, each timed alone right next to the loops (so they see the same background load):

- ``t_data``: seconds per batch of the cached loop's DataLoader iterated with no training (the same batches;
  W and S rounded up to whole rounds of the workers, which deliver a batch each side by side): the rate its
  workers produce batches when they have the machine to themselves.
- ``t_teacher``: the teacher's forward on a batch of its own view tensors (rendered beforehand), under
  inference_mode, embed + tokens as above; median of --term-batches batches after one warm-up.
- ``t_student``: train_step on a batch already in memory; median of --term-batches steps after one warm-up.
- (reported, not in the bound) ``live t_data``: the live loop's DataLoader alone (two renders per image, no
  token read), so the live loop's extra data cost is visible.

``speed-up`` = cached img/s / live img/s. ``bound`` = (t_data + t_teacher + t_student) / (t_data + t_student):
the saving if a loop's time were the sum of its parts, as on a CPU where data workers and compute share the
same cores. The goal is speed-up / bound >= 0.9. The ratio can exceed 1: the live loop's data costs more
than t_data, and a step that leaves cores idle lets the workers overlap with it.

ViT-L-14 rows (--bound-teacher; "" skips them) give the bound only: its forward is timed alone once, on
--vitl-images teacher views in one batch after a 1-image warm-up, and scaled to --batch-size images (dense
transformer cost grows linearly with the batch); t_data and t_student are each student's from above. Its
live loop is not run: one batch of 32 takes about a minute on 2 cores. (A ViT-L-14 cache holds 16x16x1024
tokens instead of 7x7x768: a few ms more to read per batch, negligible next to that forward.)

--repeat R repeats the loops and the terms R times per student (the order of cached and live alternates);
the table shows medians over repeats, speed-up and speed-up / bound as medians of the per-repeat values.
``load1`` is the 1-minute load average at the end of each student's measurements: other processes on the
machine inflate every number, and multi-threaded ones far more than their CPU share (each of a small model's
many short parallel ops waits for a descheduled thread: beside two other CPU-heavy jobs, a mobilenetv3_small
step took 4.5 s inside a loop and 0.29 s alone moments later). Ratios measured side by side are more robust;
for numbers worth quoting, run it on an idle machine (or with --repeat 3).

All models are RANDOMLY initialised (open_clip ``@none`` teachers, timm students): no weights can be
downloaded on offline machines. Throughput does not depend on weight values.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cskd_cache.cache.paths import resolve_paths  # noqa: E402
from cskd_cache.cache.reader import open_cache  # noqa: E402
from cskd_cache.data.images import load_rgb  # noqa: E402
from cskd_cache.data.sources import scan_images  # noqa: E402
from cskd_cache.data.datasets import CachedViews, collate  # noqa: E402
from cskd_cache.data.views import render  # noqa: E402
from cskd_cache.inspect.samples import write_samples  # noqa: E402
from cskd_cache.losses import AlignLoss  # noqa: E402
from cskd_cache.models.align_heads import AlignHeads, AlignModel  # noqa: E402
from cskd_cache.models.students import build_student  # noqa: E402
from cskd_cache.models.teachers import build_teacher  # noqa: E402
from cskd_cache.stages.align import train_step  # noqa: E402
from cskd_cache.stages.extract import ExtractConfig, resolve_device, run_extract  # noqa: E402
from cskd_cache.train.engine import param_groups, seed_everything  # noqa: E402
from _report import write_outputs  # noqa: E402

DEFAULT_TEACHER = "open_clip:ViT-B-32@none"
BOUND_TEACHER = "open_clip:ViT-L-14@none"
DEFAULT_STUDENTS = "timm:mobilenetv3_small_100,timm:resnet18,timm:vit_tiny_patch16_224"
SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "photos"
GOAL = 0.9
QUICK = {"n": 64, "steps": 3, "warmup": 1, "term_batches": 1, "vitl_images": 2}
FIELDS = ["student", "input", "teacher", "device", "threads", "num_workers", "batch", "n", "views", "steps",
          "warmup", "repeat", "cached_img_s", "live_img_s", "speedup", "bound", "ratio", "cached_wait_share",
          "cached_wait_s", "cached_step_s", "cached_s", "live_s", "live_wait_s", "live_teacher_s", "live_step_s",
          "t_data_s", "t_teacher_s", "t_student_s", "live_t_data_s", "bound_teacher", "bound_t_teacher_s",
          "bound_big", "load1", "images"]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _load1() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help=f"teacher spec (default {DEFAULT_TEACHER}, random init)")
    p.add_argument("--bound-teacher", default=BOUND_TEACHER,
                   help=f"a bigger teacher whose bound is reported from its forward alone (default {BOUND_TEACHER}; "
                        "'' skips it)")
    p.add_argument("--students", default=DEFAULT_STUDENTS, help=f"comma list of student specs (default "
                                                                 f"{DEFAULT_STUDENTS}; random init)")
    p.add_argument("--images", default=None, help=f"image folder, recursive (default {SHARED_PHOTOS} if present, "
                                                  "else N procedural sample photos)")
    p.add_argument("--n", type=int, default=256, help="images in the cache, picked evenly from the sorted list "
                                                      "(default 256)")
    p.add_argument("--views", type=int, default=2, help="cached views per image (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per loop (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each loop's timed ones (default 2)")
    p.add_argument("--term-batches", type=int, default=3,
                   help="batches timed for t_teacher and t_student, median reported (default 3)")
    p.add_argument("--vitl-images", type=int, default=8,
                   help="images in the one timed forward of --bound-teacher (default 8)")
    p.add_argument("--repeat", type=int, default=1, help="repeats of every measurement, median reported (default 1)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default 2, as cskd align)")
    p.add_argument("--threads", type=int, default=_cpus(), help="torch intra-op threads (default: usable CPUs)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; 'auto' picks cuda when present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a ~2-3 minute check: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--work", default=None, help="keep the cache in this folder and reuse it on later runs "
                                                "(default: a temporary folder, deleted at the end)")
    p.add_argument("--csv", default=None, help="append one row per student to this CSV file")
    p.add_argument("--markdown", action="store_true", help="print a README-ready markdown table")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.student_list = [s.strip() for s in args.students.split(",") if s.strip()]
    if min(args.n, args.views, args.batch_size, args.steps, args.term_batches, args.vitl_images, args.repeat) < 1 \
            or args.warmup < 0 or args.num_workers < 0 or not args.student_list:
        p.error("--n, --views, --batch-size, --steps, --term-batches, --vitl-images, --repeat must be >= 1, "
                "--warmup and --num-workers >= 0, --students non-empty")
    if args.n < args.batch_size:
        p.error(f"--n {args.n} is smaller than one batch (--batch-size {args.batch_size})")
    return args


def select_images(args, tmp: Path) -> tuple[list[Path], str]:
    root = Path(args.images) if args.images else SHARED_PHOTOS
    if args.images or SHARED_PHOTOS.is_dir():
        files = scan_images(root)
        if not files:
            raise SystemExit(f"no images found in {root}")
        # Evenly spaced over the sorted list, so every sub-folder (photo size) is represented in proportion.
        pick = sorted({int(i * len(files) / args.n) for i in range(min(args.n, len(files)))})
        return [files[i] for i in pick], f"{len(pick)} of the {len(files)} images under {root}, evenly spaced"
    paths = write_samples(tmp / "samples", args.n, seed=args.seed)
    return paths, f"{args.n} procedural sample photos (cskd_cache.inspect.samples; no --images and no {SHARED_PHOTOS})"


class LiveViews(Dataset):
    """The live loop's data: per row, the image decoded once and its cached view (the one the cached loop shows,
    box + flip) cut twice, at the student's input and at the teacher's (the teacher's only without a student_cfg)."""

    def __init__(self, cache, rows: np.ndarray, paths: list[str], student_cfg: dict | None, teacher_cfg: dict,
                 seed: int):
        self.features = cache.dataset(view="random", tokens=False, rows=rows, seed=seed)  # row + view choice
        self.boxes, self.paths = cache.boxes, paths
        self.s_cfg, self.t_cfg = student_cfg, teacher_cfg

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        out = []
        for it in self.features.__getitems__(indices):
            img = load_rgb(self.paths[it["row"]])
            box = self.boxes[it["row"], it["view"]]
            t = self.t_cfg
            item = {"teacher_image": render(img, box, t)}
            if self.s_cfg is not None:
                item["image"] = render(img, box, self.s_cfg)
            out.append(item)
        return out


def live_collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make_loader(ds: Dataset, args, n_batches: int, collate_fn) -> DataLoader:
    """Same DataLoader settings as `cskd align` (prefetch 4 per worker). The seeded sampler gives every loop the
    same batches; it yields more batches than are used, so workers keep producing to the end of the timed
    window instead of idling once the sampler runs dry."""
    slack = 4 * args.num_workers + 2
    sampler = RandomSampler(ds, num_samples=(n_batches + slack) * args.batch_size,
                            generator=torch.Generator().manual_seed(args.seed))
    return DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      collate_fn=collate_fn, drop_last=True, pin_memory=False,
                      prefetch_factor=4 if args.num_workers > 0 else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_targets(teacher, x: torch.Tensor, grid: tuple[int, int]) -> dict:
    """What the cache holds for these views: L2-normalised embed (B, D) and tokens (B, G*G, C)."""
    with torch.inference_mode():
        f = teacher(x)
        tok = f["tokens"]
        if tuple(tok.shape[1:3]) != tuple(grid):  # the extractor average-pools to a smaller --token-grid
            tok = F.adaptive_avg_pool2d(tok.permute(0, 3, 1, 2).float(), grid).permute(0, 2, 3, 1)
        embed, tok = f["embed"], tok.reshape(tok.shape[0], -1, tok.shape[-1])
    # Clones leave inference mode: autograd may save targets for the backward pass, inference tensors not.
    return {"embed": embed.clone(), "tokens": tok.clone()}


class Trainee:
    """A student + heads + loss + AdamW exactly as run_align builds them (lr held at its peak)."""

    def __init__(self, spec: str, cache, device: torch.device):
        self.student = build_student(spec)
        self.model = AlignModel(self.student, AlignHeads(self.student.pooled_dim, self.student.grid_dim,
                                                         cache.embed_dim, cache.token_shape[1],
                                                         cache.token_grid)).to(device).train()
        self.loss = AlignLoss(1.0, 1.0, 0.0, 2.0)
        self.opt = torch.optim.AdamW(param_groups([("student", self.model.student), ("heads", self.model.heads)],
                                                  [1e-3, 1e-3], 0.05))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = device

    def step(self, batch: dict) -> dict:
        return train_step(self.model, self.loss, batch, self.opt, self.device, params=self.params, clip_grad=1.0)


def time_cached(tr: Trainee, ds: CachedViews, args) -> dict:
    it = iter(make_loader(ds, args, args.warmup + args.steps, collate))
    for _ in range(args.warmup):
        tr.step(next(it))
    wait = step = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        a = time.perf_counter()
        batch = next(it)
        b = time.perf_counter()
        tr.step(batch)
        _sync(tr.device)
        wait, step = wait + b - a, step + time.perf_counter() - b
    total = time.perf_counter() - t0
    del it  # shuts the workers down before the next measurement
    return {"s": total, "wait": wait, "step": step}


def time_live(tr: Trainee, teacher, ds: LiveViews, grid, args) -> dict:
    it = iter(make_loader(ds, args, args.warmup + args.steps, live_collate))

    def one(batch):
        t0 = time.perf_counter()
        targets = teacher_targets(teacher, batch["teacher_image"].to(tr.device), grid)
        _sync(tr.device)
        t1 = time.perf_counter()
        tr.step({"image": batch["image"], **targets})
        _sync(tr.device)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(args.warmup):
        one(next(it))
    wait = teach = step = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        a = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - a
        dt, ds_ = one(batch)
        teach, step = teach + dt, step + ds_
    total = time.perf_counter() - t0
    del it
    return {"s": total, "wait": wait, "teacher": teach, "step": step}


def time_loader(ds: Dataset, args, collate_fn) -> float:
    """Seconds per batch of the DataLoader alone. Workers deliver batches in rounds (one each, side by side), so
    the warm-up and the timed window are whole rounds: W and S rounded up to multiples of the worker count."""
    w = max(1, args.num_workers)
    warm, timed = -(-max(1, args.warmup) // w) * w, -(-args.steps // w) * w
    it = iter(make_loader(ds, args, warm + timed, collate_fn))
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    for _ in range(timed):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return dt / timed


def time_teacher(teacher, batches: list[torch.Tensor], grid, device) -> float:
    teacher_targets(teacher, batches[0].to(device), grid)  # warm-up
    times = []
    for x in batches:
        x = x.to(device)
        _sync(device)
        t0 = time.perf_counter()
        teacher_targets(teacher, x, grid)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_student(tr: Trainee, batches: list[dict]) -> float:
    tr.step(batches[0])  # warm-up
    times = []
    for b in batches:
        _sync(tr.device)
        t0 = time.perf_counter()
        tr.step(b)
        _sync(tr.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_bound_teacher(spec: str, views: torch.Tensor, batch_size: int, device) -> tuple[float, dict]:
    """Seconds per batch_size images of `spec`'s forward (embed + tokens), from one batch of `views`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = build_teacher(spec, device=device)
    size = t.preprocess_cfg["size"]
    x = F.interpolate(views, size=size, mode="bicubic", align_corners=False) if list(views.shape[-2:]) != size \
        else views
    teacher_targets(t, x[:1].to(device), t.grid)  # warm-up
    x = x.to(device)
    _sync(device)
    t0 = time.perf_counter()
    teacher_targets(t, x, t.grid)
    _sync(device)
    per_image = (time.perf_counter() - t0) / x.shape[0]
    info = {"grid": t.grid, "token_dim": t.token_dim, "embed_dim": t.embed_dim}
    del t
    gc.collect()
    return per_image * batch_size, info


def _fmt_s(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(rows: list[dict]) -> str:
    head = ("| student (input) | teacher | cached img/s | live img/s | speed-up | bound | speed-up / bound "
            "| cached: data wait / step s | t_data | t_teacher | t_student | live t_data | load1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = f"`{r['student'].removeprefix('timm:')}` ({r['input']})"
        lines.append(
            f"| {name} | `{r['teacher']}` | {r['cached_img_s']:.1f} | {r['live_img_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['bound']:.2f}x | **{r['ratio']:.2f}** | {100 * r['cached_wait_share']:.0f}% "
            f"({r['cached_wait_s']:.2f} / {r['cached_step_s']:.2f}) | {r['t_data_s']:.2f} | {r['t_teacher_s']:.2f} "
            f"| {r['t_student_s']:.2f} | {r['live_t_data_s']:.2f} | {r['load1']:.1f} |")
        if r.get("bound_big") is not None:
            lines.append(
                f"| {name} | `{r['bound_teacher']}` (bound only) | {r['cached_img_s']:.1f} | not run | – "
                f"| {r['bound_big']:.2f}x | – | – | {r['t_data_s']:.2f} | {r['bound_t_teacher_s']:.2f} "
                f"| {r['t_student_s']:.2f} | – | {r['load1']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs a warning per random-init model; noted below
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t_run = time.perf_counter()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {_cpus()} usable CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="cskd-align-bench-"))
    try:
        files, what = select_images(args, tmp)
        print(f"images: {what}")
        print(f"torch {torch.__version__}: intra-op threads {torch.get_num_threads()}, DataLoader workers "
              f"{args.num_workers} (1 thread each), device {device}, batch {args.batch_size}, {args.warmup} warm-up + "
              f"{args.steps} timed steps per loop, {args.repeat} repeat(s)")
        print(f"NOTE: the teachers ({args.teacher}, {args.bound_teacher or 'no bound teacher'}) and the students are "
              "RANDOMLY initialised (nothing can be downloaded offline); throughput does not depend on weight values.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            teacher = build_teacher(args.teacher, device=device)

        slug = "".join(c if c.isalnum() else "-" for c in args.teacher)
        cache_dir = (Path(args.work) if args.work else tmp) / f"cache-{slug}-n{len(files)}-v{args.views}"
        list_file = cache_dir.with_suffix(".txt")
        list_file.parent.mkdir(parents=True, exist_ok=True)
        list_file.write_text("".join(f"{p.resolve()}\n" for p in files))
        t0 = time.perf_counter()
        res = run_extract(ExtractConfig(teacher=args.teacher, out=str(cache_dir), lists=[str(list_file)],
                                        views=args.views, tokens=True, batch_size=args.batch_size,
                                        num_workers=args.num_workers, device=str(device)), teacher=teacher)
        cache = open_cache(cache_dir)
        print(f"cache {cache_dir}: {len(cache)} rows x {cache.n_views} views, embed {cache.embed_dim}, tokens "
              f"{cache.token_grid[0]}x{cache.token_grid[1]}x{cache.token_shape[1]}, {res.bytes_per_image:,.0f} B/image "
              f"({'reused' if res.resumed_shards else 'extracted'} in {time.perf_counter() - t0:.0f} s)")
        if len(cache) < args.batch_size:
            raise SystemExit(f"only {len(cache)} images were readable; need at least one batch ({args.batch_size})")

        rows = np.arange(len(cache))
        paths = resolve_paths(cache)
        grid = cache.token_grid
        # The teacher's own view tensors for t_teacher (and the bound teacher), rendered once.
        t_views = LiveViews(cache, rows, paths, None, teacher.preprocess_cfg, args.seed)
        n_t = args.term_batches * args.batch_size
        teacher_batches = [torch.stack([t_views[i % len(rows)]["teacher_image"]
                                        for i in range(b, b + args.batch_size)])
                           for b in range(0, n_t, args.batch_size)]

        big_t, big_info = None, None
        if args.bound_teacher:
            print(f"timing {args.bound_teacher}'s forward alone on {args.vitl_images} images ...", flush=True)
            vit_views = torch.cat(teacher_batches)[: args.vitl_images]
            if len(vit_views) < args.vitl_images:
                vit_views = torch.cat([vit_views] * (args.vitl_images // len(vit_views) + 1))[: args.vitl_images]
            big_t, big_info = time_bound_teacher(args.bound_teacher, vit_views, args.batch_size, device)
            print(f"  {args.bound_teacher}: {big_t:.2f} s per batch of {args.batch_size} "
                  f"({big_t / args.batch_size * 1e3:.0f} ms/image; tokens {big_info['grid'][0]}x{big_info['grid'][1]}x"
                  f"{big_info['token_dim']}); its live loop is not run", flush=True)

        results = []
        for spec in args.student_list:
            seed_everything(args.seed)
            tr = Trainee(spec, cache, device)
            cfg = tr.student.input_cfg
            size = "x".join(map(str, cfg["size"]))
            params = sum(p.numel() for p in tr.student.parameters()) / 1e6
            print(f"\n{spec} @ {size} ({params:.1f} M params, random init)", flush=True)
            cached_ds = CachedViews([paths[r] for r in rows], cfg, rows=rows, boxes=cache.boxes, embed=cache.embed,
                                    streamed=cache.streamed(("tokens",)), seed=args.seed, digests=cache.digests)
            live_ds = LiveViews(cache, rows, paths, cfg, teacher.preprocess_cfg, args.seed)
            student_batches = [collate(cached_ds.__getitems__(list(range(b, b + args.batch_size))))
                               for b in range(0, n_t, args.batch_size) if b + args.batch_size <= len(rows)] \
                or [collate(cached_ds.__getitems__(list(range(args.batch_size))))]
            reps = []
            for r in range(args.repeat):
                m = {}
                # Terms next to their loops; which loop goes first alternates between repeats.
                order = ("cached", "live") if r % 2 == 0 else ("live", "cached")
                for kind in order:
                    if kind == "cached":
                        m["t_data"] = time_loader(cached_ds, args, collate)
                        m["cached"] = time_cached(tr, cached_ds, args)
                        m["t_student"] = time_student(tr, student_batches)
                    else:
                        m["t_teacher"] = time_teacher(teacher, teacher_batches, grid, device)
                        m["live"] = time_live(tr, teacher, live_ds, grid, args)
                        m["live_t_data"] = time_loader(live_ds, args, live_collate)
                n_img = args.steps * args.batch_size
                m["cached_img_s"], m["live_img_s"] = n_img / m["cached"]["s"], n_img / m["live"]["s"]
                m["speedup"] = m["cached_img_s"] / m["live_img_s"]
                fast = m["t_data"] + m["t_student"]
                m["bound"] = (fast + m["t_teacher"]) / fast
                m["ratio"] = m["speedup"] / m["bound"]
                m["bound_big"] = (fast + big_t) / fast if big_t is not None else None
                m["load1"] = _load1()
                reps.append(m)
                c, lv = m["cached"], m["live"]
                print(f"  repeat {r}: cached {m['cached_img_s']:6.1f} img/s (data wait {c['wait']:.2f} s + step "
                      f"{c['step']:.2f} s of {c['s']:.2f} s), live {m['live_img_s']:6.1f} img/s (data wait "
                      f"{lv['wait']:.2f} + teacher {lv['teacher']:.2f} + step {lv['step']:.2f} of {lv['s']:.2f} s) "
                      f"-> speed-up {m['speedup']:.2f}x; per batch: t_data {m['t_data']:.3f} s, t_teacher "
                      f"{m['t_teacher']:.3f} s, t_student {m['t_student']:.3f} s, live t_data "
                      f"{m['live_t_data']:.3f} s -> bound {m['bound']:.2f}x, speed-up/bound {m['ratio']:.2f} | "
                      f"load1 {m['load1']:.2f}", flush=True)

            def med(f):
                return statistics.median(f(m) for m in reps)

            results.append({
                "student": spec, "input": size, "teacher": args.teacher, "device": str(device),
                "threads": torch.get_num_threads(), "num_workers": args.num_workers, "batch": args.batch_size,
                "n": len(cache), "views": cache.n_views, "steps": args.steps, "warmup": args.warmup,
                "repeat": args.repeat, "cached_img_s": med(lambda m: m["cached_img_s"]),
                "live_img_s": med(lambda m: m["live_img_s"]), "speedup": med(lambda m: m["speedup"]),
                "bound": med(lambda m: m["bound"]), "ratio": med(lambda m: m["ratio"]),
                "cached_wait_share": med(lambda m: m["cached"]["wait"] / m["cached"]["s"]),
                "cached_wait_s": med(lambda m: m["cached"]["wait"]), "cached_step_s": med(lambda m: m["cached"]["step"]),
                "cached_s": med(lambda m: m["cached"]["s"]), "live_s": med(lambda m: m["live"]["s"]),
                "live_wait_s": med(lambda m: m["live"]["wait"]), "live_teacher_s": med(lambda m: m["live"]["teacher"]),
                "live_step_s": med(lambda m: m["live"]["step"]), "t_data_s": med(lambda m: m["t_data"]),
                "t_teacher_s": med(lambda m: m["t_teacher"]), "t_student_s": med(lambda m: m["t_student"]),
                "live_t_data_s": med(lambda m: m["live_t_data"]), "bound_teacher": args.bound_teacher or None,
                "bound_t_teacher_s": big_t,
                "bound_big": med(lambda m: m["bound_big"]) if big_t is not None else None,
                "load1": med(lambda m: m["load1"]), "images": what,
            })
            del tr, cached_ds, live_ds, student_batches
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmedians of {args.repeat} repeat(s); times in seconds per batch of {args.batch_size}; "
          f"{_cpus()} usable CPUs; total run {time.perf_counter() - t_run:.0f} s")
    for r in results:
        verdict = "meets" if r["ratio"] >= GOAL else "misses"
        limit = "data" if r["cached_wait_share"] >= 0.5 else "compute (the step)"
        print(f"{r['student']}: cached {r['cached_img_s']:.1f} img/s vs live {r['live_img_s']:.1f} img/s -> speed-up "
              f"{r['speedup']:.2f}x of a {r['bound']:.2f}x bound = {r['ratio']:.2f} ({verdict} the {GOAL} goal); "
              f"cached run: {100 * r['cached_wait_share']:.0f}% data wait, limited by {limit}; live loop data "
              f"{r['live_t_data_s']:.2f} s/batch vs cached {r['t_data_s']:.2f} s/batch"
              + (f"; {r['bound_teacher']} bound {r['bound_big']:.1f}x" if r["bound_big"] is not None else ""))
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    write_outputs(results, args, markdown, FIELDS)
    return results


if __name__ == "__main__":
    main()
