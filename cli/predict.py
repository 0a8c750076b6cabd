"""`cskd predict`: aesthetic scores of image files and folders from a trained IAA model, as CSV or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import err_console, fail, failing, progress_bar, show
from ._options import DefaultsOpt, TrustCodeOpt


def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (scanned recursively for "
                                                     ".jpg .jpeg .png .bmp .gif .tif .tiff .webp).")],
    model: Annotated[Path, typer.Option(help="RUN_DIR of a finished `cskd finetune` / `cskd distill` run "
                                             "(iaa_model.json + iaa_model.safetensors).")],
    out: Annotated[Path, typer.Option(help="Output file; its suffix picks the format: .csv (path, score, std, "
                                           "d1..dK, error) or .json.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward batch.")] = 32,
    num_workers: Annotated[int, typer.Option(min=0, help="Decode worker processes (0 = decode in this process).")]
    = 2,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    trust_code: TrustCodeOpt = False,
    plot: Annotated[bool, typer.Option(help="Also draw the distribution of the predicted scores as OUT with a .png "
                                            "suffix.")] = False,
    config: DefaultsOpt = None,
) -> None:
    """Score images with a trained IAA model: mean score on the training dataset's scale, and its std and
    K-bin distribution for a distribution head. Unreadable files are listed in the output with an error and
    counted on stderr, never fatal; exit 0 when at least one image was scored, 1 when none was."""
    from cskd_cache.errors import CskdError
    from cskd_cache.evaluate.predict import output_format, run_predict

    try:
        output_format(out)
    except CskdError as e:
        raise typer.BadParameter(str(e).removeprefix(f"--out {out}: "), param_hint="--out") from None
    with failing(), progress_bar("predict") as update:
        result = run_predict(model, paths, out, batch_size=batch_size, num_workers=num_workers, device=device,
                             on_progress=update, trust_code=trust_code, plot=plot)
    if result.n_failed:
        first = ", ".join(f"{p} ({e.split(':')[0]})" for p, e in result.failed[:3])
        err_console.print(f"[yellow]warning:[/] {result.n_failed} of {result.n_inputs} files could not be read and "
                          f"have an error in {result.out} (first: {first}{', ...' if result.n_failed > 3 else ''})",
                          highlight=False, soft_wrap=True)
    table = Table(title=f"cskd predict -> {result.out}", show_header=False)
    for k, v in (("inputs", f"{result.n_inputs:,}"), ("scored", f"{result.n_scored:,}"),
                 ("unreadable", f"{result.n_failed:,}"), ("format", result.format),
                 *((("plot", str(result.plot)),) if result.plot else ())):
        table.add_row(k, v)
    show(table)
    if result.n_scored == 0:
        fail(f"none of the {result.n_inputs} files could be scored (each is listed with its error in {result.out})")
