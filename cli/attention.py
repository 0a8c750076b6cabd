"""`cskd attention`: mean attention distance and entropy per layer and head of ViT-family models, with plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import console, fail, failing, progress_bar, show
from ._options import DefaultsOpt, TrustCodeOpt


def attention(
    out: Annotated[Path, typer.Option(help="Output folder: attention.json, attention_distance.png, "
                                           "attention_entropy.png.")],
    model: Annotated[Optional[str], typer.Option(help="Model: open_clip:NAME@PRETRAINED|none, "
                                                      "timm:NAME@TAG|PATH|none, or run:DIR (an align/finetune/"
                                                      "distill run).")] = None,
    compare: Annotated[Optional[tuple[str, str]], typer.Option(help="Two models to overlay (e.g. run:BEFORE "
                                                                    "run:AFTER), same forms as --model.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of images (scanned recursively), shown to every "
                                                        "model (needed with --model/--compare).")] = None,
    cache: Annotated[Optional[list[Path]], typer.Option(help="A cache extracted with --attention-stats: its teacher's "
                                                             "stored statistics are read, not recomputed. "
                                                             "Repeatable.")] = None,
    max_images: Annotated[int, typer.Option(min=1, help="Use at most N images (a seeded sample when the folder "
                                                        "has more).")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the image sample.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")]
    = 89_478_485,
    trust_code: TrustCodeOpt = False,
    config: DefaultsOpt = None,
) -> None:
    """Per layer and head: mean attention distance (pixels) and attention entropy (nats) over patch tokens,
    averaged over images; optionally two models overlaid. Only ViT-family models have attention."""
    from cskd_cache.inspect.attention import run_attention
    from cskd_cache.train.engine import resolve_device

    specs = ([model] if model else []) + [s for s in (compare or ()) if s]
    if not specs and not cache:
        fail("no model: pass --model SPEC, --compare SPEC_A SPEC_B and/or --cache CACHE", code=2)
    if specs and images is None:
        fail("--model/--compare need --images FOLDER (the images shown to every model)", code=2)
    with failing():
        dev = resolve_device(device)
    bars = {}
    with failing(), progress_bar("attention") as update:
        def on_progress(label: str, done: int, total: int) -> None:
            bars[label] = (done, total)
            update(sum(d for d, _ in bars.values()), total * len(specs))

        result = run_attention(specs, images, out, max_images=max_images, batch_size=batch_size, device=str(dev),
                               seed=seed, max_pixels=max_pixels, on_progress=on_progress, trust_code=trust_code,
                               caches=[str(c) for c in cache or []])
    table = Table(title=f"cskd attention -> {out}")
    for col in ("model", "layers x heads", "images", "distance px (first -> last)", "entropy nats (first -> last)",
                "uniform"):
        table.add_column(col)
    def mean(v):
        return sum(v) / len(v)

    for m in result["models"]:
        first, last = m["layers"][0], m["layers"][-1]
        table.add_row(m["label"], f"{m['num_layers']} x {m['num_heads']}",
                      f"{m['images']}" + (f" ({m['skipped_images']} unreadable)" if m["skipped_images"] else ""),
                      f"{mean(first['distance']):.1f} -> {mean(last['distance']):.1f}",
                      f"{mean(first['entropy']):.2f} -> {mean(last['entropy']):.2f}",
                      f"{m['uniform_distance']:.1f} px, {m['uniform_entropy']:.2f} nats")
    show(table)
    console.print(f"plots: {Path(out) / 'attention_distance.png'}, {Path(out) / 'attention_entropy.png'}")
