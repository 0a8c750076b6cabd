"""`cskd sample-images`: write procedural photos for an offline quickstart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console
from ._options import DefaultsOpt


def sample_images(
    out: Annotated[Path, typer.Option(help="Folder to write the images into.")],
    n: Annotated[int, typer.Option(min=1, help="How many images.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same images.")] = 0,
    config: DefaultsOpt = None,
) -> None:
    """Write procedural sample photos (no download), so the quickstart runs on a fresh offline machine."""
    from cskd_cache.inspect.samples import write_samples

    paths = write_samples(out, n=n, seed=seed)
    console.print(f"wrote {len(paths)} sample images to {out}")
