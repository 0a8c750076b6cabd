"""Does every stage stay linear in the number of rows? Seconds per 1k rows and peak RSS of each stage at N rows.

    python benchmarks/scale.py --ns 1000,10000,100000 --markdown --plot scale.png
    python benchmarks/scale.py --ns 1000,10000 --max-n 1000000     # --max-n: allow N above 100k (bigger machines)

Data: N synthetic photos from the package's own generator (`inspect.samples.sample_photo` at ``--scale`` 0.1:
64x48 .. 102x68 px, JPEG and PNG), a tiny seeded py: teacher defined here (``teacher``: a 4x4 colour grid of the
image through a fixed random projection to a 32-d embedding, 2x2x12 tokens; its embeddings spread like a
trained teacher's, unlike a random network's, whose near-collinear features make every pair a near-duplicate),
one view per image, --shard-size rows per shard.

Stages, each in its own process (peak RSS = that process's ru_maxrss, torch and the libraries included), in
order: ``plan`` (list + sha256 every file: `data.sources.plan_sources`), ``extract`` (`cskd extract`, 1 worker),
``add-views`` (a 64 px view store), ``verify`` (`cskd cache verify`, full sha256), ``open`` (`open_cache`,
verify=False: what every command pays), ``link`` (a 10 % label CSV linked to the rows by path), ``loader``
(one pass of `data.datasets.CachedViews` over every row at 32 px, originals, in-process), ``loader-store``
(the same from the view store), ``predictions`` (a cache-head teacher's predictions cache), ``neighbors-flat``
and ``neighbors-ivf`` (`cskd neighbors`, faiss: exact, and IVF forced; 12 queries, no labels).

Per stage: seconds per 1k rows at each N, the growth ``s/1k at N / s/1k at the smallest N``, peak RSS, and RSS
fitted as constant + bytes per row over the Ns. The AVA (255,530 rows) and 5M-row projections scale the largest
N's cost per row linearly (and say so: a stage that grew faster than linear is projected at its measured slope).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("plan", "extract", "add-views", "verify", "open", "link", "loader", "loader-store", "predictions",
          "neighbors-flat", "neighbors-ivf")
TEACHER = "py:benchmarks.scale:teacher"


class _GridTeacher(nn.Module):
    preprocess_cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                      "crop_pct": 1.0}
    num_blocks = 1

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, 32, generator=g) / 48 ** 0.5)
        self.register_buffer("mix", torch.randn(3, 12, generator=g))

    def extract(self, x, layers=()):
        grid = nn.functional.adaptive_avg_pool2d(x, 4)  # (B, 3, 4, 4)
        embed = grid.flatten(1) @ self.proj
        tokens = nn.functional.adaptive_avg_pool2d(x, 2).permute(0, 2, 3, 1) @ self.mix
        return {"embed": embed, "tokens": tokens, "prefix": None, "layers": {}}


def teacher() -> _GridTeacher:
    return _GridTeacher().eval()


class _CollapsedTeacher(_GridTeacher):
    """What a collapsed (or random-init) encoder gives: one large constant direction plus a tiny image term, so
    nearly every pair of rows is a near-duplicate (the stress case of `cskd neighbors`)."""

    def extract(self, x, layers=()):
        out = super().extract(x, layers)
        out["embed"] = 1.0 + 1e-3 * out["embed"]
        return out


def collapsed_teacher() -> _CollapsedTeacher:
    return _CollapsedTeacher().eval()


# ------------------------------------------------------------------------------------------- one stage (child)


def _stage(name: str, work: Path, n: int) -> dict:
    images, cache = work / "images", work / "cache"
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    extra = {}
    if name == "plan":
        from cskd_cache.data.sources import plan_sources
        plan = plan_sources([str(images)], [])
        extra["items"] = len(plan.items)
    elif name == "extract":
        from cskd_cache.stages.extract import ExtractConfig, run_extract
        r = run_extract(ExtractConfig(teacher=os.environ.get("SCALE_TEACHER", TEACHER), out=str(cache), images=[str(images)], num_workers=1,
                                      batch_size=256, device="cpu", shard_size=int(os.environ["SCALE_SHARD"])))
        extra = {"rows": r.rows, "loop_s": r.timings["extract"], "bytes_per_row": r.bytes_per_image}
    elif name == "add-views":
        from cskd_cache.stages.add_views import run_add_views
        r = run_add_views(cache, 64, num_workers=1, batch_size=64)
        extra = {"bytes_per_view": r.bytes_per_view}
    elif name == "verify":
        from cskd_cache.cache.verify import verify_cache
        faults = verify_cache(cache)
        assert not faults, faults[:3]
    elif name == "open":
        from cskd_cache.cache.reader import open_cache
        c = open_cache(cache, verify=False)
        extra["rows"] = len(c)
    elif name == "link":
        from cskd_cache.cache.reader import open_cache
        from cskd_cache.labels.spec import load_labels
        from cskd_cache.labels.link import link_labels
        t0 = time.perf_counter()  # the cache is opened by every stage that links; time the linking only
        c = open_cache(cache, verify=False)
        t_open = time.perf_counter() - t0
        labels = load_labels(f"csv:{work / 'labels.csv'}", image_root=str(images))
        link = link_labels(labels, c)
        extra = {"labels": len(labels.labels), "linked": link.linked}
        t0 += t_open
    elif name in ("loader", "loader-store"):
        from cskd_cache.cache.paths import resolve_paths
        from cskd_cache.cache.reader import open_cache
        from cskd_cache.cache.view_store import open_store
        from cskd_cache.data.datasets import CachedViews
        c = open_cache(cache, verify=False)
        store = open_store(c, 64, verify=False) if name == "loader-store" else None
        cfg = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
        ds = CachedViews(resolve_paths(c), cfg, rows=np.arange(len(c)), boxes=c.boxes, digests=c.digests,
                         sizes=c.sizes, store=store, jitter=True)
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
    elif name == "predictions":
        from cskd_cache.cache.reader import open_cache
        from cskd_cache.models.cache_head import CacheHead, predict_embeddings, save_cache_head
        from cskd_cache.stages.teacher_predictions import describe_teacher, ensure_predictions
        c = open_cache(cache, verify=False)
        torch.manual_seed(0)
        head = CacheHead(c.embed_dim, "distribution", 10)
        tdir = work / "teacher"
        save_cache_head(tdir, head, {"scale": [1, 10]}, {})
        desc = describe_teacher("cache-head", "cache-head", tdir, "cache_head.json", "cache_head.safetensors")
        shutil.rmtree(tdir / "predictions", ignore_errors=True)
        ensure_predictions(tdir / "predictions", c, desc, lambda: (lambda a, b: predict_embeddings(head, c.embed[a:b])))
    elif name.startswith("neighbors"):
        from cskd_cache.inspect.neighbors import NeighborsConfig, run_neighbors
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        res = run_neighbors(NeighborsConfig(cache=str(cache), out=str(out), backend="faiss", queries=12, n_boot=0,
                                            ivf_threshold=1 if name.endswith("ivf") else 10 ** 9, thumb=32,
                                            no_verify=True, device="cpu"))
        dup = res.get("duplicates") or {}
        extra = {"pairs": dup.get("pairs"), "collapsed": dup.get("collapsed")}
    else:
        raise SystemExit(f"unknown stage {name}")
    seconds = time.perf_counter() - t0
    return {"stage": name, "n": n, "seconds": seconds,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


# ------------------------------------------------------------------------------------------- the sweep (parent)


def _generate(images: Path, n: int, scale: float) -> float:
    from cskd_cache.inspect.samples import sample_photo

    t0 = time.perf_counter()
    per = 1000
    for i in range(n):
        d = images / f"d{i // per:04d}"
        if i % per == 0:
            d.mkdir(parents=True, exist_ok=True)
        img = sample_photo(i, seed=1, scale=scale)
        img.save(d / f"p{i:07d}.png") if i % 7 == 0 else img.save(d / f"p{i:07d}.jpg", quality=90)
    return time.perf_counter() - t0


def _labels(images: Path, out: Path) -> None:
    files = sorted(images.rglob("p*"))[::10]
    rng = np.random.default_rng(0)
    out.write_text("path,score\n" + "".join(f"{p.relative_to(images)},{rng.uniform(1, 10):.3f}\n" for p in files))


def _fit_rss(rows: list[dict]) -> tuple[float, float]:
    """RSS = a + b * n by least squares over the Ns (MB, bytes per row)."""
    n = np.array([r["n"] for r in rows], np.float64)
    y = np.array([r["rss_mb"] for r in rows], np.float64)
    if len(n) < 2:
        return float(y[0]), 0.0
    b, a = np.polyfit(n, y, 1)
    return float(a), float(b * 1024 * 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ns", default="1000,10000,100000")
    ap.add_argument("--max-n", type=int, default=100_000, help="refuse Ns above this (a guard for small machines)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--scale", type=float, default=0.1, help="size of the generated photos relative to 640x480")
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--work", type=Path, help="keep the data here (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG: seconds per 1k rows vs N, log x")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--csv")
    ap.add_argument("--collapsed", action="store_true",
                    help="extract with a collapsed teacher (every pair a near-duplicate): the neighbours stress case")
    ap.add_argument("--from-json", type=Path, help="redraw the table and plot of an earlier --json, measuring nothing")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print("RESULT " + json.dumps(_stage(args.stage, args.work, args.n)), flush=True)
        return
    if args.from_json:
        rows = json.loads(args.from_json.read_text())["rows"]
        ns = sorted({r["n"] for r in rows})
        stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
        return _report(rows, ns, stages, args)
    ns = [int(x) for x in args.ns.split(",")]
    if max(ns) > args.max_n:
        sys.exit(f"--ns {max(ns)} is above --max-n {args.max_n}; raise --max-n on a machine with the disk and RAM")
    stages = [s for s in args.stages.split(",") if s]
    base = args.work or Path(tempfile.mkdtemp(prefix="cskd-scale-"))
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), SCALE_SHARD=str(args.shard_size), OMP_NUM_THREADS="1",
               SCALE_TEACHER="py:benchmarks.scale:collapsed_teacher" if args.collapsed else TEACHER)
    try:
        for n in ns:
            work = base / f"n{n}"
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            gen = _generate(work / "images", n, args.scale)
            _labels(work / "images", work / "labels.csv")
            print(json.dumps({"n": n, "generate_s": gen}), flush=True)
            for st in stages:
                r = subprocess.run([sys.executable, __file__, "--stage", st, "--work", str(work), "--n", str(n)],
                                   capture_output=True, text=True, env=env)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode != 0 or not line:
                    sys.exit(f"stage {st} at N={n} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
                rec = json.loads(line[0][7:])
                rec["s_per_1k"] = rec["seconds"] / n * 1000
                rows.append(rec)
                print(json.dumps(rec), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)
    _report(rows, ns, stages, args)


def _report(rows, ns, stages, args) -> None:
    summary = _summary(rows, ns, stages)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    if args.plot:
        _plot(rows, stages, args.plot)

    def markdown(_rows):
        head = "| stage | " + " | ".join(f"s/1k rows at {n:,}" for n in ns) + \
               " | growth | peak RSS MB at " + f"{ns[-1]:,}" + " | RSS = MB + B/row | AVA 255k | 5M rows |"
        lines = [head, "|" + "---|" * (len(ns) + 6)]
        for s in summary:
            lines.append(f"| {s['stage']} | " + " | ".join(f"{s['s_per_1k'][str(n)]:.3f}" for n in ns) +
                         f" | {s['growth']:.2f}x | {s['rss_mb']:.0f} | {s['rss_const_mb']:.0f} + "
                         f"{s['rss_bytes_per_row']:.0f} | {_dur(s['ava_s'])} | {_dur(s['m5_s'])} |")
        return "\n".join(lines)

    from benchmarks._report import write_outputs
    write_outputs(rows, args, markdown, sorted({k for r in rows for k in r}))


def _summary(rows, ns, stages) -> list[dict]:
    out = []
    for st in stages:
        mine = [r for r in rows if r["stage"] == st]
        if not mine:
            continue
        per = {str(r["n"]): r["s_per_1k"] for r in mine}
        growth = per[str(ns[-1])] / per[str(ns[0])] if per[str(ns[0])] else math.nan
        # the slope between the two largest Ns: 1 = linear; a larger exponent is projected as measured
        if len(ns) >= 2:
            a, b = mine[-2], mine[-1]
            k = math.log(b["seconds"] / a["seconds"]) / math.log(b["n"] / a["n"]) if a["seconds"] > 0 else 1.0
        else:
            k = 1.0
        k = max(1.0, k)
        last = mine[-1]
        const, per_row = _fit_rss(mine)
        out.append({"stage": st, "s_per_1k": per, "growth": growth, "exponent": k, "rss_mb": last["rss_mb"],
                    "rss_const_mb": const, "rss_bytes_per_row": per_row,
                    "ava_s": last["seconds"] * (255_530 / last["n"]) ** k,
                    "m5_s": last["seconds"] * (5_000_000 / last["n"]) ** k})
    return out


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _plot(rows, stages, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.cm.tab20.colors
    for k, st in enumerate(stages):
        mine = [r for r in rows if r["stage"] == st]
        if mine:
            ax.plot([r["n"] for r in mine], [r["s_per_1k"] for r in mine], marker="os^D"[k % 4],
                    linestyle="-" if k < 10 else "--", color=colours[(2 * k) % 20 + (k >= 10)], label=st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows (N)")
    ax.set_ylabel("seconds per 1k rows")
    ax.set_title("cskd stage cost per row vs N (flat = linear)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
