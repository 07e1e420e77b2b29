"""Mode collapse on the ring of 8 Gaussians (notebook 02), and PacGAN's fix, measured.

``python -m course_lib.experiments.mode_collapse`` trains the runs of :data:`RUNS` with the
same networks (:func:`~course_lib.gan.mlp_networks`), data and seed, records at every
checkpoint the modes each covers and a scatter of its samples, and writes
``data/results/mode_collapse.json``, which notebook 02 plots. About 10 minutes on one core.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from course_lib.checkpoint import update_json
from course_lib.data.toy import Ring2D, mode_coverage
from course_lib.experiments.command_line import add_recipe_options
from course_lib.experiments.config import (command, override, overrides_from_args,
                                           relative_path, to_dict)
from course_lib.gan import gan_step, mlp_networks
from course_lib.runtime import DATA_DIR, seed_everything
from course_lib.train import Minibatches

MODULE = "course_lib.experiments.mode_collapse"
RESULTS = DATA_DIR / "results" / "mode_collapse.json"


@dataclass
class RingGAN:
    """One GAN on the ring: a latent of ``latent_dim``, Adam (beta1 0.5) with a learning rate per
    player, a discriminator judging ``pack`` samples at once (PacGAN; 1 is the plain GAN)."""
    lr_G: float = 1e-4
    lr_D: float = 1e-3
    pack: int = 1


@dataclass
class ModeCollapseRecipe:
    """The runs share the data (50,000 points of the ring), batch, steps, latent and seed: the
    plain GAN with a ten times faster D (collapsing) and with equal rates (healthy), and PacGAN
    packing 4 samples at each of the two."""
    collapsing: RingGAN = field(default_factory=RingGAN)
    healthy: RingGAN = field(default_factory=lambda: RingGAN(lr_G=1e-3, lr_D=1e-3))
    pacgan: RingGAN = field(default_factory=lambda: RingGAN(pack=4))
    pacgan_equal: RingGAN = field(default_factory=lambda: RingGAN(lr_G=1e-3, lr_D=1e-3, pack=4))
    latent_dim: int = 256
    batch_size: int = 512
    steps: int = 6000
    every: int = 250
    samples: int = 2500
    kept_samples: int = 400
    seed: int = 0


def modes_hit(samples: torch.Tensor, ring: Ring2D, min_count: int) -> list[int]:
    """The modes that are the nearest mode of at least ``min_count`` high-quality samples."""
    distances = torch.cdist(samples, ring.modes)                          # [n, 8]
    nearest_distance, nearest = distances.min(1)
    counts = torch.bincount(nearest[nearest_distance <= 3 * ring.std], minlength=len(ring.modes))
    return (counts >= min_count).nonzero().flatten().tolist()


def train_ring_gan(run: RingGAN, config: ModeCollapseRecipe, data: torch.Tensor, ring: Ring2D
                   ) -> dict[str, list]:
    """Train one run; at every ``config.every`` steps record the modes covered (a mode counts
    once it holds 1 % of ``config.samples`` samples), the high-quality share and a scatter."""
    seed_everything(config.seed)
    net_G, net_D = mlp_networks(config.latent_dim, 2, pack=run.pack)
    opt_G = torch.optim.Adam(net_G.parameters(), lr=run.lr_G, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(net_D.parameters(), lr=run.lr_D, betas=(0.5, 0.999))
    batches = Minibatches(data, batch_size=config.batch_size, seed=config.seed)
    z_eval = torch.randn(config.samples, config.latent_dim,
                         generator=torch.Generator().manual_seed(config.seed + 1))
    min_count = max(1, config.samples // 100)
    record = {"step": [], "modes": [], "which": [], "quality": [], "samples": []}
    for step in range(1, config.steps + 1):
        gan_step(next(batches)[0], net_G, net_D, opt_G, opt_D, config.latent_dim)
        if step % config.every == 0:
            with torch.no_grad():
                samples = net_G(z_eval)
            modes, quality = mode_coverage(samples, ring.modes, ring.std, min_count=min_count)
            record["step"].append(step)
            record["modes"].append(modes)
            record["which"].append(modes_hit(samples, ring, min_count))
            record["quality"].append(round(quality, 4))
            record["samples"].append(samples[:config.kept_samples].round(decimals=3).tolist())
    return record


def run_all(config: ModeCollapseRecipe = ModeCollapseRecipe()) -> dict:
    ring = Ring2D()
    data = ring.sample(50_000, torch.Generator().manual_seed(config.seed))
    table = {"runs": {}, "seconds": {}}
    for name in ("collapsing", "healthy", "pacgan", "pacgan_equal"):
        start = time.perf_counter()
        table["runs"][name] = to_dict(getattr(config, name)) | train_ring_gan(
            getattr(config, name), config, data, ring)
        table["seconds"][name] = round(time.perf_counter() - start, 1)
    return table


def parse_args(argv: list[str] | None = None) -> tuple[ModeCollapseRecipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_options(parser, ModeCollapseRecipe, RESULTS)
    args = parser.parse_args(argv)
    return override(ModeCollapseRecipe(), overrides_from_args(args, ModeCollapseRecipe)), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    table = run_all(config) | {"config": to_dict(config),
                               "command": command(MODULE, config, out=relative_path(args.out))}
    update_json(args.out, lambda t: (t.clear(), t.update(table)))
    for name, run in table["runs"].items():
        print(f"{name}: modes covered per check {run['modes']}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
