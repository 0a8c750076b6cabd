"""The `cskd` command: a thin Typer layer over cskd_cache (the library never imports this package)."""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
