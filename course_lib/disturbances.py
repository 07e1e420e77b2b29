"""The image disturbances of Heusel et al. 2017, Fig. 3 (and their Appendix A.1), under which FID
must rise monotonically. Images are [N, C, H, W] in [0, 1]; ``level`` follows the paper's scale:

- ``gaussian_noise``: (1 - alpha) X + alpha N, N Gaussian noise rescaled to the image range;
- ``gaussian_blur``: Gaussian filter of standard deviation ``level`` pixels;
- ``black_rectangles``: five black rectangles of side ``level`` x image side at random places;
- ``swirl``: scikit-image's swirl of strength ``level`` over the whole image;
- ``salt_and_pepper``: a fraction ``level`` of the pixels set to 0 or 1;
- ``contamination``: a fraction ``level`` of the images replaced by images of another data set.

The image operations are scikit-image's; this module only applies them with the paper's levels.
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.filters import gaussian
from skimage.transform import swirl as skimage_swirl
from skimage.util import random_noise

LEVELS = {
    "gaussian_noise": (0, 0.25, 0.5, 0.75),
    "gaussian_blur": (0, 1, 2, 4),
    "black_rectangles": (0, 0.25, 0.5, 0.75),
    "swirl": (0, 1, 2, 4),
    "salt_and_pepper": (0, 0.1, 0.2, 0.3),
    "contamination": (0, 0.25, 0.5, 0.75),
}


def _per_image(images: torch.Tensor, fn) -> torch.Tensor:
    """Apply a NumPy function [H, W, C] -> [H, W, C] to every image."""
    arrays = images.permute(0, 2, 3, 1).cpu().double().numpy()  # [N, H, W, C]
    out = np.stack([fn(a) for a in arrays])
    return torch.from_numpy(out).float().permute(0, 3, 1, 2).clamp(0, 1)


def gaussian_noise(images: torch.Tensor, alpha: float, rng: np.random.Generator) -> torch.Tensor:
    noise = torch.from_numpy(rng.standard_normal(images.shape)).float()
    lo = noise.amin(dim=(1, 2, 3), keepdim=True)
    hi = noise.amax(dim=(1, 2, 3), keepdim=True)
    return (1 - alpha) * images + alpha * (noise - lo) / (hi - lo)


def gaussian_blur(images: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    if sigma == 0:
        return images.clone()
    return _per_image(images, lambda a: gaussian(a, sigma=sigma, channel_axis=-1))


def black_rectangles(images: torch.Tensor, alpha: float, rng: np.random.Generator,
                     count: int = 5) -> torch.Tensor:
    out = images.clone()
    h, w = images.shape[-2:]
    rh, rw = int(round(alpha * h)), int(round(alpha * w))
    if rh == 0 or rw == 0:
        return out
    tops = rng.integers(0, h - rh + 1, size=(len(images), count))
    lefts = rng.integers(0, w - rw + 1, size=(len(images), count))
    for i in range(len(images)):
        for top, left in zip(tops[i], lefts[i]):
            out[i, :, top:top + rh, left:left + rw] = 0
    return out


def swirl(images: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    radius = max(images.shape[-2:])
    return _per_image(images, lambda a: skimage_swirl(a, strength=strength, radius=radius))


def salt_and_pepper(images: torch.Tensor, amount: float, rng: np.random.Generator
                    ) -> torch.Tensor:
    if amount == 0:
        return images.clone()
    noisy = random_noise(images.cpu().double().numpy(), mode="s&p", amount=amount,
                         rng=int(rng.integers(2**31)))
    return torch.from_numpy(noisy).float()


def contamination(images: torch.Tensor, fraction: float, rng: np.random.Generator,
                  other: torch.Tensor) -> torch.Tensor:
    """Replace a random ``fraction`` of ``images`` by images drawn from ``other``."""
    if other.shape[1:] != images.shape[1:]:
        raise ValueError(f"contaminating images must have the shape {tuple(images.shape[1:])}, "
                         f"got {tuple(other.shape[1:])}")
    out = images.clone()
    k = int(round(fraction * len(images)))
    targets = rng.choice(len(images), size=k, replace=False)
    sources = rng.choice(len(other), size=k, replace=len(other) < k)
    out[targets] = other[sources]
    return out


DISTURBANCES = {"gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur,
                "black_rectangles": black_rectangles, "swirl": swirl,
                "salt_and_pepper": salt_and_pepper, "contamination": contamination}


def disturb(images: torch.Tensor, kind: str, level: float, seed: int = 0,
            other: torch.Tensor | None = None) -> torch.Tensor:
    """``images`` under disturbance ``kind`` at ``level`` (see :data:`LEVELS`), reproducibly."""
    if kind not in DISTURBANCES:
        raise ValueError(f"kind must be one of {sorted(DISTURBANCES)}, got {kind!r}")
    if images.ndim != 4 or images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must be [N, C, H, W] in [0, 1], got shape "
                         f"{tuple(images.shape)}")
    rng = np.random.default_rng(seed)
    if kind == "contamination":
        if other is None:
            raise ValueError("contamination needs `other`, the images of another data set")
        return contamination(images, level, rng, other)
    return DISTURBANCES[kind](images, level, rng)
