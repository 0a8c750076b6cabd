"""`cskd proxy-set`: a labelled proxy quality set from your own photos (graded degradations, KADID-10k style)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, fail, failing
from ._options import DefaultsOpt


def proxy_set(
    src: Annotated[Path, typer.Option(help="Folder of source photos (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output folder: images/ and labels.csv (a csv: DATASET_SPEC).")],
    n: Annotated[Optional[int], typer.Option(min=1, help="Use N source photos, a seeded sample (default: all).")]
    = None,
    per_image: Annotated[int, typer.Option(min=0, help="Degraded versions per photo, besides the pristine one.")]
    = 4,
    unlabelled_per_image: Annotated[int, typer.Option(
        min=0, help="Extra versions per *train* photo, in unlabelled/ (never labels): the pool a teacher labels "
        "in `cskd distill`. Val/test photos get none.")] = 0,
    levels: Annotated[int, typer.Option(min=1, max=5, help="Severity levels drawn from (1..5).")] = 5,
    kinds: Annotated[str, typer.Option(help="Comma-separated degradations.")] = "blur,noise,jpeg,exposure,colour",
    size: Annotated[int, typer.Option(min=8, help="Working size: shorter side in pixels.")] = 256,
    content_weight: Annotated[float, typer.Option(min=0, max=1, help="Content variant: score = (1 - W) x quality + W "
                                                  "x a seeded preference of the photo's content group (blocks of "
                                                  "the sorted file names, e.g. neighbouring ImageNet classes; "
                                                  "written to content.csv). 0 = quality only.")] = 0.0,
    content_groups: Annotated[int, typer.Option(min=2, help="Content groups of --content-weight.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the split, the drawn degradations and their noise.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Processes; the output does not depend on it.")] = 1,
    config: DefaultsOpt = None,
) -> None:
    """Build a labelled proxy set: each photo pristine (score 10) plus degraded versions scored 10 - 1.8 x level,
    10-bin distributions, split 70/10/20 by source photo. A stand-in for human labels where none exist."""
    import numpy as np

    from cskd_cache.data.sources import scan_images
    from cskd_cache.inspect.proxy_quality import build_proxy_set, summarise

    if not src.is_dir():
        fail(f"--src {src} is not a folder; point it at a folder of photos")
    paths = scan_images(src)
    if not paths:
        fail(f"no images under {src} (extensions: jpg, png, webp, ...); point --src at a folder of photos")
    if n is not None and n < len(paths):
        pick = np.random.default_rng(seed).choice(len(paths), size=n, replace=False)
        paths = [paths[i] for i in sorted(pick)]
    t = time.perf_counter()
    with failing():
        labels = build_proxy_set(paths, out, levels=levels, kinds=[k.strip() for k in kinds.split(",") if k.strip()],
                                 per_image=per_image, seed=seed, size=size, workers=workers,
                                 unlabelled_per_image=unlabelled_per_image, content_weight=content_weight,
                                 content_groups=content_groups)
    console.print(summarise(labels), highlight=False)
    if unlabelled_per_image:
        n_unl = len((out / "unlabelled.csv").read_text(encoding="utf-8").splitlines()) - 1  # minus the header
        console.print(f"unlabelled: {n_unl} images in {out / 'unlabelled'} (listed in unlabelled.csv); extract them "
                      "with the train images", highlight=False)
    console.print(f"built in {time.perf_counter() - t:.1f} s; train on it with --labels csv:{labels}", highlight=False)
