"""Toy distributions for the GAN and diffusion demos, and the mode-coverage metric.

Every distribution has ``name``, ``sample(n, generator=None) -> Tensor[n, d]`` (float32, on the
CPU; pass a seeded ``torch.Generator`` for repeatable draws) and, where a density exists,
``log_prob(x) -> Tensor[n]`` computed with ``torch.distributions`` on the device of ``x``.
The Gaussian mixtures also have ``modes`` (Tensor[k, d]) and ``stds`` (Tensor[k]).

- :class:`D2LGaussian`: the 2-D Gaussian of d2l's ``gan`` notebook.
- :class:`GaussianMixture1D`: a 1-D data density for a Goodfellow et al. (2014) Fig. 1 demo.
- :class:`Ring2D`, :class:`Grid2D`: the mode-collapse benchmarks of Metz et al. (2017,
  Unrolled GANs) and Srivastava et al. (2017, VEEGAN).
- :class:`TwoMoons`, :class:`SwissRoll2D`: curved 2-D manifolds (scikit-learn's ``make_moons``
  and ``make_swiss_roll``) for diffusion demos; their noise-free law lives on a curve, so they
  have no density and no ``log_prob``.
- :func:`mode_coverage`: modes captured and share of high-quality samples (VEEGAN, Sec. 5.1).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.distributions import (Categorical, Independent, MixtureSameFamily,
                                 MultivariateNormal, Normal)

from course_lib.checks import check_count


def _check_points(x: torch.Tensor, dim: int, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects a tensor of points with shape [n, {dim}], got {got}; "
                         f"reshape a single point with x.reshape(1, {dim}).")


def _checked_noise(noise: float) -> float:
    if noise < 0:
        raise ValueError(f"noise (a standard deviation) must be >= 0, got {noise}")
    return noise


class D2LGaussian:
    """d2l ``gan``: X = Z A + b with Z ~ N(0, I_2), so X ~ N(b, A^T A).

    A = [[1, 2], [-0.1, 0.5]], b = [1, 2] (Dive into Deep Learning, Sec. 20.1, "Generate Some
    'Real' Data"). The rows of Z multiply A from the left, hence Cov[X] = A^T Cov[Z] A = A^T A.
    """

    name = "d2l Gaussian N(b, A^T A)"

    def __init__(self) -> None:
        self.A = torch.tensor([[1.0, 2.0], [-0.1, 0.5]])
        self.b = torch.tensor([1.0, 2.0])
        self.mean = self.b
        self.covariance = self.A.T @ self.A

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        check_count(n)
        z = torch.randn(n, 2, generator=generator)
        return z @ self.A + self.b

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x, 2, "D2LGaussian.log_prob")
        dist = MultivariateNormal(self.mean.to(x.device), self.covariance.to(x.device))
        return dist.log_prob(x)


class GaussianMixture:
    """Mixture of isotropic Gaussians p(x) = sum_k w_k N(x; mu_k, sigma_k^2 I).

    ``means`` is [k, d]; ``stds`` and ``weights`` have k entries (``weights`` are relative:
    they are divided by their sum; ``None`` means equal weights).
    """

    def __init__(self, means: torch.Tensor | Sequence, stds: torch.Tensor | Sequence | float,
                 weights: torch.Tensor | Sequence | None = None, name: str = "") -> None:
        means = torch.as_tensor(means, dtype=torch.float32)
        if means.ndim != 2 or len(means) == 0:
            raise ValueError(f"means must have shape [k, d] with k >= 1, got {tuple(means.shape)}")
        k = len(means)
        stds = torch.as_tensor(stds, dtype=torch.float32)
        stds = stds.expand(k).clone() if stds.ndim == 0 else stds
        weights = torch.ones(k) if weights is None else torch.as_tensor(weights,
                                                                         dtype=torch.float32)
        if stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(f"stds and weights need one entry per mode ({k}), got shapes "
                             f"{tuple(stds.shape)} and {tuple(weights.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError(f"stds must all be > 0, got {stds.tolist()}")
        if not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.modes = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.name = name or f"mixture of {k} Gaussians in {means.shape[1]}-D"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling: a component k ~ Categorical(w), then x ~ N(mu_k, sigma_k^2 I)."""
        check_count(n)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.modes.shape[1], generator=generator)
        return self.modes[k] + self.stds[k, None] * noise

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        _check_points(x, self.modes.shape[1], f"{type(self).__name__}.log_prob")
        components = Independent(Normal(self.modes.to(x.device),
                                        self.stds.to(x.device)[:, None].expand_as(self.modes)), 1)
        mixture = MixtureSameFamily(Categorical(probs=self.weights.to(x.device)), components)
        return mixture.log_prob(x)


class GaussianMixture1D(GaussianMixture):
    """1-D mixture; the default is a bimodal p_data for a demo in the style of Goodfellow et al.
    (2014) Fig. 1 (data density, generator density and discriminator curve on one axis)."""

    def __init__(self, means: Sequence[float] = (-2.0, 2.0), stds: Sequence[float] = (0.5, 0.5),
                 weights: Sequence[float] = (0.5, 0.5)) -> None:
        if not (len(means) == len(stds) == len(weights)):
            raise ValueError(f"means, stds and weights need one entry per mode, got lengths "
                             f"{len(means)}, {len(stds)}, {len(weights)}")
        super().__init__(torch.as_tensor(means, dtype=torch.float32)[:, None], stds, weights,
                         name=f"1-D mixture of {len(means)} Gaussians")

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """p(x) at every entry of ``x`` (any shape, e.g. a ``torch.linspace`` grid to plot)."""
        return self.log_prob(x.reshape(-1, 1)).exp().reshape(x.shape)


class Ring2D(GaussianMixture):
    """``n_modes`` Gaussians evenly spaced on a circle (Metz et al. 2017: 8 modes, radius 2,
    std 0.02)."""

    def __init__(self, n_modes: int = 8, radius: float = 2.0, std: float = 0.02) -> None:
        angles = 2 * math.pi * torch.arange(n_modes) / n_modes
        modes = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # [n_modes, 2]
        super().__init__(modes, std, name=f"ring of {n_modes} Gaussians")
        self.std = std


class Grid2D(GaussianMixture):
    """``side`` x ``side`` Gaussians on a grid ``spacing`` apart, centred at the origin
    (Srivastava et al. 2017, VEEGAN: 5 x 5 at -4, -2, 0, 2, 4 with std 0.05)."""

    def __init__(self, side: int = 5, spacing: float = 2.0, std: float = 0.05) -> None:
        ticks = spacing * (torch.arange(side) - (side - 1) / 2)
        modes = torch.cartesian_prod(ticks, ticks)  # [side * side, 2]
        super().__init__(modes, std, name=f"{side}x{side} grid of Gaussians")
        self.std = std


class TwoMoons:
    """Two interleaving half circles, as scikit-learn's ``make_moons``, with t ~ U[0, pi].

    Upper moon (cos t, sin t), lower moon (1 - cos t, 1/2 - sin t), each drawn with probability
    1/2, plus N(0, noise^2 I). No ``log_prob``: the noise-free law lives on curves.
    """

    name = "two moons"

    def __init__(self, noise: float = 0.05) -> None:
        self.noise = _checked_noise(noise)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        check_count(n)
        t = math.pi * torch.rand(n, generator=generator)
        lower = torch.rand(n, generator=generator) < 0.5
        upper_moon = torch.stack([t.cos(), t.sin()], dim=1)
        lower_moon = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
        x = torch.where(lower[:, None], lower_moon, upper_moon)
        return x + self.noise * torch.randn(n, 2, generator=generator)


class SwissRoll2D:
    """The 2-D Swiss roll of scikit-learn's ``make_swiss_roll`` (its x and z coordinates).

    t ~ U[1.5 pi, 4.5 pi], x = (t cos t, t sin t) + N(0, noise^2 I); values span about
    [-10, 13], so normalise before diffusion. No ``log_prob``: the noise-free law is a spiral.
    """

    name = "Swiss roll"

    def __init__(self, noise: float = 0.5) -> None:
        self.noise = _checked_noise(noise)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        check_count(n)
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        x = torch.stack([t * t.cos(), t * t.sin()], dim=1)
        return x + self.noise * torch.randn(n, 2, generator=generator)


def mode_coverage(samples: torch.Tensor, modes: torch.Tensor, std: float | torch.Tensor,
                  k: float = 3.0, min_count: int = 1) -> tuple[int, float]:
    """Modes captured and share of high-quality samples (Srivastava et al. 2017, VEEGAN, Sec. 5.1).

    A sample is *high quality* if it lies within ``k`` standard deviations (Euclidean distance)
    of its nearest mode; a mode is *captured* if it is the nearest mode of at least
    ``min_count`` high-quality samples. VEEGAN and PacGAN (Lin et al. 2018) use k = 3 and
    ``min_count = 1`` on 2,500 samples; a larger ``min_count`` ignores modes hit by a few
    stray samples. ``std`` is one float or one value per mode.

    Returns ``(modes_captured, high_quality_share)``.
    """
    if not isinstance(modes, torch.Tensor) or modes.ndim != 2:
        raise ValueError(f"modes must be a tensor [k, d], got {getattr(modes, 'shape', modes)!r}")
    _check_points(samples, modes.shape[1], "mode_coverage")
    if len(samples) == 0:
        raise ValueError("mode_coverage needs at least one sample, got an empty tensor")
    std = torch.as_tensor(std, dtype=torch.float32, device=samples.device).expand(len(modes))
    if not bool((std > 0).all()) or k <= 0 or min_count < 1:
        raise ValueError(f"need std > 0, k > 0 and min_count >= 1; got std={std.tolist()}, "
                         f"k={k}, min_count={min_count}")
    distances = torch.cdist(samples.float(), modes.to(samples.device).float())  # [n, k]
    nearest_distance, nearest = distances.min(dim=1)
    high_quality = nearest_distance <= k * std[nearest]
    counts = torch.bincount(nearest[high_quality], minlength=len(modes))
    return int((counts >= min_count).sum()), float(high_quality.float().mean())
