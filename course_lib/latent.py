"""Latent diffusion in miniature (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): Stable Diffusion's idea on Fashion-MNIST.

Stage 1, perceptual compression: a KL-regularised convolutional autoencoder maps an image
x [B, 1, 32, 32] to a spatial latent z [B, 4, 8, 8] (downsampling factor f = 4, 4 channels: 256
numbers for 1,024 pixels). Its encoder gives the mean and log-variance of a diagonal Gaussian
q(z | x); it trains on

    L = mean over pixels of (D(z) - x)^2  +  kl_weight * KL[q(z | x) || N(0, I)] / (C H W),
        z ~ q(z | x)

with a small ``kl_weight`` (Rombach et al.'s "KL-reg"): enough to keep the latent space smooth,
far too little to squeeze it to N(0, I).

Stage 2, the generative model works on the latents. Their spread is whatever the autoencoder
made it, while a diffusion or flow model's noise is N(0, I); so the latents are multiplied by a
scale factor s = 1 / std(z), estimated on training latents, to have unit variance (Stable
Diffusion's ``scaling_factor`` 0.18215 is this for its autoencoder):

    training:  z_0 = s * mean of q(z | x)           (the generative model learns z_0)
    sampling:  z_0 ~ model,  x = D(z_0 / s)          (one decode per image)
"""
from __future__ import annotations

import torch
from torch import nn

from course_lib.vae import kl_divergence, reparameterize

IMAGE_SHAPE = (1, 32, 32)
LATENT_SHAPE = (4, 8, 8)


class LatentAutoencoder(nn.Module):
    """Encoder: 32x32 -> 16x16 -> 8x8 convolutions to the mean and log-variance of z [B, 4, 8, 8];
    decoder: the mirror image with transposed convolutions, tanh to [-1, 1]."""

    image_shape, latent_shape = IMAGE_SHAPE, LATENT_SHAPE

    def __init__(self, width: int = 32, latent_channels: int = LATENT_SHAPE[0]):
        super().__init__()
        if width < 1 or latent_channels < 1:
            raise ValueError(f"width and latent_channels must be positive, got {width}, "
                             f"{latent_channels}")
        self.latent_shape = (latent_channels, *LATENT_SHAPE[1:])
        c = width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),          # 16x16
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 4, stride=2, padding=1), nn.SiLU(),      # 8x8
            nn.Conv2d(4 * c, 2 * latent_channels, 3, padding=1))             # mean | log-variance
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 4 * c, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, stride=2, padding=1), nn.SiLU(),  # 16x16
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.SiLU(),      # 32x32
            nn.Conv2d(c, 1, 3, padding=1), nn.Tanh())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z | x), each [B, *latent_shape], for x in [-1, 1]."""
        check_shape(x, self.image_shape, "images")
        if x.min() < -1 or x.max() > 1:
            raise ValueError(f"expected images in [-1, 1], got values in [{x.min():.3g}, "
                             f"{x.max():.3g}]; map [0, 1] images with x * 2 - 1")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [B, 1, 32, 32] in [-1, 1] from latents z [B, *latent_shape] (unscaled)."""
        check_shape(z, self.latent_shape, "latents")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction from a sampled z, mean, log-variance)."""
        mean, logvar = self.encode(x)
        return self.decode(reparameterize(mean, logvar, generator)), mean, logvar


def check_shape(x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected {what} [B, {', '.join(map(str, shape))}], got "
                         f"{tuple(x.shape)}")


def autoencoder_loss(x_hat: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                     logvar: torch.Tensor, kl_weight: float) -> dict[str, torch.Tensor]:
    """Stage 1's loss: the squared error per pixel plus ``kl_weight`` times the KL of q(z | x)
    from N(0, I) per latent number (the KL of the whole latent divided by its C*H*W numbers),
    both averaged over the batch."""
    reconstruction = (x_hat - x).pow(2).mean()
    kl = kl_divergence(mean.flatten(1), logvar.flatten(1)).mean() / mean[0].numel()
    return {"loss": reconstruction + kl_weight * kl, "reconstruction": reconstruction, "kl": kl}


def scale_factor(latents: torch.Tensor) -> float:
    """s = 1 / std(z) over every number of a batch of latents: s * z has unit variance."""
    if latents.ndim < 2 or latents.numel() < 2:
        raise ValueError(f"need a batch of latents [B, ...], got {tuple(latents.shape)}")
    return 1.0 / latents.double().std().item()


def decode_latents(autoencoder: LatentAutoencoder, z0: torch.Tensor, s: float) -> torch.Tensor:
    """Images from the generative model's scaled latents: x = D(z_0 / s)."""
    return autoencoder.decode(z0 / s)
