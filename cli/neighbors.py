"""`cskd neighbors`: nearest neighbours of cached (or a run's) features, a kNN probe, near-duplicates, an HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import err_console, failing, progress_bars, show
from ._options import CacheImageRootOpt, DefaultsOpt, NoVerifyOpt, Old, TrustCodeOpt


def neighbors(
    cache: Annotated[Path, typer.Option(help="Feature cache made by `cskd extract`.")],
    out: Annotated[Path, typer.Option(help="Output folder: neighbors.json, index.html, sheets/*.png, "
                                           "duplicates.csv.")],
    labels: Annotated[Optional[str], typer.Option(help="DATASET_SPEC (ava:ROOT, csv:FILE, ...): enables the "
                                                       "kNN probe and cross-split duplicate flags.")] = None,
    model: Annotated[Optional[str], typer.Option(help="RUN_DIR of an align/finetune/distill run: use its encoder's "
                                                      "features (computed now) instead of the cached ones.")] = None,
    cache_image_root: CacheImageRootOpt = None,
    k: Annotated[int, typer.Option(min=1, help="Neighbours per query and per probe prediction.")] = 10,
    queries: Annotated[int, typer.Option(min=0, help="Query images shown in the sheets (a seeded sample).")] = 12,
    dup_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Cosine at or above which two rows count "
                                                                        "as near-duplicates.")] = 0.95,
    max_pairs: Annotated[int, typer.Option(min=1, help="Most similar near-duplicate pairs kept in memory and shown "
                                                       "on the page; duplicates.csv lists every pair.")] = 10_000,
    backend: Annotated[str, typer.Option(help="Search: auto (faiss if installed, else exact torch), faiss, "
                                              "torch.")] = "auto",
    ivf_threshold: Annotated[int, typer.Option(min=1, help="Above this many rows use an approximate IVF index "
                                                           "instead of exact search.")] = 50_000,
    nlist: Annotated[Optional[int], typer.Option(min=1, help="IVF cells (default: 4*sqrt(rows)).")] = None,
    nprobe: Annotated[int, typer.Option(min=1, help="IVF cells searched per query.")] = 32,
    gpu: Annotated[bool, typer.Option(help="Put the faiss index on a GPU when faiss-gpu sees one.")] = True,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the probe's intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the query sample, IVF training sample and bootstrap.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch when embedding with --model.")] = 64,
    num_workers: Annotated[int, typer.Option(min=0, help="Image decode workers when embedding with --model.")] = 2,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N (--model and the torch "
                                             "search).")] = "auto",
    thumb: Annotated[int, typer.Option(min=16, help="Thumbnail size in the contact sheets, pixels.")] = 128,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")]
    = 89_478_485,
    trust_code: TrustCodeOpt = False,
    no_verify: NoVerifyOpt = False,
    config: DefaultsOpt = None,
    image_root: Old("--image-root", list[str]) = None,
) -> None:
    """Nearest neighbours in a feature space: contact sheets and an HTML page, a training-free kNN-regression
    probe (with --labels) and a near-duplicate (leakage) report."""
    from cskd_cache.inspect.neighbors import NeighborsConfig, run_neighbors

    given = {"cache_image_root": cache_image_root, "image_root": image_root}
    cfg = NeighborsConfig(cache=str(cache), out=str(out), labels=labels,
                          cache_image_root=list(NeighborsConfig.normalise({k: v for k, v in given.items() if v})
                                                .get("cache_image_root") or []),
                          model=model, k=k, queries=queries, dup_threshold=dup_threshold, max_pairs=max_pairs,
                          backend=backend,
                          ivf_threshold=ivf_threshold, nlist=nlist, nprobe=nprobe, gpu=gpu, n_boot=n_boot,
                          seed=seed, batch_size=batch_size, num_workers=num_workers, device=device, thumb=thumb,
                          max_pixels=max_pixels, trust_code=trust_code,
                          no_verify=no_verify)
    with failing(code=2):
        cfg.validate()
    with failing(), progress_bars(("embed", "img"), ("sheets", "sheet")) as (embed, sheets):
        bars = {"embed": embed, "sheets": sheets}
        result = run_neighbors(cfg, on_progress=lambda name, d, t: bars[name](d, t),
                               on_status=lambda m: err_console.print(f"[dim]{m}[/]", highlight=False))
    idx, dup, probe = result["index"], result["duplicates"], result["probe"]
    table = Table(title=f"cskd neighbors -> {out}", show_header=False)
    feats = result["features"]
    table.add_row("features", f"{feats['source']}" + (f" {feats['model']}" if feats.get("model") else "")
                  + f", {result['rows']:,} rows x {feats['dim']}")
    table.add_row("index", f"{idx['backend']} {idx['kind']} on {idx['device']}"
                  + ("" if idx["exact"] else f" (nlist {idx['nlist']}, nprobe {idx['nprobe']})"))
    if result["labels"]:
        lab = result["labels"]
        table.add_row("labels", f"{lab['linked']:,} of {lab['total']:,} linked ({lab['by_path']:,} by path, "
                                f"{lab['by_content']:,} by content)")
    if probe and "skipped" not in probe:
        def ci(v):
            return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""

        def num(v):
            return "n/a" if v is None else f"{v:.3f}"
        table.add_row(f"kNN probe (k={probe['k']})",
                      f"SRCC {num(probe['srcc'])}{ci(probe.get('srcc_ci'))}, PLCC {num(probe['plcc'])}"
                      f"{ci(probe.get('plcc_ci'))} on {probe['test']:,} test / {probe['train']:,} train")
    elif probe:
        table.add_row("kNN probe", f"skipped: {probe['skipped']}")
    table.add_row(f"near-duplicates (cos >= {dup['threshold']:g})",
                  f"{dup['pairs']:,} pairs, {dup['cross_split']:,} cross-split, {dup['cross_source']:,} cross-source"
                  + ("".join(f"; {name}: {n:,}" for name, n in dup["by_split_pair"].items())))
    table.add_row("page", str(Path(out) / "index.html"))
    show(table)
