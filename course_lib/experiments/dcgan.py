"""The shipped DCGAN (notebook 02): Radford et al.'s recipe on Fashion-MNIST padded to 32x32.

``python -m course_lib.experiments.dcgan`` trains ``data/checkpoints/dcgan_fashion.pt``; every
field of :class:`DCGANRecipe` has a flag (``--epochs``, ``--base``, ...). The networks, losses and
:func:`~course_lib.gan.gan_step` are in :mod:`course_lib.gan`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.data import load_fashion_mnist
from course_lib.experiments.command_line import parse_recipe
from course_lib.experiments.config import command, from_dict, relative_path, to_dict
from course_lib.gan import DCGANDiscriminator, DCGANGenerator, dcgan_init, gan_step
from course_lib.metrics import ClassifierFeatures, fid
from course_lib.runtime import CHECKPOINT_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit

MODULE = "course_lib.experiments.dcgan"
ARCH = "dcgan_fashion"
CHECKPOINT = CHECKPOINT_DIR / "dcgan_fashion.pt"
SNAPSHOT_STEPS = (25, 100, 250, 500, 1000)


@dataclass
class DCGANRecipe:
    """Radford et al.: Adam 2e-4 with beta_1 = 0.5, batch 128, 100-D latents; ``base`` channels
    in the first D block (the last G block), halved from the paper's 64 for a CPU."""
    latent_dim: int = 100
    base: int = 32
    image_size: int = 32
    epochs: float = 5
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    saturating: bool = False
    seed: int = 0


def generator(config: DCGANRecipe) -> DCGANGenerator:
    return DCGANGenerator(config.latent_dim, 1, config.image_size, config.base)


class Snapshots:
    """The images of 64 fixed latents (uint8 [64, 1, H, W]) at chosen steps of training."""

    def __init__(self, net_G: DCGANGenerator, steps: list[int], seed: int):
        self.net_G, self.steps, self.images = net_G, steps, []
        self.z = torch.randn(64, net_G.latent_dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def take(self) -> None:
        device = next(self.net_G.parameters()).device
        self.net_G.eval()
        images = self.net_G(self.z.to(device))
        self.images.append(((images + 1) * 127.5).round().to(torch.uint8).cpu())
        self.net_G.train()

    def state_dict(self) -> dict:
        return {"steps": [0, *self.steps], "images": torch.stack(self.images)}


def train_dcgan(config: DCGANRecipe = DCGANRecipe(), out: str | Path | None = None,
                device: str | None = None) -> tuple[DCGANGenerator, DCGANDiscriminator]:
    """DCGAN on Fashion-MNIST in [-1, 1]: N(0, 0.02) init, :func:`~course_lib.gan.gan_step` per
    batch. The checkpoint at ``out`` keeps the loss history and the snapshots of 64 fixed latents
    at init, at the ``SNAPSHOT_STEPS`` and at the end, and records the FID of 10k samples."""
    device = get_device(device)
    seed_everything(config.seed)
    x_train, _ = load_fashion_mnist("train", size=config.image_size, value_range=(-1, 1),
                                    device=device)
    net_G, net_D = generator(config), DCGANDiscriminator(1, config.image_size, config.base)
    net_G.apply(dcgan_init)
    net_D.apply(dcgan_init)
    net_G, net_D = net_G.to(device), net_D.to(device)
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=config.lr, betas=config.betas)
                    for m in (net_G, net_D))
    batches = Minibatches(x_train, batch_size=config.batch_size, seed=config.seed)
    steps = max(1, int(config.epochs * batches.per_epoch))
    snapshots = Snapshots(net_G, sorted({s for s in SNAPSHOT_STEPS if s < steps} | {steps}),
                          config.seed + 1)

    def train_step(batch):
        losses = gan_step(batch[0], net_G, net_D, opt_G, opt_D, config.latent_dim,
                          config.saturating)
        if batches.step in snapshots.steps:
            snapshots.take()
        return losses

    start = time.perf_counter()
    snapshots.take()
    history = fit(train_step, batches, steps, desc="DCGAN", live_plot=False, log_every=50)
    if out is not None:
        metrics = {k: round(v, 4) for k, v in history.last(100).items()}
        metrics["fid_10k"] = round(sample_fid(net_G.eval(), seed=config.seed), 3)
        save_checkpoint(out, {"G": net_G.cpu().state_dict(), "D": net_D.cpu().state_dict(),
                              "history": history.state_dict(),
                              "snapshots": snapshots.state_dict()},
                        arch=ARCH, config=to_dict(config), step=steps, metrics=metrics,
                        train_seconds=round(time.perf_counter() - start, 1), device=str(device),
                        command=command(MODULE, config, out=relative_path(out)))
    return net_G.to(device).eval(), net_D.to(device).eval()


@torch.inference_mode()
def sample_fid(net_G: DCGANGenerator, n: int = 10_000, seed: int = 0) -> float:
    """FID of n samples against the Fashion-MNIST test set, course classifier features."""
    device = next(net_G.parameters()).device
    z = torch.randn(n, net_G.latent_dim, generator=torch.Generator().manual_seed(seed))
    samples = torch.cat([net_G(chunk.to(device)).cpu() for chunk in z.split(1000)])
    x_test, _ = load_fashion_mnist("test", size=net_G.image_size)
    return fid((samples + 1) / 2, x_test, ClassifierFeatures())


def load_generator(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
                   ) -> DCGANGenerator:
    """The trained DCGAN generator from a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    net_G = generator(from_dict(DCGANRecipe, payload["config"]))
    load_state(net_G, payload["state"]["G"], "G")
    return net_G.to(device).eval()


def parse_args(argv: list[str] | None = None) -> tuple[DCGANRecipe, argparse.Namespace]:
    return parse_recipe(DCGANRecipe(), "train the course's DCGAN", CHECKPOINT, argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    train_dcgan(config, args.out, args.device)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
