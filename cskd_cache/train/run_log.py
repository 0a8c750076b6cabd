"""A run directory's record: config.yaml, metrics.jsonl (one JSON object per line) and the loss-curve PNG.

Patterns from dinov2 (metrics as JSON lines, flushed per record so a crash loses nothing) and timm (args.yaml in
the run directory). Records carry ``type`` (``train``, ``eval``, or ``end``: the wall seconds and training
images/s of the process that finished the run), ``step`` and ``epoch``; a resumed run drops the records past its
checkpoint before re-doing those steps, so nothing is logged twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["MetricsWriter", "read_metrics", "write_config", "read_resolved", "plot_losses"]


class MetricsWriter:
    """Appends one JSON object per line (rank 0 only); flushed per record so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run re-does them, and must not log them twice."""
        if self.enabled and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_config(path: str | os.PathLike, config: dict) -> None:
    import yaml

    from ..files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, default_flow_style=None))


def read_resolved(path: str | os.PathLike) -> dict:
    """The ``resolved`` part of a run's config.yaml: what its first start decided (schedule, facts), which a
    resumed run keeps even where today's defaults would decide otherwise."""
    import yaml

    saved = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return saved.get("resolved") or {}


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike, metric: str = "global_cos",
                label: str = "held-out global cosine") -> None:
    """Training loss per step and one eval metric per epoch (align: held-out global cosine; finetune/distill:
    val SRCC), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:orange", label=label)
        ax2.set_ylabel(label, color="tab:orange")
    ax.set_title(Path(png_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
