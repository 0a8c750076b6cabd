"""Batch-norm statistics of a student trained on two kinds of items at once (`cskd distill --bn-stats`).

A batch-norm layer in training normalises each item by its batch's mean and variance and moves its running
statistics (the ones evaluation uses) towards them. When the labelled and the unlabelled items of a step share
one forward, the labelled items' gradient depends on the unlabelled ones' statistics even where those carry no
loss, and the running statistics the scores are computed with describe the mixture. The study's few-label
control measured that (README, "few-label decomposition"): with no loss on the unlabelled items, one of them per
step instead of 32 scored +0.080 [+0.027, +0.131] on proxy B. Acted on (README, "batch-norm statistics"), a batch of
their own for the labelled items gained at 5% labels and cost at 100% on both proxies, so distill keeps "joint".

`frozen_running_stats` lets a forward normalise by its own batch while leaving the running statistics exactly
as they were (cumulative-average layers included); `forward_split` runs a step's two kinds of items as two batches.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

__all__ = ["BN_STATS", "bn_layers", "forward_split", "frozen_running_stats"]

# joint: one forward of every item; separate: the labelled items in a forward of their own, the unlabelled ones
# in another, both moving the running statistics; labelled: as separate, but only the labelled forward moves them
BN_STATS = ("joint", "separate", "labelled")


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers that keep running statistics (SyncBatchNorm included)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_running_stats(layers: list[nn.modules.batchnorm._BatchNorm]):
    """Forwards inside normalise by their batch statistics and leave the running statistics as they were.

    The layers run at momentum 0 (running = 1 x running + 0 x batch, unchanged to the bit) rather than having their
    statistics copied back afterwards: autograd saved them for the backward of the forwards before, and an in-place
    copy would invalidate that. ``num_batches_tracked`` (a counter nothing differentiates) is put back, so that
    cumulative-average layers (momentum None) count only the batches outside."""
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, n) in zip(layers, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(n)


def forward_split(model: nn.Module, x: torch.Tensor, n_first: int, frozen: list[nn.modules.batchnorm._BatchNorm],
                  autocast=None) -> list:
    """The model's outputs on ``x[:n_first]`` and on ``x[n_first:]``, each its own batch-norm batch; the second
    forward leaves the running statistics of ``frozen`` alone (none: both forwards move them)."""
    outs = []
    for i, part in enumerate((x[:n_first], x[n_first:])):
        with autocast or nullcontext(), frozen_running_stats(frozen if i else []):
            outs.append(model(part))
    return outs
