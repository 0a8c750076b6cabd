"""`models.batch_norm`: a forward inside `frozen_running_stats` normalises by its own batch and leaves the running
statistics exactly as they were."""

from __future__ import annotations

import torch
from torch import nn

from cskd_cache.models.batch_norm import bn_layers, frozen_running_stats


def test_frozen_forward_uses_batch_statistics_and_restores_running_ones_bit_for_bit():
    torch.manual_seed(0)
    ema, cumulative = nn.BatchNorm2d(3), nn.BatchNorm2d(3, momentum=None)  # momentum None: num_batches_tracked counts
    model = nn.Sequential(ema, cumulative).train()
    model(torch.randn(4, 3, 5, 5) * 3 + 1)  # running statistics away from their initial 0 / 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 5, 5) * 2 - 4
    with frozen_running_stats(bn_layers(model)):
        y = model(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # by hand: each channel of x standardised over its own batch (biased variance), twice (weight 1, bias 0)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    once = (x - mean) / torch.sqrt(var + ema.eps)
    want = (once - once.mean((0, 2, 3), keepdim=True)) / torch.sqrt(once.var((0, 2, 3), unbiased=False,
                                                                             keepdim=True) + cumulative.eps)
    assert torch.allclose(y, want, atol=1e-5)
    model(x)  # outside the context the statistics move again, as in plain training
    assert not torch.equal(before["0.running_mean"], model.state_dict()["0.running_mean"])
    assert model.state_dict()["1.num_batches_tracked"] == before["1.num_batches_tracked"] + 1


def test_statistics_are_restored_when_the_forward_fails():
    bn = nn.BatchNorm1d(2).train()
    before = bn.running_mean.clone()
    try:
        with frozen_running_stats([bn]):
            bn(torch.randn(5, 2) + 7)
            raise RuntimeError("out of memory")
    except RuntimeError:
        pass
    assert torch.equal(bn.running_mean, before)


def test_only_layers_with_running_statistics_are_listed():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.LayerNorm(4), nn.SyncBatchNorm(4))
    assert bn_layers(model) == [model[1], model[4]]
