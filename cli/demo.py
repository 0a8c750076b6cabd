"""`cskd demo`: the whole quickstart chain in one command, ending with a run page and a labels-only vs CSKD page."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, err_console, fail
from ._options import DefaultsOpt

STUDENT = "timm:mobilenetv3_small_100"
SHORT = ["--max-steps", "30", "--batch-size", "16"]


def demo_steps(out: str, teacher: str = "open_clip:ViT-B-32@none") -> list[list[str]]:
    """The commands `cskd demo --out OUT` runs, in order (the README's step-by-step quickstart is this list)."""
    labels = f"csv:{out}/proxy/labels.csv"
    return [
        ["sample-images", "--out", f"{out}/photos", "--n", "24"],
        ["proxy-set", "--src", f"{out}/photos", "--out", f"{out}/proxy", "--per-image", "2"],
        ["extract", "--teacher", teacher, "--images", f"{out}/proxy/images", "--out", f"{out}/cache", "--views", "2"],
        ["align", "--cache", f"{out}/cache", "--student", STUDENT, "--size", "96", "--out", f"{out}/align", *SHORT],
        ["finetune", "--model", f"run:{out}/align", "--labels", labels, "--out", f"{out}/teacher", *SHORT],
        ["distill", "--labels", labels, "--cache", f"{out}/cache", "--teacher", f"run:{out}/teacher", "--student",
         f"run:{out}/align", "--out", f"{out}/student", *SHORT],
        ["finetune", "--model", STUDENT, "--size", "96", "--labels", labels, "--out", f"{out}/labels-only", *SHORT],
        ["evaluate", "--model", f"{out}/student", "--labels", labels, "--split", "test", "--out", f"{out}/student/eval"],
        ["evaluate", "--model", f"{out}/labels-only", "--labels", labels, "--split", "test", "--out",
         f"{out}/labels-only/eval"],
        ["report", f"{out}/align"],
        ["report", f"{out}/teacher"],
        ["report", f"{out}/student"],
        ["report", f"{out}/labels-only", f"{out}/student", "--out", f"{out}/compare.html"],
    ]


def _done(step: list[str]) -> bool:
    """A step whose output is already complete (a rerun continues an interrupted demo)."""
    out = Path(step[step.index("--out") + 1]) if "--out" in step else None
    marker = {"sample-images": None, "proxy-set": "labels.csv", "extract": "manifest.json", "align": "student.json",
              "finetune": "iaa_model.json", "distill": "iaa_model.json", "evaluate": "metrics.json"}.get(step[0])
    if out is None or step[0] == "report":
        return False
    if step[0] == "sample-images":
        return out.is_dir() and any(out.iterdir())
    return marker is not None and (out / marker).is_file()


def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes (photos, proxy labels, cache, "
                                           "runs, pages). A rerun continues where an interrupted one stopped.")]
    = Path("demo"),
    teacher: Annotated[str, typer.Option(help="Feature teacher of the cache: open_clip:ViT-B-32@none (random "
                                              "weights, offline) unless given, e.g. "
                                              "py:cskd_cache.models.zoo.efficientnet_lite0:teacher.")]
    = "open_clip:ViT-B-32@none",
    config: DefaultsOpt = None,
) -> None:
    """Run the quickstart chain on generated photos: proxy labels, cache, align, teacher, distill, a labels-only
    student, evaluation of both; ends with OUT/student/report.html and OUT/compare.html (labels-only vs CSKD)."""
    from .main import app

    t0 = time.perf_counter()
    steps = demo_steps(str(out), teacher)
    for n, step in enumerate(steps, 1):
        line = "cskd " + shlex.join(step)
        if _done(step):
            err_console.print(f"[dim]{n}/{len(steps)} done already: {line}[/]", highlight=False)
            continue
        err_console.print(f"[bold]{n}/{len(steps)}[/] {line}", highlight=False)
        code = app(step, prog_name="cskd", standalone_mode=False)  # each command's own errors print as usual
        if code:
            fail(f"step {n} failed: {line}; fix what it said and rerun `cskd demo --out {out}` to continue", code=code)
    console.print(f"demo done in {time.perf_counter() - t0:,.0f} s: open {out / 'student' / 'report.html'} and "
                  f"{out / 'compare.html'}", highlight=False)
