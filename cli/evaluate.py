"""`cskd evaluate`: SRCC/PLCC (with bootstrap intervals), accuracy, MAE and EMD of a trained IAA model on a split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import err_console, failing, progress_bar, show
from ._options import DefaultsOpt, LabelImageRootOpt, Old, TrustCodeOpt


def evaluate(
    model: Annotated[Path, typer.Option(help="RUN_DIR of a finished `cskd finetune` / `cskd distill` run "
                                             "(iaa_model.json + iaa_model.safetensors).")],
    labels: Annotated[str, typer.Option(help="DATASET_SPEC of the labels: ava:ROOT, aadb:ROOT, tad66k:ROOT, "
                                             "para:ROOT, koniq:ROOT, spaq:ROOT, csv:FILE or jsonl:FILE.")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, predictions.csv and scatter.png.")],
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val or test.")] = "test",
    label_image_root: LabelImageRootOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward batch.")] = 32,
    num_workers: Annotated[int, typer.Option(min=0, help="Decode worker processes (0 = decode in this process).")]
    = 2,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the SRCC/PLCC 95% intervals "
                                                       "(0 = no intervals).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
    group_by: Annotated[Optional[str], typer.Option(help="Resample whole groups in the bootstrap: a regex on the "
                                                         "label key whose first group names the source photo, "
                                                         "e.g. '^(.*)__' for the proxy set, or column:NAME for a "
                                                         "column of a csv:/jsonl: label file (default: images).")]
    = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    trust_code: TrustCodeOpt = False,
    config: DefaultsOpt = None,
    image_root: Old("--image-root", str) = None,
) -> None:
    """Score one split of a labelled dataset with a trained IAA model. Writes OUT/metrics.json, OUT/predictions.csv
    (key, path, true, pred) and OUT/scatter.png; missing or unreadable images are left out and counted."""
    from cskd_cache.evaluate.evaluate import EvalConfig, run_evaluate

    if split not in ("train", "val", "test"):
        raise typer.BadParameter(f"{split!r}: use train, val or test", param_hint="--split")
    roots = EvalConfig.normalise({k: v for k, v in (("label_image_root", label_image_root), ("image_root", image_root))
                                  if v})
    cfg = EvalConfig(model=str(model), labels=labels, out=str(out), split=split,
                     label_image_root=roots.get("label_image_root"), batch_size=batch_size, num_workers=num_workers,
                     bootstrap=bootstrap, seed=seed, device=device, trust_code=trust_code, group_by=group_by)
    with failing(), progress_bar("score") as update:
        result = run_evaluate(cfg, on_progress=update, on_status=lambda m: err_console.print(f"[dim]{m}[/]"))
    m = result.metrics
    if result.skipped_summary:
        err_console.print(f"[yellow]warning:[/] {result.skipped_summary}", highlight=False, soft_wrap=True)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    table = Table(title=f"cskd evaluate: {m['dataset']} {m['split']} ({m['n']:,} of {m['n_labels']:,} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    for key, name in (("srcc", "SRCC"), ("plcc", "PLCC"), ("acc", f"accuracy (>= {m['threshold']:g})"),
                      ("mae", "MAE"), ("emd", "EMD")):
        if key in m:
            ci = m.get(f"{key}_ci")
            table.add_row(name, f"{m[key]:.4f}", f"{ci[0]:.4f} .. {ci[1]:.4f}" if ci else "")
    table.add_row("skipped", f"{m['n_missing']} missing, {m['n_unreadable']} unreadable", "")
    table.add_row("written", str(result.out), "metrics.json, predictions.csv, scatter.png")
    show(table)
