"""The shipped DCGAN (notebook 02): Radford et al.'s recipe on Fashion-MNIST padded to 32x32.

``python -m course_lib.experiments.dcgan`` trains ``data/checkpoints/dcgan_fashion.pt``; every
field of :class:`DCGANRecipe` has a flag (``--epochs``, ``--base``, ...).
``python -m course_lib.experiments.dcgan vanishing-gradients`` trains the shipped model's D alone
against its frozen G and writes the generator's gradient norms to
``data/results/dcgan_vanishing_gradients.json`` (:class:`VanishingRecipe`; minutes on a CPU).
The networks, losses and :func:`~course_lib.gan.gan_step` are in :mod:`course_lib.gan`.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint, update_json
from course_lib.data import load_fashion_mnist
from course_lib.experiments.command_line import parse_recipe
from course_lib.experiments.config import (add_arguments, command, from_dict, override,
                                           overrides_from_args, relative_path, to_dict)
from course_lib.gan import (DCGANDiscriminator, DCGANGenerator, dcgan_init, gan_step,
                            generator_gradient_norm, train_discriminator)
from course_lib.metrics import ClassifierFeatures, fid
from course_lib.runtime import CHECKPOINT_DIR, DATA_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit

MODULE = "course_lib.experiments.dcgan"
ARCH = "dcgan_fashion"
CHECKPOINT = CHECKPOINT_DIR / "dcgan_fashion.pt"
SNAPSHOT_STEPS = (25, 100, 250, 500, 1000)
VANISHING = DATA_DIR / "results" / "dcgan_vanishing_gradients.json"


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


@dataclass
class VanishingRecipe:
    """The shipped DCGAN's D trained alone (Adam ``lr``, beta_1 0.5, real batches of
    ``batch_size`` and as many fakes) against its frozen G, probed after each of ``checks`` D
    steps on ``probes`` held-out real images (the last of the training set) and fixed latents."""
    checks: tuple[int, ...] = (50, 200, 600)
    lr: float = 1e-3
    batch_size: int = 128
    probes: int = 256
    seed: int = 0


def vanishing_gradients(config: VanishingRecipe = VanishingRecipe(),
                        path: str | Path = CHECKPOINT) -> list[dict[str, float]]:
    """One row per check (and one before D trains): the mean D(x) and D(G(z)) on the probes and
    the norm of each generator loss's gradient at G
    (:func:`~course_lib.gan.generator_gradient_norm`), D in training mode as the generator's
    update sees it."""
    checks = list(config.checks)
    if not checks or checks != sorted(set(checks)) or checks[0] < 1:
        raise ValueError(f"checks must be increasing step counts >= 1, got {config.checks}")
    seed_everything(config.seed)
    payload = load_checkpoint(path, arch=ARCH)
    recipe = from_dict(DCGANRecipe, payload["config"])
    net_G = load_generator(path).requires_grad_(False)
    net_D = DCGANDiscriminator(1, recipe.image_size, recipe.base)
    load_state(net_D, payload["state"]["D"], "D")
    x_train, _ = load_fashion_mnist("train", size=recipe.image_size, value_range=(-1, 1))
    x_probe = x_train[-config.probes:]
    z_probe = torch.randn(config.probes, recipe.latent_dim,
                          generator=torch.Generator().manual_seed(config.seed + 4))
    batches = Minibatches(x_train[:-config.probes], batch_size=config.batch_size, seed=config.seed)
    opt = torch.optim.Adam(net_D.parameters(), lr=config.lr, betas=(0.5, 0.999))

    def probe(d_steps: int) -> dict[str, float]:
        with torch.no_grad():
            d_real = torch.sigmoid(net_D(x_probe)).mean().item()
            d_fake = torch.sigmoid(net_D(net_G(z_probe))).mean().item()
        G = copy.deepcopy(net_G).requires_grad_(True)
        return {"D steps": d_steps, "D(x)": d_real, "D(G(z))": d_fake,
                "|grad G| saturating": generator_gradient_norm(G, net_D, z_probe, True),
                "|grad G| non-saturating": generator_gradient_norm(G, net_D, z_probe, False)}

    rows, done = [probe(0)], 0
    for target in config.checks:
        train_discriminator(net_G, net_D, batches, target - done, opt, recipe.latent_dim)
        done = target
        rows.append(probe(done))
    return rows


def parse_args(argv: list[str] | None = None) -> tuple[DCGANRecipe, argparse.Namespace]:
    return parse_recipe(DCGANRecipe(), "train the course's DCGAN", CHECKPOINT, argv)


def vanishing_main(argv: list[str]) -> None:
    """``vanishing-gradients``: a flag per :class:`VanishingRecipe` field, ``--checkpoint``,
    ``--out``; writes the rows with the config, the time and the command that reruns them."""
    parser = argparse.ArgumentParser(description="the shipped DCGAN's D trained alone: the "
                                                 "generator's gradient norms")
    add_arguments(parser, VanishingRecipe)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="default: %(default)s")
    parser.add_argument("--out", default=str(VANISHING), help="default: %(default)s")
    args = parser.parse_args(argv)
    config = override(VanishingRecipe(), overrides_from_args(args, VanishingRecipe))
    start = time.perf_counter()
    rows = vanishing_gradients(config, args.checkpoint)
    table = {"rows": rows, "config": to_dict(config),
             "seconds": round(time.perf_counter() - start, 1),
             "command": command(MODULE, config, "vanishing-gradients",
                                checkpoint=relative_path(args.checkpoint),
                                out=relative_path(args.out))}
    update_json(args.out, lambda t: (t.clear(), t.update(table)))
    print(f"saved {args.out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vanishing-gradients"]:
        vanishing_main(argv[1:])
        return
    config, args = parse_args(argv)
    train_dcgan(config, args.out, args.device)
    print(f"saved {args.out}")

if __name__ == "__main__":
    main()
