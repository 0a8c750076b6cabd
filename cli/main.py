"""The `cskd` command: a thin Typer layer over cskd_cache (the library never imports this package)."""

from __future__ import annotations

import warnings

import typer

from . import cache as cache_cmd
from .align import align
from .attention import attention
from .demo import demo
from .distill import distill
from .evaluate import evaluate
from .export import export
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


# In pipeline order: data, the cache, Stage I, Stage II, deploy, diagnose.
COMMANDS = {"demo": demo, "sample-images": sample_images, "proxy-set": proxy_set, "extract": extract, "align": align,
            "finetune": finetune, "distill": distill, "evaluate": evaluate, "predict": predict, "export": export,
            "attention": attention, "neighbors": neighbors, "report": report}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
app.add_typer(cache_cmd.app, name="cache")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    # A notice for a person, not a developer: no source line, no file name, one line.
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    app()


if __name__ == "__main__":
    main()
