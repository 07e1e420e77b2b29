"""``python -m course_lib.experiments.benchmark``: measured speeds of the course's building blocks.

Prints a table and writes ``runs/benchmark.json``. Timings are best-of-``repeats`` wall times on
this machine; they are measurements for the README, never assertions of a test.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from course_lib import gan
from course_lib.data import load_fashion_mnist, make_shapes
from course_lib.diffusion import make_schedule, sample
from course_lib.experiments import dcgan
from course_lib.experiments.config import to_dict
from course_lib.experiments.ddpm import UNetConfig
from course_lib.runtime import RUNS_DIR
from course_lib.train import Minibatches
from course_lib.unet import UNet


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paired(ours_fn: Callable[[], object], theirs_fn: Callable[[], object], repeats: int
           ) -> tuple[float, float]:
    """Best-of-``repeats`` times of two functions run alternately after a warm-up, so that both
    see the same machine state (thermal, other load)."""
    ours_fn(), theirs_fn()
    times = [(best_time(ours_fn, 1), best_time(theirs_fn, 1)) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def train_flops(step: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``step`` (forward and backward), counted by
    ``torch.utils.flop_counter`` from the matmuls and convolutions (2 per multiply-add); the
    element-wise work is left out, as in the usual model-FLOP-utilisation accounting."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def matmul_peak_flops(repeats: int, n: int = 2048) -> float:
    """The machine's roof: FLOP/s of an n x n float32 matmul (2 n^3 operations), best of
    ``repeats`` runs of 4."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = best_time(lambda: [a @ b for _ in range(4)], repeats) / 4
    return 2 * n ** 3 / seconds


def bench_data(repeats: int) -> dict[str, float]:
    load = best_time(lambda: load_fashion_mnist("train"), repeats)
    images, labels = load_fashion_mnist("train")
    batches = Minibatches(images, labels, batch_size=128)
    n_batches = 2000
    seconds = best_time(lambda: [next(batches) for _ in range(n_batches)], repeats)
    shapes = best_time(lambda: make_shapes(10_000, seed=0), repeats)
    return {"fashion_mnist_train_load_s": load,
            "minibatches_per_s_at_128": n_batches / seconds,
            "shapes_10k_generation_s": shapes}


PEER_WIDTHS = (32, 40, 40)


def diffusers_unet(image_size: int = 28, widths: tuple[int, ...] = PEER_WIDTHS
                   ) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` with one residual block per level of ``widths``, attention in
    the middle block only; the default widths 32/40/40 give the course U-Net's size (0.51M
    parameters, within 1 %)."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ImportError("the comparison with diffusers needs it (a test dependency): "
                          "pip install -e '.[test]'") from e
    return UNet2DModel(sample_size=image_size, in_channels=1, out_channels=1,
                       layers_per_block=1, block_out_channels=tuple(widths), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * len(widths),
                       up_block_types=("UpBlock2D",) * len(widths))


def bench_diffusion(repeats: int) -> dict[str, float]:
    """Our U-Net against a diffusers ``UNet2DModel`` with the same parameter count (within 1 %):
    training images/s (batch 64, AdamW) and sampling time per network step (batch 100); then our
    sampler loops against diffusers' scheduler loops, on the same network (our U-Net) and on a
    no-op network (the loops' own overhead). Each pair runs alternately, best of ``repeats``."""
    torch.manual_seed(0)
    ours = UNet(**to_dict(UNetConfig()))
    theirs = diffusers_unet()
    results = {"params_ours": float(sum(p.numel() for p in ours.parameters())),
               "params_diffusers": float(sum(p.numel() for p in theirs.parameters())),
               **_unet_speeds(ours, theirs, repeats), **_sampler_loops(ours, repeats)}
    results["ratio_train_img_per_s_ours_over_diffusers"] = (results["train_img_per_s_ours"]
                                                            / results["train_img_per_s_diffusers"])
    for key in ("sample_step_s", *(f"loop_{name}_{net}_s" for net in ("unet", "noop")
                                   for name in ("ddim50", "ddpm1000"))):
        results[f"speedup_{key}_ours"] = results[f"{key}_diffusers"] / results[f"{key}_ours"]
    return results


def _unet_speeds(ours: torch.nn.Module, theirs: torch.nn.Module, repeats: int
                 ) -> dict[str, float]:
    """Training images/s and FLOP/s (batch 64, AdamW), and one sampling step on 100 images."""
    results = {}

    def train_steps(module: torch.nn.Module, net: Callable) -> Callable[[], None]:
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        x, t = torch.randn(64, 1, 28, 28), torch.randint(0, 1000, (64,))

        def steps(n: int = 5):
            for _ in range(n):
                loss = (net(x, t) - x).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return steps

    ours.train(), theirs.train()
    train_ours, train_theirs = (train_steps(ours, ours),
                                train_steps(theirs, lambda x, t: theirs(x, t).sample))
    times = paired(train_ours, train_theirs, repeats)
    results["train_img_per_s_ours"], results["train_img_per_s_diffusers"] = (5 * 64 / s
                                                                              for s in times)
    for name, step, seconds in (("ours", train_ours, times[0]),
                                ("diffusers", train_theirs, times[1])):
        results[f"train_gflop_per_step_{name}"] = train_flops(lambda: step(1)) / 1e9
        results[f"train_gflop_per_s_{name}"] = results[f"train_gflop_per_step_{name}"] * 5 / seconds
    ours.eval(), theirs.eval()
    x, t = torch.randn(100, 1, 28, 28), torch.full((100,), 500)
    with torch.inference_mode():
        results["sample_step_s_ours"], results["sample_step_s_diffusers"] = paired(
            lambda: ours(x, t), lambda: theirs(x, t).sample, repeats)
    return results


def _sampler_loops(ours: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Our DDIM-50 and DDPM-1000 loops against diffusers' scheduler loops, on our U-Net and on
    a no-op network (the loops' own overhead)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    results = {}

    class NoOp(torch.nn.Module):
        num_steps = 1000

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return 0.1 * x

    schedule, shape = make_schedule("cosine"), (4, 1, 28, 28)

    @torch.inference_mode()
    def scheduler_loop(net, scheduler, steps: int | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        if steps:
            scheduler.set_timesteps(steps)
        x = torch.randn(shape, generator=generator)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(shape[0])), t, x, generator=generator).prev_sample
        return x

    loops = {"ddim50": (dict(sampler="ddim", steps=50),
                        DDIMScheduler(beta_schedule="squaredcos_cap_v2"), 50),
             "ddpm1000": (dict(sampler="ddpm", variance="posterior"),
                          DDPMScheduler(beta_schedule="squaredcos_cap_v2"), None)}
    for net_name, net in (("unet", ours), ("noop", NoOp())):
        for name, (kwargs, scheduler, steps) in loops.items():
            times = paired(lambda: sample(net, schedule, shape, progress=False, generator=torch
                                          .Generator().manual_seed(0), **kwargs),
                           lambda: scheduler_loop(net, scheduler, steps), repeats)
            key = f"loop_{name}_{net_name}_s"
            results[f"{key}_ours"], results[f"{key}_diffusers"] = times
    return results


def bench_gan(repeats: int) -> dict[str, float]:
    """Our DCGAN training step against d2l's ``update_D`` and ``update_G`` (BCEWithLogitsLoss)
    on copies of the same networks (the shipped recipe: 32x32, base 32, latent 100, batch 128,
    Adam 2e-4), 5 steps per timing: ours as :func:`~course_lib.gan.gan_step` trains (with its
    logging of D(x) and D(G(z))) and as the bare update pair."""
    from d2l import torch as d2l

    torch.manual_seed(0)
    cfg = dcgan.DCGANRecipe()
    net_G, net_D = dcgan.generator(cfg), gan.DCGANDiscriminator(1, cfg.image_size, cfg.base)
    nets = {}
    for name, (G, D) in (("ours", (net_G, net_D)),
                         ("d2l", (copy.deepcopy(net_G), copy.deepcopy(net_D)))):
        nets[name] = (G, D, *(torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=cfg.betas)
                              for m in (G, D)))
    x = torch.rand(cfg.batch_size, 1, cfg.image_size, cfg.image_size) * 2 - 1
    z = torch.randn(cfg.batch_size, cfg.latent_dim)
    bce = torch.nn.BCEWithLogitsLoss()

    def ours_step(n: int = 5):
        net_G, net_D, opt_G, opt_D = nets["ours"]
        for _ in range(n):
            gan.update_D(x, z, net_G, net_D, opt_D)
            gan.update_G(z, net_G, net_D, opt_G)

    def ours_logged(n: int = 5):
        net_G, net_D, opt_G, opt_D = nets["ours"]
        for _ in range(n):
            gan.gan_step(x, net_G, net_D, opt_G, opt_D, cfg.latent_dim)

    def d2l_step(n: int = 5):
        net_G, net_D, opt_G, opt_D = nets["d2l"]
        for _ in range(n):
            d2l.update_D(x, z, net_D, net_G, bce, opt_D)
            d2l.update_G(z, net_D, net_G, bce, opt_G)

    ours, theirs = paired(ours_step, d2l_step, repeats)
    logged, _ = paired(ours_logged, d2l_step, repeats)
    flops = train_flops(lambda: ours_step(1))
    return {"train_step_s_ours": ours / 5, "train_step_s_ours_gan_step": logged / 5,
            "train_step_s_d2l": theirs / 5, "speedup_train_step_ours": theirs / ours,
            "train_gflop_per_step": flops / 1e9, "train_gflop_per_s_ours": flops * 5 / ours / 1e9,
            "train_gflop_per_s_d2l": flops * 5 / theirs / 1e9}


def bench_roofline(repeats: int) -> dict[str, float]:
    """The machine's measured float32 matmul peak, the roof the models' FLOP/s are read against."""
    return {"matmul_2048_gflop_per_s": matmul_peak_flops(repeats) / 1e9}


GROUPS = {"roofline": bench_roofline, "data": bench_data, "gan": bench_gan,
          "diffusion": bench_diffusion}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RUNS_DIR / "benchmark.json"))
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma-separated subset of {', '.join(GROUPS)}")
    args = parser.parse_args(argv)
    groups = args.groups.split(",")
    if unknown := set(groups) - set(GROUPS):
        parser.error(f"unknown groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}}
    results |= {group: GROUPS[group](args.repeats) for group in groups}
    if "roofline" in results:
        peak = results["roofline"]["matmul_2048_gflop_per_s"]
        for group in ("gan", "diffusion"):
            for key, value in list(results.get(group, {}).items()):
                if key.startswith("train_gflop_per_s_"):
                    results[group][key.replace("gflop_per_s", "share_of_peak")] = value / peak
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for group, values in results.items():
        if group == "machine":
            continue
        for name, value in values.items():
            print(f"{group:<9} {name:<48} {value:>10.3f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
