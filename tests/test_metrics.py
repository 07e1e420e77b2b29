import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from course_lib import metrics
from course_lib.metrics import (ClassifierFeatures, InceptionFeatures, fid, fid_bias_fit,
                                fid_floor, fid_from_features, floor_images, frechet_distance,
                                gaussian_stats)


def random_spd(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T + (0 if rank else 1e-3 * np.eye(d))


def reference_fd(mu1, s1, mu2, s2):
    """The pytorch-fid formula: scipy's sqrtm of the (non-symmetric) product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_matches_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d in (1, 2, 7, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_fd(mu1, s1, mu2, s2),
                                                                   rel=1e-6, abs=1e-8)


def test_closed_forms():
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 per dimension, plus the mean term.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_identity_symmetry_and_translation():
    rng = np.random.default_rng(1)
    mu, s, s2 = rng.standard_normal(5), random_spd(5, rng), random_spd(5, rng)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu, s, mu, s2) == pytest.approx(frechet_distance(mu, s2, mu, s))
    shift = np.full(5, 0.5)
    assert frechet_distance(mu + shift, s, mu, s2) - frechet_distance(mu, s, mu, s2) \
        == pytest.approx(5 * 0.25)


def test_rank_deficient_covariances_stay_finite_and_exact():
    """Fewer samples than dimensions: singular covariances, where sqrtm of the product is
    ill-conditioned. The symmetric route still agrees with the exact answer."""
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(20, rng, rank=5), random_spd(20, rng, rank=5)
    value = frechet_distance(np.zeros(20), s1, np.zeros(20), s2)
    assert np.isfinite(value) and value >= 0
    # Exact: Tr((S1 S2)^1/2) = sum of singular values of S1^1/2 S2^1/2.
    root = lambda m: scipy.linalg.sqrtm(m).real  # noqa: E731
    nuclear = np.linalg.svd(root(s1) @ root(s2), compute_uv=False).sum()
    assert value == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * nuclear, rel=1e-6)
    assert frechet_distance(np.zeros(20), s1, np.zeros(20), s1) < 1e-6 * np.trace(s1)


def test_torch_inputs_and_bad_input():
    mu, s = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, s, mu + 1, s) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="same size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="3x3 covariance"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.array([np.nan, 0, 0]), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


def test_gaussian_stats_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).standard_normal((50, 4))
    mu, sigma = gaussian_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1), rtol=1e-5)
    assert gaussian_stats(x[:, :1])[1].shape == (1, 1)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])


def test_fid_from_features_sees_a_mean_shift():
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    assert fid_from_features(x, x) == pytest.approx(0, abs=1e-9)
    assert fid_from_features(x + torch.tensor([1.0, 0, 0]), x) == pytest.approx(1.0)


class Flatten(nn.Module):
    feature_dim = 784

    def features(self, x):
        return x.flatten(1)


def test_classifier_features_batches_crops_and_checks(device):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(25, 1, 28, 28, generator=g)
    extractor = ClassifierFeatures(Flatten(), device=device, batch_size=10)
    torch.testing.assert_close(extractor(images), images.flatten(1))
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    torch.testing.assert_close(extractor(padded), images.flatten(1))
    assert fid(images, images, extractor) < 1e-6 * 784
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        extractor(images * 2 - 1)
    with pytest.raises(ValueError, match="C in"):
        extractor(torch.rand(2, 3, 28, 28))


def test_course_classifier_features_separate_real_from_noisy():
    from course_lib.data import load_fashion_mnist

    x, _ = load_fashion_mnist("test")
    features = ClassifierFeatures()
    assert features.dim == 128
    floor = fid(x[:2000], x[2000:4000], features)
    noisy = (x[:2000] + 0.2 * torch.randn(x[:2000].shape,
                                          generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert fid(noisy, x[2000:4000], features) > 10 * floor


def test_fid_floor_is_n_random_training_images_against_the_test_features():
    from course_lib.data import load_fashion_mnist

    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    features = ClassifierFeatures()
    test_features = features(x_test[:3000])
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(5))[:500]
    expected = fid_from_features(features(x_train[order]), test_features)
    assert fid_floor(features, x_train, test_features, 500, seed=5) == pytest.approx(expected)
    # fewer samples, a higher floor (the bias of FID at small n)
    assert fid_floor(features, x_train, test_features, 200) > fid_floor(features, x_train,
                                                                         test_features, 2000)
    with pytest.raises(ValueError, match="2 <= n"):
        fid_floor(features, x_train, test_features, 1)


def test_floor_images_are_the_ones_fid_floor_draws():
    images = torch.arange(50.0).reshape(50, 1, 1, 1)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:7]
    torch.testing.assert_close(floor_images(images, 7, seed=3), images[order])
    with pytest.raises(ValueError, match="2 <= n <= 50"):
        floor_images(images, 51)


def test_fid_bias_fit_recovers_the_line_in_one_over_n():
    n = np.array([500, 1000, 2000, 5000, 10_000])
    fid_inf, k = fid_bias_fit(n, 3.0 + 250.0 / n)
    assert fid_inf == pytest.approx(3.0) and k == pytest.approx(250.0)
    # least squares, not interpolation: noise around the line averages out
    fid_inf, k = fid_bias_fit(np.repeat(n, 2), np.repeat(3.0 + 250.0 / n, 2)
                              + np.tile([0.01, -0.01], 5))
    assert fid_inf == pytest.approx(3.0) and k == pytest.approx(250.0)
    with pytest.raises(ValueError, match="two or more different"):
        fid_bias_fit([1000, 1000], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fid_bias_fit([0, 1000], [1.0, 2.0])


def test_the_floor_falls_like_one_over_n():
    """Samples of one Gaussian against 10,000 of its points: FID's bias is about k / n, so the
    extrapolated FID_inf is near 0 (a few % of the floor at n = 250) and the line fits."""
    g = torch.Generator().manual_seed(0)
    population = torch.randn(40_000, 8, generator=g)
    ns = [250, 500, 1000, 2000, 4000]
    fids = [np.mean([fid_from_features(population[torch.randperm(40_000, generator=g)[:n]],
                                       population[:10_000]) for _ in range(5)]) for n in ns]
    assert all(a > b for a, b in zip(fids, fids[1:]))
    fid_inf, k = fid_bias_fit(ns, fids)
    assert abs(fid_inf) < 0.05 * fids[0] and k > 0
    np.testing.assert_allclose(fid_inf + k / np.array(ns), fids, atol=0.1 * fids[0])


def test_inception_weights_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not metrics.inception_available()
    with pytest.raises(FileNotFoundError, match="inception_v3_google-0cc3c7bd.pth"):
        InceptionFeatures()


def test_inception_path_gives_2048_pool3_features(tmp_path, monkeypatch):
    """Offline, a randomly initialised Inception-v3 stands in for the real weights: the loading,
    resizing and pooling code is the one that runs with them."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILE
    path.parent.mkdir(parents=True)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("COURSE_INCEPTION_WEIGHTS", raising=False)
    assert metrics.inception_available()
    extractor = InceptionFeatures(batch_size=2)
    feats = extractor(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert feats.shape == (3, 2048) and (feats >= 0).all()  # pooled ReLU activations
