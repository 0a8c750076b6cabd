"""Stage II losses (EMD, distillation KL, PLCC) and the score heads."""

from __future__ import annotations

import math

import pytest
import torch

from cskd_cache.evaluate.metrics import emd as emd_metric
from cskd_cache.losses.emd import EMDLoss
from cskd_cache.losses.kl import DistillKLLoss
from cskd_cache.losses.plcc_loss import PLCCLoss
from cskd_cache.models.score_heads import DistributionHead, ScalarHead


def rand_dist(b: int, k: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(b, k, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_emd_hand_computed_identity_and_symmetry():
    loss = EMDLoss()
    p, q = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    assert loss(p, q).item() == pytest.approx(math.sqrt(2 / 3))
    # second sample: CDFs [.5, 1, 1] vs [0, .5, 1] -> squared diffs [.25, .25, 0], EMD = sqrt(1/6)
    p2, q2 = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.0, 0.5, 0.5]])
    both = loss(torch.cat([p, p2]), torch.cat([q, q2])).item()
    assert both == pytest.approx((math.sqrt(2 / 3) + math.sqrt(1 / 6)) / 2)
    a, b = rand_dist(8, 10, 0), rand_dist(8, 10, 1)
    assert loss(a, a).item() == 0.0
    assert loss(a, b).item() == pytest.approx(loss(b, a).item())
    assert loss(a, b).item() == pytest.approx(emd_metric(a.numpy(), b.numpy()), rel=1e-5)


def test_emd_gradient_is_finite_at_an_exact_match():
    logits = torch.zeros(2, 5, requires_grad=True)
    target = torch.tensor([[0.2] * 5, [0.1, 0.2, 0.4, 0.2, 0.1]])
    EMDLoss()(logits.softmax(-1), target).backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="differ in shape"):
        EMDLoss()(target, target[:, :3])


def test_kl_nonnegative_zero_on_match_and_temperature():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    for temp in (1.0, 2.0, 4.0):
        kl = DistillKLLoss(temp)
        assert kl(s, t).item() >= 0 and kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # T = 1 equals the textbook sum p log(p / q)
    p, q = t.softmax(-1), s.softmax(-1)
    assert DistillKLLoss()(s, t).item() == pytest.approx((p * (p / q).log()).sum(-1).mean().item(), rel=1e-5)
    # teacher given as probabilities: same value at any T
    assert DistillKLLoss(2.0, teacher="probs")(s, p).item() == pytest.approx(DistillKLLoss(2.0)(s, t).item(), rel=1e-4)


def test_kl_gradient_reaches_student_only():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    DistillKLLoss(2.0)(s, t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="temperature"):
        DistillKLLoss(0.0)


def test_plcc_loss():
    loss = PLCCLoss()
    x = torch.randn(32)
    assert loss(x, 3 * x + 2).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    y = torch.randn(32)
    r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert loss(x.view(-1, 1), y).item() == pytest.approx(1 - r, abs=1e-5)
    pred = torch.full((4,), 2.0, requires_grad=True)
    out = loss(pred, torch.arange(4.0))
    out.backward()
    assert out.item() == pytest.approx(1.0) and torch.isfinite(pred.grad).all()
    one = torch.ones(1, requires_grad=True)
    assert loss(one, torch.zeros(1)).item() == 0.0


def test_distribution_head_scores_within_bins():
    head = DistributionHead(16, bins=10, dropout=0.1).eval()
    logits = head(torch.randn(64, 16) * 50)  # large inputs push the softmax towards one-hot
    s = head.scores(logits)
    assert logits.shape == (64, 10) and s.shape == (64,)
    assert (s >= 1).all() and (s <= 10).all()
    assert torch.allclose(head.probs(logits).sum(-1), torch.ones(64))
    one_hot = torch.full((1, 5), -1e4)
    one_hot[0, 4] = 0
    assert DistributionHead(4, bins=5).scores(one_hot).item() == pytest.approx(5.0)
    assert "values" not in head.state_dict()


def test_scalar_head_and_emd_training_step():
    assert ScalarHead(8)(torch.randn(3, 8)).shape == (3,)
    torch.manual_seed(0)
    head = DistributionHead(8, bins=5)
    x, target = torch.randn(16, 8), rand_dist(16, 5, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        loss = EMDLoss()(head.probs(head(x)), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_consistency_pulls_the_second_view_towards_the_first_and_never_the_reverse():
    from cskd_cache.losses.consistency import ConsistencyLoss
    from cskd_cache.losses.emd import EMDLoss

    weak = torch.zeros(2, 4, requires_grad=True)  # uniform distributions
    strong = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], requires_grad=True)
    loss = ConsistencyLoss("distribution")(strong, weak)
    want = EMDLoss()(strong.softmax(-1), torch.full((2, 4), 0.25))
    assert torch.allclose(loss, want) and loss > 0
    loss.backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0  # the target's gradient is stopped
    assert ConsistencyLoss("distribution")(weak.detach(), weak.detach()) == 0  # agreeing views cost nothing
    s, w = torch.tensor([0.2, 0.9], requires_grad=True), torch.tensor([0.5, 0.5])
    assert torch.allclose(ConsistencyLoss("scalar")(s, w), torch.tensor((0.3 ** 2 + 0.4 ** 2) / 2))


def test_iaa_loss_adds_consistency_only_when_weighted_and_given_second_views():
    from cskd_cache.losses.iaa import IAALoss

    torch.manual_seed(0)
    out, out2 = torch.randn(6, 10), torch.randn(3, 10)
    lab = {"image": torch.zeros(3, 3, 2, 2), "dist": torch.full((3, 10), 0.1)}
    unl = {"image": torch.zeros(3, 3, 2, 2), "logits": torch.randn(3, 10)}
    off = IAALoss("distribution", lambda_u=1.0)(out, None, lab, unl, out2)
    on = IAALoss("distribution", lambda_u=1.0, consistency=0.5)(out, None, lab, unl, out2)
    assert "consistency" not in off and torch.allclose(on["loss"], off["loss"] + 0.5 * on["consistency"])


def test_attention_distance_of_uniform_attention_and_the_constraint():
    from cskd_cache.errors import ModelError
    from cskd_cache.losses.attention_distance import AttentionDistanceLoss, mean_distance
    from cskd_cache.models.attention_probe import AttentionProbe, patch_distances
    from cskd_cache.models.students import build_student

    # one prefix token + a 2x2 grid of 16 px patches, every query attending uniformly: each patch sees itself (0),
    # two neighbours (16 px) and the diagonal (16 * sqrt(2)); the prefix's weight is left out and renormalised
    probs = torch.full((1, 2, 5, 5), 0.2)
    want = (0 + 16 + 16 + 16 * math.sqrt(2)) / 4
    assert math.isclose(float(mean_distance(probs, 1, patch_distances((2, 2), (16, 16)))), want, rel_tol=1e-6)
    loss = AttentionDistanceLoss(torch.tensor([10.0, 20.0]))
    assert float(loss(torch.tensor([10.0, 20.0]))) == 0.0
    assert math.isclose(float(loss(torch.tensor([12.0, 10.0]))), (0.2 ** 2 + 0.5 ** 2) / 2, rel_tol=1e-6)
    # read from a real ViT's own forward, differentiably, one value per block
    enc = build_student("timm:test_vit", size=32)
    probe = AttentionProbe(enc)
    probe.start()
    enc(torch.randn(2, 3, 32, 32))
    profile = probe.profile()
    assert profile.shape == (len(probe.sites),) and profile.requires_grad
    with pytest.raises(ModelError, match="needs a ViT-family student"):
        AttentionProbe(build_student("timm:test_resnet", size=32))
