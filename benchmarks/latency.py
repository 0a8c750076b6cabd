"""CPU inference latency of CLIP teachers and lightweight students, eager PyTorch vs ONNX Runtime.

    python benchmarks/latency.py                                   # everything (~10 min on 2 idle cores)
    python benchmarks/latency.py --teachers ViT-L-14 --students mobilenetv3_small_100 --batches 1   # quick
    python benchmarks/latency.py --csv latency.csv --markdown latency.md

What is timed: one deployable module per model, image batch in, head output out (`cskd_cache.models.scorer.IAAModel`):
- teachers: open_clip image tower (``model.visual``), L2-normalised embedding, linear 10-bin head;
- students: the timm encoder as cskd builds it (``build_student("timm:NAME@none")``) + `DistributionHead`(10).
All weights are random (nothing is downloaded); latency does not depend on weight values.

Method (after timm's benchmark.py): inputs made once before timing; torch threads and ONNX Runtime intra-op
threads both set to --threads (inter-op 1); warm-up calls excluded; every timed call measured on its own with
``time.perf_counter`` (CPU calls are synchronous, nothing to synchronise); p50/p90 over the timed calls, divided
by the batch size (ms per image). Iteration counts are fixed per config before timing starts, from a time budget:
the warm-up runs --warmup calls, stopping early (after at least two) once it has used a third of --budget
seconds, or after one call when that call alone took longer than --budget; then
``clamp(--budget / warm call time, --min-iters, --iters)`` timed calls. Heavy configs (ViT-L-14 at batch 32:
minutes per call on 2 cores) therefore get a single warm-up and --min-iters timed calls (p50 = p90 then); the
ONNX parity-check call counts as the first warm-up call. The CSV's ``warmup`` and ``iters`` columns say what
each row got. ``load1`` is the 1-minute load average when the
config finished: other processes on a shared machine inflate the times, multi-threaded ones far more than their
CPU share (each parallel region waits for a descheduled thread); ratios within one run are more robust, and
on a busy 2-core machine --threads 1 gives the more trustworthy batch-1 numbers (the script warns when the
load average is >= 1 at the start).

ONNX: exported once per model with a dynamic batch axis (opset 17), by torch.onnx.export's dynamo exporter
when it works here (it needs the onnxscript package) and otherwise the legacy TorchScript exporter (--exporter
says which to try); CPUExecutionProvider, all graph optimisations. Before timing a batch, ONNX Runtime's output
is checked against eager's on the same input: max-abs-diff must stay below --atol (1e-3), else the row is not
timed and says "parity FAIL".

Speed-up = ViT-L-14 + head ms/img / model ms/img, same backend and batch size. The project goal is a student at
least 20x faster than ViT-L-14 + head at batch 1 on CPU; the script prints whether each student meets it.
GFLOPs per image: torch.utils.flop_counter at batch 1 (a multiply-add counts as 2 FLOPs).
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

TEACHERS = ("ViT-B-16", "ViT-L-14")
STUDENTS = ("mobilenetv3_small_100", "efficientnet_b0", "resnet50", "vit_small_patch16_224")
REFERENCE = "ViT-L-14"
GOAL = 20.0
BINS = 10
FIELDS = ["model", "role", "params_m", "gflops", "backend", "exporter", "batch", "p50_ms_img", "p90_ms_img",
          "mean_ms_img", "warmup", "iters", "parity_max_abs_diff", "speedup_vs_ref", "threads", "load1", "note"]


def _names(value: str, known: tuple[str, ...]) -> list[str]:
    v = value.strip()
    if v.lower() == "all":
        return list(known)
    if v.lower() in ("", "none"):
        return []
    return [s.strip() for s in v.split(",") if s.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="all", help=f"open_clip names, comma-separated, 'all' ({','.join(TEACHERS)}) "
                   "or 'none'")
    p.add_argument("--students", default="all", help=f"timm names, comma-separated, 'all' ({','.join(STUDENTS)}) "
                   "or 'none'")
    p.add_argument("--backends", default="eager,onnx", help="eager, onnx or both (default)")
    p.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    p.add_argument("--iters", type=int, default=100, help="most timed calls per config (default 100)")
    p.add_argument("--min-iters", type=int, default=1, help="fewest timed calls per config (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="most warm-up calls per config, at least 1 (default 5)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds of timed calls aimed at per config; sets the iteration count (default 10)")
    p.add_argument("--threads", type=int, default=cores, help=f"torch and ORT intra-op threads (default {cores})")
    p.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="ONNX exporter: auto tries dynamo, then legacy (default auto)")
    p.add_argument("--atol", type=float, default=1e-3, help="ONNX vs eager max-abs-diff limit (default 1e-3)")
    p.add_argument("--onnx-dir", default=None, help="keep the exported .onnx files here (default: a temp dir)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="write the rows here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    a = p.parse_args(argv)
    a.teachers = _names(a.teachers, TEACHERS)
    a.students = _names(a.students, STUDENTS)
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not set(a.backends) <= {"eager", "onnx"} or not a.backends:
        p.error(f"--backends: use eager, onnx or eager,onnx (got {a.backends})")
    a.batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if not a.batches or min(a.batches) < 1:
        p.error("--batches needs positive batch sizes")
    if a.threads < 1 or a.iters < 1 or a.min_iters < 1 or a.warmup < 1 or a.min_iters > a.iters:
        p.error("--threads, --iters, --min-iters and --warmup must be >= 1, and --min-iters <= --iters")
    return a


# ---------------------------------------------------------------------------------------------- models

def build_teacher(name: str):
    """open_clip image tower + linear 10-bin head on the L2-normalised embedding; (module, input size)."""
    import open_clip

    from cskd_cache.models.score_heads import DistributionHead
    from cskd_cache.models.scorer import IAAModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(name, pretrained=None)
    visual = clip.visual
    del clip  # drop the text tower
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    with torch.no_grad():
        dim = visual(torch.zeros(1, 3, *size)).shape[-1]
    model = IAAModel(visual, DistributionHead(dim, BINS), normalize=True).eval()
    return model, tuple(int(s) for s in size)


def build_student(name: str):
    """cskd's timm student encoder (random init) + 10-bin distribution head; (module, input size)."""
    from cskd_cache.models.score_heads import DistributionHead
    from cskd_cache.models.scorer import IAAModel
    from cskd_cache.models.students import build_student as build

    enc = build(f"timm:{name}@none", pretrained_ok=False)
    model = IAAModel(enc, DistributionHead(enc.pooled_dim, BINS)).eval()
    return model, tuple(enc.input_cfg["size"])


def gflops(model, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # autograd on: in inference mode nn.MultiheadAttention takes its fused fast path, which the counter misses
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(x[:1])
    return fc.get_total_flops() / 1e9


# ---------------------------------------------------------------------------------------------- ONNX

def export_onnx(model, x: torch.Tensor, path: Path, exporter: str) -> str:
    """Export with a dynamic batch axis; returns the exporter that worked ("dynamo" or "legacy")."""
    order = {"auto": ["dynamo", "legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}[exporter]
    errors = []
    for kind in order:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=1024)
                    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["image"],
                                      output_names=["out"], dynamic_shapes=({0: batch},), opset_version=18,
                                      external_data=False)
                else:
                    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"],
                                      output_names=["out"], dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}},
                                      opset_version=17, do_constant_folding=True)
            return kind
        except Exception as e:  # noqa: BLE001 - report every exporter's failure, then give up
            errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            print(f"    exporter {kind} failed ({errors[-1]})", flush=True)
    raise RuntimeError("no ONNX exporter worked: " + " | ".join(errors))


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- timing

def time_calls(call, warmup: int, iters: int, min_iters: int, budget: float, done: tuple[float, ...] = ()) -> dict:
    """Warm up, fix the iteration count from the budget, then time each call; returns the last warm-up output too.

    ``done``: durations of calls already made on this config (ONNX's parity check), counted as warm-up calls.
    At least two warm-up calls, or one when a single call takes longer than the whole budget (minutes-long
    calls, where first-call overhead is negligible).
    """
    warm_times, out = list(done), None
    while len(warm_times) < max(warmup, 1):
        if warm_times and (warm_times[0] > budget or (len(warm_times) >= 2 and sum(warm_times) > budget / 3)):
            break
        t = time.perf_counter()
        out = call()
        warm_times.append(time.perf_counter() - t)
    per_call = min(warm_times[-2:])  # the later warm-up calls are the warm ones
    n = int(min(iters, max(min_iters, math.floor(budget / max(per_call, 1e-9)))))
    times = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t
    return {"times": times, "warmup": len(warm_times), "iters": n, "out": out}


def summarise(times: np.ndarray, batch: int) -> dict:
    ms = times * 1000.0 / batch
    return {"p50_ms_img": float(np.percentile(ms, 50)), "p90_ms_img": float(np.percentile(ms, 90)),
            "mean_ms_img": float(ms.mean())}


def bench_model(name: str, role: str, args, onnx_dir: Path, emit) -> None:
    from cskd_cache.models.scorer import count_params

    t0 = time.perf_counter()
    model, size = (build_teacher if role == "teacher" else build_student)(name)
    params = count_params(model) / 1e6
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {b: torch.randn(b, 3, *size, generator=gen) for b in args.batches}
    flops = float("nan") if args.no_flops else gflops(model, inputs[args.batches[0]])
    print(f"{name} ({role}): {params:.1f} M params, {flops:.2f} GFLOPs/img, input {size[0]}x{size[1]}, "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    base = {"model": name, "role": role, "params_m": round(params, 2),
            "gflops": "" if math.isnan(flops) else round(flops, 2), "threads": args.threads}

    reference = {}  # batch -> eager output, for the ONNX parity check
    if "eager" in args.backends:
        for b in args.batches:
            with torch.inference_mode():
                r = time_calls(lambda: model(inputs[b]), args.warmup, args.iters, args.min_iters, args.budget)
            reference[b] = r["out"].numpy().copy()
            emit({**base, "backend": "eager", "exporter": "", "batch": b, **summarise(r["times"], b),
                  "warmup": r["warmup"], "iters": r["iters"], "parity_max_abs_diff": "",
                  "load1": round(os.getloadavg()[0], 2), "note": ""})
    if "onnx" not in args.backends:
        return
    for b in args.batches:
        if b not in reference:  # eager not timed: one eager call as the parity reference
            with torch.inference_mode():
                reference[b] = model(inputs[b]).numpy().copy()
    path = onnx_dir / f"{name}.onnx"
    t = time.perf_counter()
    exporter = export_onnx(model, inputs[args.batches[0]][:1], path, args.exporter)
    size_mb = sum(f.stat().st_size for f in onnx_dir.glob(f"{name}.onnx*")) / 2**20
    print(f"  exported with the {exporter} exporter in {time.perf_counter() - t:.1f} s ({size_mb:.0f} MiB)",
          flush=True)
    model = None  # frees it before the ONNX session loads (rebinding: the timing lambda closes over it)
    gc.collect()
    sess = ort_session(path, args.threads)
    in_name = sess.get_inputs()[0].name
    for b in args.batches:
        x = inputs[b].numpy()
        t = time.perf_counter()
        first = sess.run(None, {in_name: x})[0]
        t_first = time.perf_counter() - t
        diff = float(np.abs(first - reference[b]).max())
        print(f"  onnx parity at batch {b}: max-abs-diff {diff:.2e} (limit {args.atol:g}, "
              f"|eager| max {np.abs(reference[b]).max():.2f})", flush=True)
        row = {**base, "backend": "onnx", "exporter": exporter, "batch": b, "parity_max_abs_diff": f"{diff:.2e}"}
        if not diff < args.atol:
            emit({**row, "p50_ms_img": float("nan"), "p90_ms_img": float("nan"), "mean_ms_img": float("nan"),
                  "warmup": 0, "iters": 0, "load1": round(os.getloadavg()[0], 2), "note": "parity FAIL"})
            continue
        r = time_calls(lambda: sess.run(None, {in_name: x}), args.warmup, args.iters, args.min_iters, args.budget,
                       done=(t_first,))
        emit({**row, **summarise(r["times"], b), "warmup": r["warmup"], "iters": r["iters"],
              "load1": round(os.getloadavg()[0], 2), "note": ""})
    sess = None  # closes the session before its files go (rebinding, not del: the timing lambda closes over it)
    if args.onnx_dir is None:
        for f in onnx_dir.glob(f"{name}.onnx*"):
            f.unlink()


# ---------------------------------------------------------------------------------------------- report

def add_speedups(rows: list[dict]) -> None:
    ref = {(r["backend"], r["batch"]): r["p50_ms_img"] for r in rows
           if r["model"] == REFERENCE and r["role"] == "teacher" and not math.isnan(r["p50_ms_img"])}
    for r in rows:
        t = ref.get((r["backend"], r["batch"]))
        r["speedup_vs_ref"] = "" if t is None or math.isnan(r["p50_ms_img"]) else round(t / r["p50_ms_img"], 1)


def _fmt(v, nd=1) -> str:
    if v == "" or v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown(rows: list[dict], args) -> str:
    head = ("| model | params (M) | GFLOPs | backend | batch | p50 ms/img | p90 ms/img | iters | "
            f"speed-up vs {REFERENCE} + head |\n|---|---:|---:|---|---:|---:|---:|---:|---:|\n")
    body = ""
    for r in rows:
        label = f"{r['model']} + head" + (" (teacher)" if r["role"] == "teacher" else "")
        sp = r["speedup_vs_ref"]
        sp = "-" if sp == "" or r["model"] == REFERENCE else f"{sp:.1f}x"
        backend = r["backend"] + (f" ({r['exporter']})" if r["exporter"] else "")
        body += (f"| {label} | {_fmt(r['params_m'])} | {_fmt(r['gflops'])} | {backend} | {r['batch']} | "
                 f"{_fmt(r['p50_ms_img'])} | {_fmt(r['p90_ms_img'])} | {r['iters']} | {sp} |"
                 + (f" {r['note']}" if r["note"] else "") + "\n")
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    meta = (f"\nCPU: {platform.processor() or platform.machine()}, {threads} (torch and ORT intra-op), "
            f"torch {torch.__version__}, onnxruntime {_ort_version()}; random-init weights; speed-up = "
            f"{REFERENCE} + head p50 / model p50 at the same backend and batch; iteration counts from a "
            f"{args.budget:g} s budget per config (--iters {args.iters}, --min-iters {args.min_iters}, "
            f"--warmup {args.warmup}); 1-min load average {getattr(args, 'load_start', float('nan')):.2f} at the "
            f"start (load1 per row in the CSV).\n")
    return head + body + meta


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "n/a"


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["role"] != "student" or r["batch"] != 1:
            continue
        sp = r["speedup_vs_ref"]
        if sp == "":
            out.append(f"{r['model']} ({r['backend']}): no {REFERENCE} batch-1 {r['backend']} time to compare with")
        else:
            ok = "MEETS" if sp >= GOAL else "misses"
            out.append(f"{r['model']} ({r['backend']}): {sp:.1f}x faster than {REFERENCE} + head at batch 1 -> "
                       f"{ok} the {GOAL:g}x goal")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    if "onnx" in args.backends:
        import onnxruntime  # noqa: F401 - fail early, before the long eager runs
    onnx_dir = Path(args.onnx_dir) if args.onnx_dir else Path(tempfile.mkdtemp(prefix="cskd-latency-"))
    onnx_dir.mkdir(parents=True, exist_ok=True)
    print(f"threads {args.threads}, batches {args.batches}, backends {args.backends}, budget {args.budget:g} s/config, "
          f"warm-up <= {args.warmup}, iters {args.min_iters}..{args.iters}; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    load0 = os.getloadavg()[0]
    if load0 >= 1.0:
        print(f"warning: load average {load0:.2f} on {os.cpu_count()} cores: other processes compete for the CPU. "
              f"Multi-threaded times then inflate far beyond the share taken (threads wait at every parallel region "
              f"for a descheduled peer; worst for torch eager at batch 1). Compare within one run, use an idle "
              f"machine, or --threads 1.", flush=True)
    args.load_start = load0
    rows: list[dict] = []
    csv_file = None
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        csv_file = open(args.csv, "w", newline="")
        writer = csv.DictWriter(csv_file, fieldnames=FIELDS)
        writer.writeheader()

    def emit(row: dict) -> None:
        row.setdefault("speedup_vs_ref", "")
        rows.append(row)
        print(f"  {row['backend']:<5} batch {row['batch']:>3}: p50 {row['p50_ms_img']:9.2f} ms/img, "
              f"p90 {row['p90_ms_img']:9.2f} ms/img ({row['warmup']} warm-up + {row['iters']} timed calls, "
              f"load {row['load1']})" + (f" {row['note']}" if row["note"] else ""), flush=True)
        if csv_file is not None:  # written as it goes, so an interrupted run keeps its rows (speed-ups at the end)
            writer.writerow({k: row.get(k, "") for k in FIELDS})
            csv_file.flush()

    t0 = time.perf_counter()
    # the reference first: a short run still gets its speed-ups
    models = [(n, "teacher") for n in sorted(args.teachers, key=lambda n: n != REFERENCE)]
    models += [(n, "student") for n in args.students]
    try:
        for name, role in models:
            bench_model(name, role, args, onnx_dir, emit)
    finally:
        if csv_file is not None:
            csv_file.close()
    add_speedups(rows)
    if args.csv:  # rewrite with the speed-up column filled in
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in FIELDS})
    table = markdown(rows, args)
    print("\n" + table)
    for line in verdicts(rows):
        print(line)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n" + "\n".join(f"- {v}" for v in verdicts(rows)) + "\n")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.onnx_dir is None:
        try:
            onnx_dir.rmdir()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
