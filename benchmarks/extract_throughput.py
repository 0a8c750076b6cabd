"""How close does `cskd extract` get to the teacher's bare forward? images/s of both, measured in one process.

    python benchmarks/extract_throughput.py                                    # ViT-B-32 (random init), 256 images
    python benchmarks/extract_throughput.py --num-workers 0,1,2 --markdown     # one row per worker count
    python benchmarks/extract_throughput.py --teacher py:cskd_cache.models.zoo.efficientnet_lite0:teacher
    python benchmarks/extract_throughput.py --views 4 --csv extract.csv

What is timed, per repeat (--repeat R, default 3; the median over repeats is reported):

- ``bare``: the teacher's forward (``Teacher.__call__`` with the same ``layers``, under ``torch.inference_mode``)
  over the N images, already decoded and preprocessed into tensors by the extractor's own dataset
  (``ExtractViews``: view 0 = the teacher's eval transform, views 1.. = seeded crops), already on the device, in
  the same batches as extract (--batch-size images x --views views per forward). One warm-up batch runs first
  and is not counted.
- ``extract``: ``run_extract`` end to end with the teacher object already built (so loading weights is not
  counted, everything else is): list + hash the N files, decode + cut views in DataLoader workers, forward,
  fp16 conversion, HDF5 write, shard checksum, manifest. Each run writes to a fresh temporary folder that is
  deleted afterwards. ``loop img/s`` is ``ExtractResult.images_per_s`` (the extraction loop only, without the
  list + hash + manifest set-up), and read_wait / forward / write are its ``timings``: the main process's time
  blocked on the DataLoader, in teacher forward + output conversion, and in HDF5 appends.

Every extract run is paired with a bare run right next to it (which goes first alternates), so that on a
shared, noisy machine both see about the same background load; ``ratio`` is the median over repeats of the
per-pair ratio ``extract img/s / bare img/s`` (min..max in the CSV), the img/s columns are medians too.
``CPU ms/img`` (user + sys of this process and its DataLoader workers) shows how much more work extract does,
independent of waiting. One untimed extract of one batch runs first (imports, worker start-up code
paths, the allocator). torch intra-op threads are set explicitly (--threads, default: all CPUs this process may
use) and printed; DataLoader workers run with torch's default of 1 thread each. ``load1`` is the 1-minute load
average at the end of each pair: other processes inflate every number, ratios within a pair are more robust.

Bytes per image come from the caches themselves: with tokens (the timed runs) and without (one extra untimed
run with ``tokens=False``).

The default teacher ``open_clip:ViT-B-32@none`` is RANDOMLY initialised: no CLIP weights can be downloaded on
offline machines. Throughput does not depend on weight values; the features are meaningless.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cskd_cache.data.extract_views import ExtractViews  # noqa: E402
from cskd_cache.data.images import DEFAULT_MAX_PIXELS, load_rgb  # noqa: E402
from cskd_cache.data.sources import IMAGE_EXTENSIONS, Item, scan_images  # noqa: E402
from cskd_cache.models.teachers import build_teacher  # noqa: E402
from cskd_cache.stages.extract import ExtractConfig, resolve_device, run_extract  # noqa: E402
from _report import write_outputs  # noqa: E402

DEFAULT_TEACHER = "open_clip:ViT-B-32@none"
SHARED_SAMPLE = ROOT.parent / "shared" / "data" / "photos" / "imagenet-sample"
GOAL = 0.85
FIELDS = ["teacher", "device", "threads", "num_workers", "views", "batch", "n", "repeat", "bare_img_s",
          "extract_img_s", "ratio", "ratio_min", "ratio_max", "loop_img_s", "loop_ratio", "plan_s", "read_wait_s",
          "forward_s", "write_s", "loop_s", "bytes_per_image", "bytes_per_image_no_tokens", "reader_ms_img",
          "decode_ms_img", "views_ms_img", "reader_main_ms_img", "bare_ms_img", "bare_cpu_ms_img", "extract_cpu_ms_img", "load1", "images"]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help=f"teacher spec (default {DEFAULT_TEACHER}, random init)")
    p.add_argument("--images", default=None,
                   help=f"image folder (default {SHARED_SAMPLE} if present, else N synthetic 500x375 JPEGs)")
    p.add_argument("--n", type=int, default=256, help="use the first N images, sorted by path (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", default="1",
                   help="DataLoader workers; a comma list (0,1,2) measures each, interleaved (default 1)")
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--layers", default="", help="comma list of block indices to cache too (default none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=_cpus(), help="torch intra-op threads (default: usable CPUs)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of each measurement, median reported (default 3)")
    p.add_argument("--csv", default=None, help="append one row per configuration to this CSV file")
    p.add_argument("--markdown", action="store_true", help="print a README-ready markdown table")
    p.add_argument("--tmp", default=None, help="folder for temporary caches (default: the system temp dir)")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in str(args.num_workers).split(",") if w.strip()]
    args.layer_list = [int(i) for i in args.layers.split(",") if i.strip()]
    if args.n < 1 or args.batch_size < 1 or args.repeat < 1 or args.views < 1 or not args.workers:
        p.error("--n, --batch-size, --repeat, --views must be >= 1 and --num-workers non-empty")
    return args


def synthetic_images(folder: Path, n: int, w: int = 500, h: int = 375) -> Path:
    """N photo-like JPEGs (smooth gradients + noise, so the codec works as on a photo), 500x375 like ImageNet's."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(80, 200, 3)
        img = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"synthetic_{i:05d}.jpg", quality=90)
    return folder


def select_images(args, tmp: Path) -> tuple[list[Path], str]:
    if args.images:
        root, what = Path(args.images), args.images
    elif SHARED_SAMPLE.is_dir():
        root, what = SHARED_SAMPLE, str(SHARED_SAMPLE)
    else:
        root = synthetic_images(tmp / "synthetic", args.n)
        what = f"{args.n} synthetic 500x375 JPEGs (no --images and no {SHARED_SAMPLE})"
    files = [p for p in scan_images(root) if p.suffix.lower() in IMAGE_EXTENSIONS][: args.n]
    if not files:
        raise SystemExit(f"no images found in {root}")
    return files, what


def _cpu_seconds() -> float:
    """user + sys CPU seconds of this process and its finished children (the DataLoader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _load1() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reader_cost(dataset: ExtractViews, n: int, threads: int) -> tuple[float, float, float]:
    """CPU ms per image of the reader stage run with `threads` torch threads: (decode + views), decode, views.

    A DataLoader worker runs it with 1 thread; with --num-workers 0 the main process runs it with all of its
    threads, where torch's per-op thread pool can cost more than it saves on such small tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decode = total = 0.0
        n = min(n, len(dataset))
        for i in range(n):
            t0 = time.perf_counter()
            load_rgb(dataset.items[i].path, dataset.max_pixels)
            t1 = time.perf_counter()
            dataset[i]  # decodes again, then cuts the views
            t2 = time.perf_counter()
            decode += t1 - t0
            total += t2 - t1
    finally:
        torch.set_num_threads(before)
    return total / n * 1e3, decode / n * 1e3, (total - decode) / n * 1e3


def make_batches(teacher, files: list[Path], args, device) -> tuple[list[torch.Tensor], ExtractViews]:
    cfg = ExtractConfig(teacher=args.teacher, out="-", views=args.views)
    items = [Item("bench", p.name, str(p)) for p in files]
    ds = ExtractViews(items, teacher.preprocess, teacher.preprocess_cfg, cfg.policy(), DEFAULT_MAX_PIXELS)
    batches = []
    for s in range(0, len(ds), args.batch_size):
        views = [ds[i]["views"] for i in range(s, min(s + args.batch_size, len(ds)))]
        batches.append(torch.cat(views).to(device))
    return batches, ds


def bare_forward(teacher, batches, layers, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the forward over all batches, after one uncounted warm-up batch."""
    with torch.inference_mode():
        teacher(batches[0], layers=layers)  # warm-up, not counted
        _sync(device)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for x in batches:
            teacher(x, layers=layers)
        _sync(device)
        return time.perf_counter() - t0, _cpu_seconds() - c0


def extract_once(teacher, list_file: Path, args, workers: int, tmp: Path, tokens: bool = True):
    out = Path(tempfile.mkdtemp(prefix="cache-", dir=tmp))
    try:
        cfg = ExtractConfig(teacher=args.teacher, out=str(out), lists=[str(list_file)], views=args.views,
                            tokens=tokens, layers=args.layer_list, batch_size=args.batch_size,
                            num_workers=workers, device=args.device)
        t0 = time.perf_counter()
        res = run_extract(cfg, teacher=teacher)
        return time.perf_counter() - t0, res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def markdown(rows: list[dict]) -> str:
    head = ("| teacher | views | workers | threads | bare img/s | extract img/s | ratio | loop img/s | loop ratio "
            "| plan s | read_wait s | forward s | write s | CPU ms/img bare / extract | bytes/img (tokens) "
            "| bytes/img (no tokens) | load1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| `{r['teacher']}` | {r['views']} | {r['num_workers']} | {r['threads']} | {r['bare_img_s']:.1f} "
            f"| {r['extract_img_s']:.1f} | **{r['ratio']:.2f}** | {r['loop_img_s']:.1f} | {r['loop_ratio']:.2f} "
            f"| {r['plan_s']:.2f} | {r['read_wait_s']:.2f} | {r['forward_s']:.2f} | {r['write_s']:.2f} "
            f"| {r['bare_cpu_ms_img']:.0f} / {r['extract_cpu_ms_img']:.0f} "
            f"| {r['bytes_per_image']:,.0f} | {r['bytes_per_image_no_tokens']:,.0f} | {r['load1']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="cskd-bench-", dir=args.tmp))
    try:
        files, what = select_images(args, tmp)
        list_file = tmp / "images.txt"
        list_file.write_text("".join(f"{p.resolve()}\n" for p in files))
        print(f"images: {len(files)} from {what}")
        print(f"torch {torch.__version__}: intra-op threads {torch.get_num_threads()}, inter-op "
              f"{torch.get_num_interop_threads()}, usable CPUs {_cpus()}, device {device}")
        if args.teacher == DEFAULT_TEACHER or args.teacher.endswith("@none"):
            print(f"NOTE: {args.teacher} is RANDOMLY initialised (no pretrained weights can be downloaded offline); "
                  "throughput does not depend on weight values, the features are meaningless.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            teacher = build_teacher(args.teacher, device=device)
        layers = sorted({i % teacher.num_blocks for i in args.layer_list}) if args.layer_list else []
        print(f"teacher {args.teacher}: embed {teacher.embed_dim}, tokens {teacher.grid[0]}x{teacher.grid[1]}x"
              f"{teacher.token_dim}, prefix {teacher.num_prefix_tokens}, blocks {teacher.num_blocks}")

        batches, ds = make_batches(teacher, files, args, device)
        reader_cost(ds, 4, 1)  # warm-up
        reader_ms, decode_ms, views_ms = reader_cost(ds, 32, 1)
        main_ms, _, main_views_ms = reader_cost(ds, 32, torch.get_num_threads())
        print(f"reader stage (decode + views), CPU ms/image: {reader_ms:.1f} with 1 torch thread as in a DataLoader "
              f"worker (decode {decode_ms:.1f}, {args.views} view(s) + to-tensor {views_ms:.1f}); {main_ms:.1f} with "
              f"{torch.get_num_threads()} threads as in the main process with --num-workers 0 "
              f"(views + to-tensor {main_views_ms:.1f})")

        # Warm-up: one untimed extract of one batch, then the timed, interleaved repeats.
        warm_list = tmp / "warm.txt"
        warm_list.write_text("".join(f"{p.resolve()}\n" for p in files[: args.batch_size]))
        extract_once(teacher, warm_list, args, args.workers[0], tmp)

        n = len(files)
        pairs: dict[int, list[dict]] = {w: [] for w in args.workers}
        for r in range(args.repeat):
            for k, w in enumerate(args.workers):
                # Each extract run is paired with a bare run right next to it (order alternating), so that the
                # pair sees the same background load; the ratio is taken within the pair.
                rec = {}
                for kind in (("bare", "extract") if (r + k) % 2 == 0 else ("extract", "bare")):
                    if kind == "bare":
                        rec["bare_s"], rec["bare_cpu"] = bare_forward(teacher, batches, layers, device)
                    else:
                        c0 = _cpu_seconds()
                        rec["wall"], rec["res"] = extract_once(teacher, list_file, args, w, tmp)
                        rec["extract_cpu"] = _cpu_seconds() - c0
                rec["load1"] = _load1()
                pairs[w].append(rec)
                t = rec["res"].timings
                print(f"  repeat {r} workers={w}: bare {n / rec['bare_s']:6.1f} img/s, extract {n / rec['wall']:6.1f} "
                      f"img/s -> ratio {rec['bare_s'] / rec['wall']:.2f} | loop {rec['res'].images_per_s:6.1f} img/s "
                      f"(plan {t['plan_and_load']:.2f}s, read_wait {t['read_wait']:.2f}s, forward {t['forward']:.2f}s, "
                      f"write {t['write']:.2f}s, loop {t['extract']:.2f}s) | CPU s: bare {rec['bare_cpu']:.1f}, "
                      f"extract {rec['extract_cpu']:.1f} | load1 {rec['load1']:.2f}")
        _, no_tok = extract_once(teacher, list_file, args, args.workers[0], tmp, tokens=False)

        rows = []
        for w in args.workers:
            runs = pairs[w]

            def med(f):
                return statistics.median(f(p) for p in runs)

            ratios = [p["bare_s"] / p["wall"] for p in runs]
            rows.append({
                "teacher": args.teacher, "device": str(device), "threads": torch.get_num_threads(),
                "num_workers": w, "views": args.views, "batch": args.batch_size, "n": n, "repeat": args.repeat,
                "bare_img_s": med(lambda p: n / p["bare_s"]), "extract_img_s": med(lambda p: n / p["wall"]),
                "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "loop_img_s": med(lambda p: p["res"].images_per_s),
                "loop_ratio": med(lambda p: p["res"].images_per_s * p["bare_s"] / n),
                "plan_s": med(lambda p: p["res"].timings["plan_and_load"]),
                "read_wait_s": med(lambda p: p["res"].timings["read_wait"]),
                "forward_s": med(lambda p: p["res"].timings["forward"]),
                "write_s": med(lambda p: p["res"].timings["write"]),
                "loop_s": med(lambda p: p["res"].timings["extract"]),
                "bare_cpu_ms_img": med(lambda p: p["bare_cpu"] / n * 1e3),
                "extract_cpu_ms_img": med(lambda p: p["extract_cpu"] / n * 1e3),
                "bytes_per_image": runs[0]["res"].bytes_per_image,
                "bytes_per_image_no_tokens": no_tok.bytes_per_image,
                "reader_ms_img": reader_ms, "decode_ms_img": decode_ms, "views_ms_img": views_ms,
                "reader_main_ms_img": main_ms, "bare_ms_img": med(lambda p: p["bare_s"] / n * 1e3),
                "load1": med(lambda p: p["load1"]), "images": what,
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmedians of {args.repeat} repeats (ratio = median of the per-pair ratios); {_cpus()} CPUs")
    for r in rows:
        verdict = "meets" if r["ratio"] >= GOAL else "misses"
        print(f"workers={r['num_workers']}: bare {r['bare_img_s']:.1f} img/s, extract {r['extract_img_s']:.1f} img/s "
              f"end-to-end, ratio {r['ratio']:.2f} (pairs {r['ratio_min']:.2f}..{r['ratio_max']:.2f}; {verdict} the "
              f"{GOAL} goal), CPU ms/img bare {r['bare_cpu_ms_img']:.0f} vs extract {r['extract_cpu_ms_img']:.0f}, "
              f"load1 {r['load1']:.2f}, "
              f"loop ratio {r['loop_ratio']:.2f}; main process: read_wait {r['read_wait_s']:.2f}s, forward "
              f"{r['forward_s']:.2f}s, write {r['write_s']:.2f}s of loop {r['loop_s']:.2f}s, plan {r['plan_s']:.2f}s; "
              f"{r['bytes_per_image']:,.0f} B/img with tokens, {r['bytes_per_image_no_tokens']:,.0f} without")
    write_outputs(rows, args, markdown, FIELDS)
    return rows


if __name__ == "__main__":
    main()
