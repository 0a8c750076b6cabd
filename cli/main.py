"""The `cskd` command: a thin Typer layer over cskd_cache (the library never imports this package)."""

from __future__ import annotations

import warnings

import typer

from . import cache as cache_cmd
from .align import align
from .attention import attention
from .evaluate import evaluate
from .export import export
from .distill import distill
from .extract import extract
from .finetune import finetune
from .neighbors import neighbors
from .predict import predict
from .proxy_set import proxy_set
from .report import report
from .samples import sample_images

app = typer.Typer(
    name="cskd",
    help="CLIP-based semi-supervised knowledge distillation for image aesthetics, built on a feature cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
def _version(value: bool) -> None:
    if value:
        from cskd_cache import __version__

        typer.echo(f"cskd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the cskd version and exit.")) -> None:
    """CLIP-based semi-supervised knowledge distillation for image aesthetics, built on a feature cache."""


app.command("sample-images")(sample_images)
app.command("proxy-set")(proxy_set)
app.command("extract")(extract)
app.command("align")(align)
app.command("finetune")(finetune)
app.command("distill")(distill)
app.command("evaluate")(evaluate)
app.command("predict")(predict)
app.command("export")(export)
app.command("attention")(attention)
app.command("neighbors")(neighbors)
app.command("report")(report)
app.add_typer(cache_cmd.app, name="cache")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    # A notice for a person, not a developer: no source line, no file name, one line.
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    app()


if __name__ == "__main__":
    main()
