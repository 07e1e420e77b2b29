"""Mode collapse on the ring of 8 Gaussians (notebook 02), and two fixes, measured.

``python -m course_lib.experiments.mode_collapse`` trains the runs of
:class:`ModeCollapseRecipe` with the same networks (:func:`~course_lib.gan.mlp_networks`), data
and seed, records at every check the modes each covers and a scatter of its samples, repeats the
collapsing run and its R1 fix on more seeds, and writes ``data/results/mode_collapse.json``,
which notebook 02 plots. About 30 minutes on one core.
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
    player, a discriminator judging ``pack`` samples at once (PacGAN; 1 is the plain GAN) and an
    R1 penalty of weight ``r1_gamma`` on D (0: none)."""
    lr_G: float = 1e-4
    lr_D: float = 1e-3
    pack: int = 1
    r1_gamma: float = 0.0


RUNS = ("collapsing", "hopping", "healthy", "r1", "pacgan")
SEED_RUNS = ("collapsing", "r1")


@dataclass
class ModeCollapseRecipe:
    """The runs share the data (50,000 points of the ring), batch, steps, latent and seed:
    - collapsing: D learns 3.3 times faster than G;
    - hopping: D learns 10 times slower than G;
    - healthy: equal rates, with R1;
    - r1: the collapsing rates with Mescheder et al.'s R1 penalty on D;
    - pacgan: the collapsing rates with D judging 4 samples at once (Lin et al.).
    The runs of :data:`SEED_RUNS` are repeated on ``more_seeds`` (data, initialisation and
    batches all from that seed)."""
    collapsing: RingGAN = field(default_factory=lambda: RingGAN(lr_G=3e-4, lr_D=1e-3))
    hopping: RingGAN = field(default_factory=lambda: RingGAN(lr_G=1e-3, lr_D=1e-4))
    healthy: RingGAN = field(default_factory=lambda: RingGAN(lr_G=1e-3, lr_D=1e-3, r1_gamma=1.0))
    r1: RingGAN = field(default_factory=lambda: RingGAN(lr_G=3e-4, lr_D=1e-3, r1_gamma=1.0))
    pacgan: RingGAN = field(default_factory=lambda: RingGAN(lr_G=3e-4, lr_D=1e-3, pack=4))
    latent_dim: int = 256
    batch_size: int = 512
    steps: int = 6000
    every: int = 250
    samples: int = 2500
    kept_samples: int = 400
    seed: int = 0
    more_seeds: list[int] = field(default_factory=lambda: [1, 2])


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
        gan_step(next(batches)[0], net_G, net_D, opt_G, opt_D, config.latent_dim,
                 r1_gamma=run.r1_gamma)
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


def late_summary(record: dict) -> dict[str, float]:
    """Over the checks of the second half of training: the mean modes covered, the share of
    checks with all 8, the mean high-quality share; and the modes covered at the end."""
    late = [k for k, step in enumerate(record["step"]) if step > record["step"][-1] / 2]
    mean = lambda key: sum(record[key][k] for k in late) / len(late)
    return {"late_modes": round(mean("modes"), 3),
            "late_all_modes": round(sum(record["modes"][k] == 8 for k in late) / len(late), 3),
            "late_quality": round(mean("quality"), 4), "final_modes": record["modes"][-1]}


def run_all(config: ModeCollapseRecipe = ModeCollapseRecipe()) -> dict:
    """Every run of :data:`RUNS` on ``config.seed``, then :data:`SEED_RUNS` on
    ``config.more_seeds``; ``seeds`` holds :func:`late_summary` of each run on each seed."""
    table = {"runs": {}, "seconds": {}, "seeds": {name: {} for name in SEED_RUNS}}
    for seed in [config.seed, *config.more_seeds]:
        ring = Ring2D()
        data = ring.sample(50_000, torch.Generator().manual_seed(seed))
        seeded = override(config, {"seed": seed})
        for name in RUNS if seed == config.seed else SEED_RUNS:
            start = time.perf_counter()
            record = train_ring_gan(getattr(config, name), seeded, data, ring)
            if seed == config.seed:
                table["runs"][name] = to_dict(getattr(config, name)) | record
                table["seconds"][name] = round(time.perf_counter() - start, 1)
            if name in SEED_RUNS:
                table["seeds"][name][str(seed)] = late_summary(record)
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
    # on one line: 2 MB, where indented it is 4 MB
    update_json(args.out, lambda t: (t.clear(), t.update(table)), indent=None)
    for name, run in table["runs"].items():
        print(f"{name}: modes covered per check {run['modes']}")
    for name, seeds in table["seeds"].items():
        print(f"{name}, second half by seed: {seeds}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
