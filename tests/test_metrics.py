"""cskd_cache.evaluate.metrics against scipy (when installed) and against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cskd_cache.evaluate.metrics import (
    binary_accuracy,
    bootstrap_ci,
    emd,
    evaluate_predictions,
    mae,
    plcc,
    rankdata,
    srcc,
)


def noisy(n: int, seed: int = 0, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    t = rng.normal(5, 1, n)
    return t, t + rng.normal(0, noise, n)


def test_hand_computed_cases():
    # ranks of p are [1, 3, 2, 4]: d = [0, 1, -1, 0], rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert srcc([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # y = 2x + 1 is perfectly linear; y = x^3 is perfectly monotone but not linear
    assert plcc([1, 2, 3], [3, 5, 7]) == pytest.approx(1.0)
    assert srcc([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0) and plcc([1, 2, 3, 4], [1, 8, 27, 64]) < 1
    # centred x = [-1, 0, 1], centred y = [-1, -1, 2] (y = [1, 1, 4]): r = 3 / (sqrt(2) * sqrt(6)) = sqrt(3)/2
    assert plcc([1, 2, 3], [1, 1, 4]) == pytest.approx(np.sqrt(3) / 2)
    assert srcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_ties_get_average_ranks():
    assert rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    # ranks of y = [1, 2.5, 2.5, 4]; Pearson of [1,2,3,4] with them: 4.5 / sqrt(5 * 4.5)
    assert srcc([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / np.sqrt(5 * 4.5))


def test_matches_scipy_with_and_without_ties():
    stats = pytest.importorskip("scipy.stats")
    t, p = noisy(500)
    assert srcc(t, p) == pytest.approx(stats.spearmanr(t, p)[0], abs=1e-12)
    assert plcc(t, p) == pytest.approx(stats.pearsonr(t, p)[0], abs=1e-12)
    tq, pq = np.round(t * 2) / 2, np.round(p)  # heavy ties, as with AVA's rounded means
    assert srcc(tq, pq) == pytest.approx(stats.spearmanr(tq, pq)[0], abs=1e-12)
    assert np.allclose(rankdata(pq), stats.rankdata(pq))


def test_degenerate_inputs():
    assert np.isnan(plcc([1, 2, 3], [2, 2, 2])) and np.isnan(srcc([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="differ in length"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        plcc([1], [1])
    with pytest.raises(ValueError, match="finite"):
        plcc([1, np.nan, 3], [1, 2, 3])


def test_accuracy_mae_emd():
    assert binary_accuracy([4, 6, 5, 3], [6, 7, 4.9, 2], threshold=5.0) == 0.5
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    # CDFs [1, 1, 1] and [0, 0, 1]: squared diffs [1, 1, 0], mean 2/3, EMD = sqrt(2/3)
    assert emd([1, 0, 0], [0, 0, 1]) == pytest.approx(np.sqrt(2 / 3))
    assert emd([[2, 0, 0], [0, 1, 0]], [[0, 0, 4], [0, 1, 0]]) == pytest.approx(np.sqrt(2 / 3) / 2)
    p = np.random.default_rng(0).dirichlet(np.ones(10), 20)
    q = np.random.default_rng(1).dirichlet(np.ones(10), 20)
    assert emd(p, p) == 0 and emd(p, q) == pytest.approx(emd(q, p))


def test_bootstrap_contains_estimate_narrows_and_is_seeded():
    t, p = noisy(100, seed=1)
    lo, hi = bootstrap_ci(srcc, t, p, n=300)
    assert lo < srcc(t, p) < hi
    assert bootstrap_ci(srcc, t, p, n=300) == (lo, hi)
    assert bootstrap_ci(srcc, t, p, n=300, seed=1) != (lo, hi)
    tb, pb = noisy(2000, seed=1)
    lo2, hi2 = bootstrap_ci(srcc, tb, pb, n=300)
    assert lo2 < srcc(tb, pb) < hi2 and (hi2 - lo2) < 0.5 * (hi - lo)
    lo90, hi90 = bootstrap_ci(plcc, t, p, n=300, alpha=0.1)
    lo95, hi95 = bootstrap_ci(plcc, t, p, n=300, alpha=0.05)
    assert lo95 <= lo90 < hi90 <= hi95


def test_evaluate_predictions_collects_everything():
    t, p = noisy(200, seed=2)
    d = np.random.default_rng(3).dirichlet(np.ones(10), 200)
    out = evaluate_predictions(t, p, threshold=5.0, dist_true=d, dist_pred=d, n_boot=100)
    assert set(out) == {"n", "srcc", "plcc", "mae", "acc", "emd", "srcc_ci", "plcc_ci"}
    assert out["n"] == 200 and out["emd"] == 0 and out["srcc"] == srcc(t, p)
    assert out["srcc_ci"][0] < out["srcc"] < out["srcc_ci"][1] and all(type(v) in (int, float, list) for v in out.values())
    assert set(evaluate_predictions(t, p)) == {"n", "srcc", "plcc", "mae"}


def test_cluster_bootstrap_resamples_whole_groups():
    from cskd_cache.evaluate.evaluate import group_keys

    rng = np.random.default_rng(0)
    t = rng.uniform(1, 10, 20)
    p = t + rng.normal(0, 2, 20)
    # one group per row, in row order: the same resamples, hence the same interval, as plain row resampling
    own = [f"{i:03d}" for i in range(20)]
    assert bootstrap_ci(srcc, t, p, 300, seed=3, groups=own) == bootstrap_ci(srcc, t, p, 300, seed=3)
    # five versions of each of 20 photos: resampled as 100 independent rows the interval is far too narrow
    t5, p5 = np.repeat(t, 5), np.repeat(p, 5) + rng.normal(0, 0.01, 100)
    photo = np.repeat([f"photo{i}" for i in range(20)], 5)
    lo, hi = bootstrap_ci(srcc, t5, p5, 300, seed=3)
    glo, ghi = bootstrap_ci(srcc, t5, p5, 300, seed=3, groups=photo)
    assert ghi - glo > 1.6 * (hi - lo)
    assert group_keys(["a__blur3.png", "a__pristine.png", "b__jpeg1.png"], r"^(.*)__") == ["a", "a", "b"]
    with pytest.raises(ValueError, match="does not match the label key 'c.png'"):
        group_keys(["a__x.png", "c.png"], r"^(.*)__")
