"""Fréchet Inception Distance (Heusel et al. 2017) and the feature spaces it is computed in.

FID fits a Gaussian to the features of each image set and measures the Fréchet (2-Wasserstein)
distance between the two Gaussians::

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

The features are Inception-v3's pool3 activations (2048-D; the lecture slide's "2000" is a slip)
when its weights are present, otherwise the course classifier's pooled 128-D activations
(:mod:`course_lib.classifier`). FIDs are comparable only within one feature space.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import nn

from course_lib.classifier import load_classifier

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 weights
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"


def _as_float64(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    eigvals, eigvecs = np.linalg.eigh(a)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel 2017, eq. 6).

    Tr((Sigma_1 Sigma_2)^(1/2)) is computed as Tr((S Sigma_2 S)^(1/2)) with S = Sigma_1^(1/2):
    both matrices have the same eigenvalues, and the second is symmetric positive semi-definite,
    so its square root is real and stable even when the covariances are singular (fewer samples
    than dimensions). The usual route, ``scipy.linalg.sqrtm(Sigma_1 @ Sigma_2)``, works on a
    non-symmetric product and returns small imaginary parts that must be discarded.
    """
    mu1, mu2 = _as_float64(mu1), _as_float64(mu2)
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same size D, got shapes {mu1.shape} "
                         f"and {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must be a {d}x{d} covariance matrix, got {sigma.shape}")
        if not np.allclose(sigma, sigma.T, atol=1e-8 * max(1.0, np.abs(sigma).max())):
            raise ValueError(f"{name} is not symmetric: pass a covariance matrix")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("means and covariances must be finite (NaN or inf found): check the "
                         "features, e.g. images with NaN pixels")
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))  # d^2 >= 0; a singular Sigma can leave -1e-8 of rounding


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}")
    if features.shape[0] <= features.shape[1]:
        warnings.warn(f"{features.shape[0]} samples of {features.shape[1]}-D features: the "
                      f"covariance is singular and FID strongly biased (Heusel et al. use "
                      f"10,000 samples; notebook 08 shows the bias)", stacklevel=3)
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def fid_from_features(features_a, features_b) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def fid_floor(features: "FeatureExtractor", train_images: torch.Tensor, test_features: torch.Tensor,
              n: int, seed: int = 0) -> float:
    """The course's FID floor at n samples: n random training images (drawn with ``seed``)
    against the test set's features, the score of a model that reproduced its training data.
    The course reports every FID as n samples against the whole test set, beside this floor at
    the same n (notebook 08)."""
    return fid_from_features(features(floor_images(train_images, n, seed)), test_features)


def floor_images(train_images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The n training images :func:`fid_floor` draws with ``seed`` (to disturb them, say, so
    that level 0 of an experiment is exactly the floor)."""
    if not 2 <= n <= len(train_images):
        raise ValueError(f"fid_floor needs 2 <= n <= {len(train_images)} training images, "
                         f"got n={n}")
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    return train_images[order]


def fid_bias_fit(sample_counts, fids) -> tuple[float, float]:
    """(FID_inf, k) of the least-squares line FID_n = FID_inf + k / n through FIDs measured at
    several sample counts n: FID's bias falls as 1/n (Chong & Forsyth 2020, "Effectively
    Unbiased FID"), and FID_inf is the value extrapolated to infinitely many samples."""
    n, values = _as_float64(sample_counts), _as_float64(fids)
    if n.ndim != 1 or n.shape != values.shape or len(n) < 2 or len(np.unique(n)) < 2:
        raise ValueError(f"need FIDs at two or more different sample counts, got counts "
                         f"{n.tolist()} and {values.size} FIDs")
    if (n <= 0).any():
        raise ValueError(f"sample counts must be positive, got {n.tolist()}")
    k, fid_inf = np.polyfit(1.0 / n, values, 1)
    return float(fid_inf), float(k)


class FeatureExtractor(ABC):
    """Maps images [N, C, H, W] in [0, 1] to features [N, dim], batch by batch, without grad.

    The network runs in channels-last memory format (about twice as fast for convolutions on a
    CPU). The features of the last few image sets are kept, keyed by the images' content, so the
    test set that every FID of a notebook compares against is embedded once."""

    name: str
    dim: int
    channels: tuple[int, ...]
    cache_size = 4

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu",
                 batch_size: int = 500):
        self.device, self.batch_size = torch.device(device), batch_size
        self.network = network.to(self.device).eval().to(memory_format=torch.channels_last)
        self._cache: dict[tuple, torch.Tensor] = {}

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, dim] of one batch of checked images on the extractor's device."""

    def check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] not in self.channels:
            raise ValueError(f"{self.name} take images [N, C, H, W] with C in "
                             f"{self.channels}, got {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError(f"{self.name} need at least one image, got an empty batch")
        if not images.is_floating_point() or not torch.isfinite(images).all():
            raise ValueError(f"{self.name} take finite float images in [0, 1]; got "
                             f"dtype {images.dtype}" + (" with NaN or inf values"
                                                         if images.is_floating_point() else ""))
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{self.name} take float images in [0, 1]; got dtype "
                             f"{images.dtype}, range [{images.min().item():.3g}, "
                             f"{images.max().item():.3g}]. Map [-1, 1] images with (x + 1) / 2.")

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.check(images)
        images = images.float()  # the networks' weights are float32
        data = images.detach().cpu().contiguous().numpy()
        digest = hashlib.blake2b(data.tobytes(), digest_size=16).digest()
        key = (data.shape, str(data.dtype), digest)
        if key not in self._cache:
            chunks = [self.embed(images[i:i + self.batch_size].to(self.device)
                                 .contiguous(memory_format=torch.channels_last)).float().cpu()
                      for i in range(0, len(images), self.batch_size)]
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = torch.cat(chunks)
        return self._cache[key].clone()


class ClassifierFeatures(FeatureExtractor):
    """Penultimate activations of a classifier with a ``features(x)`` method; by default the
    course's Fashion-MNIST classifier (28x28 or padded 32x32 grey-scale images)."""

    channels = (1,)

    def __init__(self, classifier: nn.Module | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 100):
        classifier = classifier if classifier is not None else load_classifier()
        super().__init__(classifier, device, batch_size)
        self.name = f"{type(classifier).__name__} features"
        self.dim = getattr(classifier, "feature_dim", None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 32:
            x = x[..., 2:30, 2:30]  # the lecture's padded images: drop the 2-pixel border
        return self.network.features(x)


def find_inception_weights(path: str | Path | None = None) -> Path | None:
    """``path``, ``$COURSE_INCEPTION_WEIGHTS`` or torch hub's cache, whichever exists first."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    for candidate in (path, os.environ.get("COURSE_INCEPTION_WEIGHTS"),
                      torch_home / "hub" / "checkpoints" / INCEPTION_FILE):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def inception_available() -> bool:
    return find_inception_weights() is not None


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features, 2048-D (Heusel 2017; torchvision's ImageNet weights).

    Images in [0, 1], grey-scale or RGB, are resized to 299x299 and mapped to [-1, 1], the input
    range of Google's original weights (torchvision's ``transform_input=True`` does the same
    from ImageNet-normalised input). The weights are read from a local file, never downloaded.
    """

    name, dim, channels = "Inception-v3 pool3", 2048, (1, 3)

    def __init__(self, weights_path: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 50):
        from torchvision.models import inception_v3

        path = find_inception_weights(weights_path)
        if path is None:
            torch_home = os.environ.get("TORCH_HOME", "~/.cache/torch")
            raise FileNotFoundError(
                f"Inception-v3 weights not found (looked at weights_path={weights_path!r}, "
                f"$COURSE_INCEPTION_WEIGHTS and {torch_home}/hub/checkpoints/{INCEPTION_FILE}). "
                f"On a machine with internet, download {INCEPTION_URL} (or run `python -c "
                f"\"import torchvision; torchvision.models.inception_v3(weights='IMAGENET1K_V1')\"`"
                f", which puts it in that cache) and copy the file there or point "
                f"COURSE_INCEPTION_WEIGHTS at it. Without it, use ClassifierFeatures().")
        network = inception_v3(weights=None, aux_logits=True, init_weights=False)
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        network.fc = nn.Identity()  # the 2048-D average-pooled activations are the output
        super().__init__(network, device, batch_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)  # grey-scale -> RGB (a view for C = 1, a no-op for C = 3)
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.network(x * 2 - 1)


def fid(images_a: torch.Tensor, images_b: torch.Tensor, features: FeatureExtractor) -> float:
    """FID between two image sets [N, C, H, W] in [0, 1] in the given feature space."""
    return fid_from_features(features(images_a), features(images_b))
