"""Toy distributions against scipy.stats / scikit-learn, and the VEEGAN mode-coverage metric."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from course_lib.data.toy import (D2LGaussian, GaussianMixture, GaussianMixture1D, Grid2D, Ring2D,
                                 SwissRoll2D, TwoMoons, mode_coverage)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixture_logpdf(x: np.ndarray, means: np.ndarray, stds: np.ndarray,
                   weights: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(x; mu_k, s_k^2 I), written out with scipy.stats, one component at a time."""
    per_component = [np.log(w) + stats.multivariate_normal(m, s ** 2 * np.eye(len(m))).logpdf(x)
                     for m, s, w in zip(means, stds, weights)]
    return special.logsumexp(np.stack(per_component), axis=0)


ALL = [D2LGaussian(), GaussianMixture1D(), Ring2D(), Grid2D(), TwoMoons(0.1), SwissRoll2D(0.5)]


@pytest.mark.parametrize("dist", ALL, ids=lambda d: type(d).__name__)
def test_same_seed_same_samples(dist):
    a, b = dist.sample(300, seeded(7)), dist.sample(300, seeded(7))
    assert a.dtype == torch.float32 and a.ndim == 2 and len(a) == 300
    assert torch.equal(a, b)
    assert not torch.equal(a, dist.sample(300, seeded(8)))
    assert isinstance(dist.name, str) and dist.name


@pytest.mark.parametrize("dist", ALL, ids=lambda d: type(d).__name__)
def test_bad_sample_count_raises(dist):
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            dist.sample(n)


def test_d2l_gaussian_is_n_b_AtA():
    dist = D2LGaussian()
    # A^T A by hand: [[1 + 0.01, 2 - 0.05], [2 - 0.05, 4 + 0.25]]; A A^T is [[5, .9], [.9, .26]]
    torch.testing.assert_close(dist.covariance, torch.tensor([[1.01, 1.95], [1.95, 4.25]]))
    x = dist.sample(200_000, seeded(0)).double()
    torch.testing.assert_close(x.mean(0), dist.b.double(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), dist.covariance.double(), atol=0.05, rtol=0)


def test_d2l_gaussian_log_prob_matches_scipy(device):
    dist = D2LGaussian()
    x = dist.sample(50, seeded(1))
    expected = stats.multivariate_normal([1.0, 2.0], [[1.01, 1.95], [1.95, 4.25]]).logpdf(x.numpy())
    got = dist.log_prob(x.to(device))
    assert got.device.type == device.type and got.shape == (50,)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5)


def test_mixture_1d_log_prob_and_density_match_scipy(device):
    dist = GaussianMixture1D(means=(-1.0, 0.5, 3.0), stds=(0.3, 1.0, 0.7), weights=(2, 1, 1))
    torch.testing.assert_close(dist.weights, torch.tensor([0.5, 0.25, 0.25]))
    xs = torch.linspace(-4, 6, 201)
    expected = np.log(0.5 * stats.norm.pdf(xs, -1, 0.3) + 0.25 * stats.norm.pdf(xs, 0.5, 1.0)
                      + 0.25 * stats.norm.pdf(xs, 3, 0.7))
    got = dist.log_prob(xs[:, None].to(device))
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dist.density(xs).numpy(), np.exp(expected), rtol=1e-5, atol=1e-7)
    grid = torch.linspace(-8, 10, 20_001)
    assert torch.trapezoid(dist.density(grid), grid).item() == pytest.approx(1.0, abs=1e-4)


def test_mixture_1d_samples_follow_its_cdf():
    dist = GaussianMixture1D()
    x = dist.sample(4000, seeded(2))[:, 0].numpy()

    def cdf(v):
        return 0.5 * stats.norm.cdf(v, -2, 0.5) + 0.5 * stats.norm.cdf(v, 2, 0.5)

    assert stats.kstest(x, cdf).pvalue > 0.01
    assert stats.kstest(x, lambda v: stats.norm.cdf(v, 0, 2.06)).pvalue < 1e-6  # same variance


@pytest.mark.parametrize("dist", [Ring2D(), Grid2D(), GaussianMixture([[0.0, 0], [3, 1]], [1, 0.5],
                                                                       [1, 3])],
                         ids=["ring", "grid", "custom"])
def test_mixture_2d_log_prob_matches_scipy(dist, device):
    x = torch.cat([dist.sample(40, seeded(3)), torch.tensor([[0.0, 0.0], [1.0, -0.5]])])
    expected = mixture_logpdf(x.double().numpy(), dist.modes.double().numpy(),
                              dist.stds.double().numpy(), dist.weights.double().numpy())
    np.testing.assert_allclose(dist.log_prob(x.to(device)).cpu().numpy(), expected, rtol=1e-4)


def test_ring_and_grid_geometry():
    ring = Ring2D()
    torch.testing.assert_close(ring.modes.norm(dim=1), torch.full((8,), 2.0))
    angles = torch.atan2(ring.modes[:, 1], ring.modes[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles.sort().values, torch.arange(8) * math.pi / 4, atol=1e-6,
                               rtol=0)
    assert ring.std == 0.02 and Grid2D().std == 0.05
    grid = {tuple(m) for m in Grid2D().modes.tolist()}
    assert grid == {(float(a), float(b)) for a in range(-4, 5, 2) for b in range(-4, 5, 2)}


@pytest.mark.parametrize("dist", [Ring2D(), Grid2D()], ids=["ring", "grid"])
def test_mixture_samples_spread_evenly_with_the_right_std(dist):
    x = dist.sample(5000, seeded(4))
    nearest = torch.cdist(x, dist.modes).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=len(dist.modes)).numpy()
    assert stats.chisquare(counts).pvalue > 0.01
    residual = x - dist.modes[nearest]
    assert residual.std().item() == pytest.approx(dist.std, rel=0.05)


def test_mixture_bad_arguments_raise():
    with pytest.raises(ValueError, match="stds must all be > 0"):
        GaussianMixture1D(stds=(0.5, -1.0))
    with pytest.raises(ValueError, match="one entry per mode"):
        GaussianMixture1D(means=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="one entry per mode"):
        GaussianMixture([[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        GaussianMixture([[0.0], [1.0]], stds=1.0, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \[k, d\]"):
        GaussianMixture([0.0, 1.0], stds=1.0)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        Ring2D().log_prob(torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[n, 1\]"):
        GaussianMixture1D().log_prob(torch.zeros(5, 2))


def test_two_moons_matches_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    ours = TwoMoons(noise=0.1).sample(4000, seeded(5)).numpy()
    theirs, _ = datasets.make_moons(4000, noise=0.1, random_state=0)
    for axis in (0, 1):
        assert stats.ks_2samp(ours[:, axis], theirs[:, axis]).pvalue > 0.01
    clean = TwoMoons(noise=0.0).sample(500, seeded(6)).numpy()
    on_upper = np.isclose(np.hypot(clean[:, 0], clean[:, 1]), 1) & (clean[:, 1] >= 0)
    on_lower = np.isclose(np.hypot(clean[:, 0] - 1, clean[:, 1] - 0.5), 1) & (clean[:, 1] <= 0.5)
    assert (on_upper | on_lower).all() and 0.4 < on_upper.mean() < 0.6


def test_swiss_roll_matches_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    ours = SwissRoll2D(noise=0.5).sample(4000, seeded(7)).numpy()
    theirs, _ = datasets.make_swiss_roll(4000, noise=0.5, random_state=0)
    for ours_axis, their_axis in ((0, 0), (1, 2)):
        assert stats.ks_2samp(ours[:, ours_axis], theirs[:, their_axis]).pvalue > 0.01
    clean = SwissRoll2D(noise=0.0).sample(500, seeded(8)).double().numpy()
    t = np.hypot(clean[:, 0], clean[:, 1])  # on the spiral the radius equals the angle t
    assert ((t >= 1.5 * np.pi - 1e-4) & (t <= 4.5 * np.pi + 1e-4)).all()
    np.testing.assert_allclose(clean / t[:, None], np.stack([np.cos(t), np.sin(t)], 1), atol=1e-4)


def test_moons_and_roll_have_no_density():
    assert not hasattr(TwoMoons(), "log_prob") and not hasattr(SwissRoll2D(), "log_prob")
    with pytest.raises(ValueError, match="noise"):
        TwoMoons(noise=-0.1)


def test_mode_coverage_hand_made_case():
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.tensor([[0.5, 0.0], [2.9, 0.0], [3.1, 0.0], [10.0, 1.0], [5.0, 5.0]])
    # nearest distances 0.5, 2.9, 3.1, 1.0, 7.07: three within 3 std; modes 0 and 1 captured
    assert mode_coverage(samples, modes, std=1.0) == (2, pytest.approx(3 / 5))
    assert mode_coverage(samples, modes, std=1.0, min_count=2) == (1, pytest.approx(3 / 5))
    assert mode_coverage(samples, modes, std=1.0, k=4.0) == (2, pytest.approx(4 / 5))
    per_mode_std = torch.tensor([0.1, 1.0, 1.0])  # now only [10, 1] is close enough
    assert mode_coverage(samples, modes, std=per_mode_std) == (1, pytest.approx(1 / 5))


def test_mode_coverage_on_ring_samples(device):
    ring = Ring2D()
    x = ring.sample(2500, seeded(9)).to(device)
    captured, share = mode_coverage(x, ring.modes, ring.std)
    assert captured == 8
    # |x - mu| / std ~ chi with 2 degrees of freedom: P(<= 3) = 1 - exp(-4.5) = 0.9889
    p = stats.chi(df=2).cdf(3.0)
    assert share == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 2500))
    collapsed = ring.modes[3] + ring.std * torch.randn(2500, 2, generator=seeded(10))
    assert mode_coverage(collapsed.to(device), ring.modes, ring.std) == (1, pytest.approx(p,
                                                                                     abs=0.01))
    far_off = torch.zeros(2500, 2, device=device)  # the ring's centre: 100 std from every mode
    assert mode_coverage(far_off, ring.modes, ring.std) == (0, 0.0)


def test_mode_coverage_min_count_ignores_stray_samples():
    grid = Grid2D()
    x = torch.cat([grid.modes[:1].expand(2481, 2), grid.modes[1:20]])  # 19 strays on 19 modes
    assert mode_coverage(x, grid.modes, grid.std)[0] == 20
    assert mode_coverage(x, grid.modes, grid.std, min_count=20)[0] == 1


def test_mode_coverage_bad_arguments_raise():
    modes = Ring2D().modes
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        mode_coverage(torch.zeros(10, 3), modes, 0.02)
    with pytest.raises(ValueError, match="at least one sample"):
        mode_coverage(torch.zeros(0, 2), modes, 0.02)
    with pytest.raises(ValueError, match="std > 0"):
        mode_coverage(torch.zeros(10, 2), modes, 0.0)
    with pytest.raises(ValueError, match="min_count >= 1"):
        mode_coverage(torch.zeros(10, 2), modes, 0.02, min_count=0)
