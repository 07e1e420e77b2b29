"""Generative adversarial networks (Goodfellow et al. 2014) and DCGAN (Radford et al. 2016).

D is a binary classifier of real (label 1) against generated (label 0) images; G maps
z ~ N(0, I) to images. Every loss is written from D's *logits* l (D(x) = sigmoid(l)) with
softplus, so it stays finite when D is confident:

    -log D(x)       = softplus(-l)          -log(1 - D(x)) = softplus(l)

- discriminator: the mean of the two binary cross-entropies, real -> 1 and fake -> 0 (d2l's
  ``update_D`` halves their sum the same way);
- saturating generator loss (Goodfellow's minimax): G minimizes log(1 - D(G(z))) = -softplus(l),
  whose gradient sigmoid(l) vanishes when D rejects the fakes (l -> -inf);
- non-saturating generator loss (Goodfellow's fix): G minimizes -log D(G(z)) = softplus(-l).

``python -m course_lib.gan`` trains the DCGAN checkpoint on Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.runtime import CHECKPOINT_DIR, get_device, seed_everything


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """(BCE(D(x), 1) + BCE(D(G(z)), 0)) / 2 = (softplus(-l_real) + softplus(l_fake)) / 2."""
    return (_reduce(F.softplus(-real_logits), reduction)
            + _reduce(F.softplus(fake_logits), reduction)) / 2


def generator_loss(fake_logits: torch.Tensor, saturating: bool = False,
                   reduction: str = "mean") -> torch.Tensor:
    """Non-saturating -log D(G(z)) = softplus(-l) (default), or the saturating
    log(1 - D(G(z))) = -softplus(l) of the original minimax game."""
    values = -F.softplus(fake_logits) if saturating else F.softplus(-fake_logits)
    return _reduce(values, reduction)


def update_D(x: torch.Tensor, z: torch.Tensor, net_D: nn.Module, net_G: nn.Module,
             opt_D: torch.optim.Optimizer, reduction: str = "mean") -> torch.Tensor:
    """One gradient step of D on a real batch x and fakes G(z) (G is not updated)."""
    opt_D.zero_grad(set_to_none=True)
    loss = discriminator_loss(net_D(x), net_D(net_G(z).detach()), reduction)
    loss.backward()
    opt_D.step()
    return loss.detach()


def update_G(z: torch.Tensor, net_D: nn.Module, net_G: nn.Module, opt_G: torch.optim.Optimizer,
             saturating: bool = False, reduction: str = "mean") -> torch.Tensor:
    """One gradient step of G through the current D (D's gradients are computed, not applied)."""
    opt_G.zero_grad(set_to_none=True)
    loss = generator_loss(net_D(net_G(z)), saturating, reduction)
    loss.backward()
    opt_G.step()
    return loss.detach()


def toy_networks(latent_dim: int = 2, data_dim: int = 2) -> tuple[nn.Module, nn.Module]:
    """d2l's pair for its 2-D Gaussian: a linear generator and an MLP 2-5-3-1 with tanh."""
    net_G = nn.Sequential(nn.Linear(latent_dim, data_dim))
    net_D = nn.Sequential(nn.Linear(data_dim, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                          nn.Linear(3, 1))
    return net_G, net_D


def _stages(image_size: int) -> tuple[int, int]:
    """image_size = start * 2^k with start 4 (32, 64) or 7 (28): returns (start, k)."""
    for start in (4, 7):
        k = math.log2(image_size / start)
        if k >= 1 and k == int(k):
            return start, int(k)
    raise ValueError(f"DCGAN image_size must be 4 or 7 times a power of two (28, 32, 64), "
                     f"got {image_size}")


class DCGANGenerator(nn.Module):
    """z [N, latent_dim] -> images [N, channels, S, S] in [-1, 1]: a transposed convolution to a
    start x start map, then ConvT(4, stride 2) + BatchNorm + ReLU blocks halving the channels,
    and a last ConvT to the image channels with tanh. image_size=64, channels=3, base=64,
    latent_dim=100 is d2l's configuration."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 32,
                 base: int = 64):
        super().__init__()
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        start, k = _stages(image_size)
        width = base * 2 ** (k - 1)
        layers = [nn.ConvTranspose2d(latent_dim, width, start, 1, 0, bias=False),
                  nn.BatchNorm2d(width), nn.ReLU()]                         # start x start
        for _ in range(k - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU()]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents [N, {self.latent_dim}], got {tuple(z.shape)}")
        return self.net(z[:, :, None, None])  # [N, latent_dim, 1, 1] -> images


class DCGANDiscriminator(nn.Module):
    """images [N, channels, S, S] in [-1, 1] -> logits [N]: Conv(4, stride 2) + BatchNorm +
    LeakyReLU(0.2) blocks doubling the channels down to start x start, then a start x start
    convolution to one logit (d2l's D with image_size=64, channels=3, base=64)."""

    def __init__(self, channels: int = 1, image_size: int = 32, base: int = 64):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        start, k = _stages(image_size)
        layers, c_in, width = [], channels, base
        for _ in range(k):
            layers += [nn.Conv2d(c_in, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2)]
            c_in, width = width, width * 2
        layers += [nn.Conv2d(c_in, 1, start, bias=False)]                   # [N, 1, 1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images [N, {', '.join(map(str, expected))}], got "
                             f"{tuple(x.shape)}")
        return self.net(x).flatten()


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.: convolution weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0.
    Use as ``model.apply(dcgan_init)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


ARCH = "dcgan_fashion"
CHECKPOINT = CHECKPOINT_DIR / "dcgan_fashion.pt"
RECIPE = {"latent_dim": 100, "base": 32, "image_size": 32, "epochs": 5, "batch_size": 128,
          "lr": 2e-4, "betas": (0.5, 0.999), "saturating": False}


def train_dcgan(seed: int = 0, out: str | Path | None = None, device: str | None = None,
                **overrides) -> tuple[DCGANGenerator, DCGANDiscriminator]:
    """DCGAN on Fashion-MNIST padded to 32x32 in [-1, 1]: Adam 2e-4, betas (0.5, 0.999),
    N(0, 0.02) init, one D step then one G step per batch. Logs D(x) and D(G(z)) too."""
    from course_lib.data import load_fashion_mnist
    from course_lib.train import Minibatches, fit

    device = get_device(device)
    config = {**RECIPE, "seed": seed, **overrides}
    seed_everything(seed)
    x_train, _ = load_fashion_mnist("train", size=config["image_size"], value_range=(-1, 1),
                                    device=device)
    net_G = DCGANGenerator(config["latent_dim"], 1, config["image_size"], config["base"])
    net_D = DCGANDiscriminator(1, config["image_size"], config["base"])
    net_G.apply(dcgan_init)
    net_D.apply(dcgan_init)
    net_G, net_D = net_G.to(device), net_D.to(device)
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=config["lr"], betas=config["betas"])
                    for m in (net_G, net_D))
    batches = Minibatches(x_train, batch_size=config["batch_size"], seed=seed)
    steps = max(1, int(config["epochs"] * batches.per_epoch))

    def train_step(batch):
        (x,) = batch
        z = torch.randn(len(x), config["latent_dim"], device=device)
        loss_D = update_D(x, z, net_D, net_G, opt_D)
        loss_G = update_G(z, net_D, net_G, opt_G, config["saturating"])
        with torch.no_grad():
            d_real, d_fake = torch.sigmoid(net_D(x)).mean(), torch.sigmoid(net_D(net_G(z))).mean()
        return {"loss_D": loss_D, "loss_G": loss_G, "D(x)": d_real, "D(G(z))": d_fake}

    start = time.perf_counter()
    history = fit(train_step, batches, steps, modules={"G": net_G, "D": net_D},
                  desc="DCGAN", live_plot=False, log_every=50)
    if out is not None:
        metrics = {k: round(v, 4) for k, v in history.last(100).items()}
        metrics["fid_10k"] = round(sample_fid(net_G.eval(), seed=seed), 3)
        save_checkpoint(out, {"G": net_G.cpu().state_dict(), "D": net_D.cpu().state_dict(),
                              "history": history.state_dict()},
                        arch=ARCH, config=config, step=steps, metrics=metrics,
                        train_seconds=round(time.perf_counter() - start, 1), device=str(device),
                        command=f"python -m course_lib.gan --seed {seed}")
    return net_G.to(device).eval(), net_D.to(device).eval()


@torch.inference_mode()
def sample_fid(net_G: DCGANGenerator, n: int = 10_000, seed: int = 0) -> float:
    """FID of n samples against the Fashion-MNIST test set, course classifier features."""
    from course_lib.data import load_fashion_mnist
    from course_lib.metrics import ClassifierFeatures, fid

    device = next(net_G.parameters()).device
    z = torch.randn(n, net_G.latent_dim, generator=torch.Generator().manual_seed(seed))
    samples = torch.cat([net_G(chunk.to(device)).cpu() for chunk in z.split(1000)])
    x_test, _ = load_fashion_mnist("test", size=net_G.image_size)
    return fid((samples + 1) / 2, x_test, ClassifierFeatures())


def load_generator(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
                   ) -> DCGANGenerator:
    """The trained DCGAN generator from a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    config = payload["config"]
    net_G = DCGANGenerator(config["latent_dim"], 1, config["image_size"], config["base"])
    load_state(net_G, payload["state"]["G"], "G")
    return net_G.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the course's DCGAN on Fashion-MNIST")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=RECIPE["epochs"])
    parser.add_argument("--out", default=str(CHECKPOINT))
    args = parser.parse_args(argv)
    train_dcgan(args.seed, args.out, epochs=args.epochs)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
