"""Variational autoencoders (Kingma & Welling 2014; Foster, *Generative Deep Learning*, ch. 3).

The encoder predicts a mean mu and a log-variance log(sigma^2) per image; a latent is sampled
with the reparameterization trick and decoded. The loss is

    loss = recon_weight * reconstruction(x_hat, x) + beta * KL[N(mu, sigma) || N(0, I)]

with KL = -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2) per image. Foster weights a
per-pixel-mean reconstruction loss by 500 (Fashion-MNIST, BCE) or 2000 (faces, MSE) against a
KL summed over latent dimensions; ``recon_weight`` makes that trade-off explicit.

The shipped checkpoints' recipes, trainer and loader are in :mod:`course_lib.experiments.vae`.
"""
from __future__ import annotations

import torch
from torch import nn

from course_lib.checks import check_count

from course_lib.autoencoder import (check_images, check_latents, conv_decoder,
                                    conv_encoder_body, reconstruction_loss)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) and sigma = exp(logvar / 2).

    eps is drawn outside the graph, so gradients flow to mu and logvar (the trick of
    Kingma & Welling 2014, Sec. 2.4)."""
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the "
                         f"same shape")
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL[N(mu, sigma^2) || N(0, I)] per sample [N], summed over latent dimensions:
    -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2)."""
    if mu.shape != logvar.shape or mu.ndim != 2:
        raise ValueError(f"mu and logvar must both be [N, latent_dim], got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             recon_weight: float, beta: float = 1.0, recon: str = "bce"
             ) -> dict[str, torch.Tensor]:
    """Batch means of ``recon_weight * reconstruction + beta * KL`` and of its two terms."""
    reconstruction = reconstruction_loss(x_hat, x, recon).mean()
    kl = kl_divergence(mu, logvar).mean()
    return {"loss": recon_weight * reconstruction + beta * kl,
            "reconstruction": reconstruction, "kl": kl}


class VAE(nn.Module):
    """The lecture's autoencoder with two heads, mu and logvar, on the 2048-D encoder body."""

    image_shape = (1, 32, 32)

    def __init__(self, latent_dim: int = 2):
        super().__init__()
        self.latent_dim = latent_dim
        self.body = conv_encoder_body()
        self.mu = nn.Linear(2048, latent_dim)
        self.logvar = nn.Linear(2048, latent_dim)
        self.decoder = conv_decoder(latent_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(x, self.image_shape)
        h = self.body(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        check_latents(z, self.latent_dim)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar, generator)), mu, logvar

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode n latents drawn from the prior N(0, I)."""
        check_count(n)
        device = next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, generator=generator).to(device))


def down(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.2)]


def up(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]


class FacesVAE(VAE):
    """The lecture's faces network: 32x32x3, four Conv 128 s2 + BatchNorm + LeakyReLU blocks down
    to 2x2x128, a 200-D latent, and the mirror image up (spec section 3's table)."""

    image_shape = (3, 32, 32)

    def __init__(self, latent_dim: int = 200, width: int = 128):
        nn.Module.__init__(self)
        self.latent_dim = latent_dim
        self.body = nn.Sequential(*down(3, width), *down(width, width), *down(width, width),
                                  *down(width, width), nn.Flatten())            # [N, 4 * width]
        self.mu = nn.Linear(4 * width, latent_dim)
        self.logvar = nn.Linear(4 * width, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 4 * width), nn.BatchNorm1d(4 * width), nn.LeakyReLU(0.2),
            nn.Unflatten(1, (width, 2, 2)),                                      # 2x2x128
            *up(width, width), *up(width, width), *up(width, width), *up(width, width),
            nn.ConvTranspose2d(width, 3, 3, padding=1), nn.Sigmoid(),            # 32x32x3
        )


def attribute_vector(z: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Mean latent of the images with an attribute minus the mean of those without (Foster's
    latent arithmetic: add it to a latent to add the attribute, subtract it to remove it)."""
    has = has.bool()
    if has.shape != z.shape[:1] or has.all() or not has.any():
        raise ValueError(f"`has` must be a boolean [N] mask, N = {len(z)}, with images on both "
                         f"sides; got shape {tuple(has.shape)} with {int(has.sum())} True")
    return z[has].mean(0) - z[~has].mean(0)
