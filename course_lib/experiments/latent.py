"""Latent diffusion on Fashion-MNIST (notebook 11): the autoencoder, flow matching in its latent
space, and the table against flow matching in pixel space.

    python -m course_lib.experiments.latent autoencoder   # stage 1: the KL-regularised autoencoder
    python -m course_lib.experiments.latent train         # stage 2: flow matching on its latents
    python -m course_lib.experiments.latent evaluate      # FIDs and times, latent vs pixel space

Stage 2 is the pixel-space flow recipe (:class:`course_lib.experiments.flow.FlowRecipe`: the
loss, batch, optimizer, warm-up, clipping, EMA and steps) on the scaled latents
s * z [4, 8, 8] of the padded 32x32 images, with a U-Net sized for the 8x8 latent.
``--no-scale`` trains the same model on the unscaled latents (s = 1), the experiment behind the
scale factor.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint, update_json
from course_lib.data import load_fashion_mnist
from course_lib.experiments.command_line import parse_command
from course_lib.experiments.config import add_arguments, command, from_dict, relative_path, to_dict
from course_lib.experiments.ddpm import UNetConfig
from course_lib.experiments.flow import ARCH as PIXEL_ARCH
from course_lib.experiments.flow import CHECKPOINT as PIXEL_CHECKPOINT
from course_lib.experiments.flow import flow_images, load_flow
from course_lib.flow_matching import StepTimeModel, flow_matching_loss, flow_sample
from course_lib.latent import (IMAGE_SHAPE, LatentAutoencoder, autoencoder_loss, decode_latents,
                               scale_factor)
from course_lib.metrics import ClassifierFeatures, floor_images, fid_from_features
from course_lib.runtime import (CHECKPOINT_DIR, DATA_DIR, RUNS_DIR, course_root, get_device,
                                seed_everything)
from course_lib.train import EMA, Minibatches, fit, make_optimizer, optimize
from course_lib.unet import UNet

MODULE = "course_lib.experiments.latent"
AE_ARCH, ARCH = "latent_autoencoder", "latent_flow_unet"
AUTOENCODER = CHECKPOINT_DIR / "latent_autoencoder.pt"
CHECKPOINT = CHECKPOINT_DIR / "latent_flow.pt"
UNSCALED = CHECKPOINT_DIR / "latent_flow_unscaled.pt"
TABLE = DATA_DIR / "results" / "latent_vs_pixel.json"
# the pixel-space flow recipe trained for the latent pipeline's CPU time (not shipped; `make
# checkpoints` trains it into runs/ before the table)
EQUAL_COMPUTE = RUNS_DIR / "flow_fashion_equal_compute.pt"


@dataclass
class AutoencoderRecipe:
    """Stage 1: the squared error plus ``kl_weight`` times the KL, Adam with warm-up and cosine
    decay, on the 60,000 padded training images."""

    width: int = 32
    latent_channels: int = 4
    kl_weight: float = 1e-4
    epochs: float = 2.0
    images: int = 60_000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0


def _fashion(split: str, device, images: int | None = None) -> torch.Tensor:
    """The first ``images`` padded 32x32 images of a split, in [-1, 1]."""
    x = load_fashion_mnist(split, size=32, value_range=(-1, 1), device=device)[0]
    if images is not None and not 1 <= images <= len(x):
        raise ValueError(f"images must be in 1..{len(x)}, got {images}")
    return x[:images]


def train_autoencoder(recipe: AutoencoderRecipe = AutoencoderRecipe(),
                      out: str | Path = AUTOENCODER, device: str | torch.device | None = None
                      ) -> LatentAutoencoder:
    device = get_device(device)
    seed_everything(recipe.seed)
    x_train = _fashion("train", device, recipe.images)
    model = LatentAutoencoder(recipe.width, recipe.latent_channels).to(device)
    steps = int(recipe.epochs * (len(x_train) // recipe.batch_size))
    opt, lr_schedule = make_optimizer(model, recipe.lr, 0.0, recipe.warmup, steps)

    def train_step(batch):
        x_hat, mean, logvar = model(batch[0])
        terms = autoencoder_loss(x_hat, batch[0], mean, logvar, recipe.kl_weight)
        optimize(terms["loss"], model, opt, lr_schedule, recipe.grad_clip)
        return terms

    start = time.perf_counter()
    history = fit(train_step, Minibatches(x_train, batch_size=recipe.batch_size,
                                          seed=recipe.seed), steps, log_every=50,
                  desc="latent autoencoder", live_plot=False)
    seconds, threads = time.perf_counter() - start, torch.get_num_threads()
    model.eval()
    save_checkpoint(out, {"model": model.state_dict(), "history": history.state_dict(),
                          "scale_factor": latent_scale(model, x_train)},
                    arch=AE_ARCH, config=to_dict(recipe), step=steps,
                    metrics={key: round(value, 4) for key, value in history.last(100).items()},
                    train_seconds=round(seconds, 1), device=str(device), threads=threads,
                    processes=1, command=command(MODULE, recipe, "autoencoder",
                                                 out=relative_path(out), threads=threads))
    return model


@torch.no_grad()
def encode_means(model: LatentAutoencoder, x: torch.Tensor, batch_size: int = 1000
                 ) -> torch.Tensor:
    """The means of q(z | x) of images x, batch by batch (unscaled latents)."""
    return torch.cat([model.encode(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])


def latent_scale(model: LatentAutoencoder, x_train: torch.Tensor, n: int = 10_000) -> float:
    """The scale factor s of :func:`course_lib.latent.scale_factor` on the first n training
    images' latent means."""
    return round(scale_factor(encode_means(model, x_train[:n])), 5)


def load_autoencoder(path: str | Path = AUTOENCODER, device: str | torch.device = "cpu"
                     ) -> tuple[LatentAutoencoder, float]:
    """The verified autoencoder in eval mode, and its latents' scale factor s."""
    payload = load_checkpoint(path, arch=AE_ARCH)
    config = payload["config"]
    model = LatentAutoencoder(config["width"], config["latent_channels"])
    load_state(model, payload["state"]["model"])
    return model.to(device).eval(), float(payload["state"]["scale_factor"])


def latent_unet() -> UNetConfig:
    """The pixel model's U-Net (0.51M parameters) resized for the 4x8x8 latents (0.55M): levels
    at 8x8, 4x4 and 2x2, attention at 4x4 and 2x2."""
    return UNetConfig(base=32, channel_mults=[1, 2, 2], depth=1, attention_resolutions=[4, 2],
                      image_size=8)


@dataclass
class LatentFlowRecipe:
    """Stage 2: the pixel-space flow recipe on the autoencoder's latents, scaled by s (or not,
    with ``scale = False``)."""

    autoencoder: str = relative_path(AUTOENCODER)
    scale: bool = True
    model: UNetConfig = field(default_factory=latent_unet)
    images: int = 60_000
    steps: int = 6_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0


def train_latent_flow(recipe: LatentFlowRecipe = LatentFlowRecipe(),
                      out: str | Path = CHECKPOINT, device: str | torch.device | None = None
                      ) -> StepTimeModel:
    device = get_device(device)
    seed_everything(recipe.seed)
    autoencoder, s = load_autoencoder(course_root() / recipe.autoencoder, device)
    s = s if recipe.scale else 1.0
    start = time.perf_counter()
    z0 = s * encode_means(autoencoder, _fashion("train", device, recipe.images))  # [N, 4, 8, 8]
    encode_seconds = time.perf_counter() - start
    network = UNet(in_channels=autoencoder.latent_shape[0], **to_dict(recipe.model)).to(device)
    model = StepTimeModel(network)
    ema = EMA(network, recipe.ema)
    opt, lr_schedule = make_optimizer(network, recipe.lr, recipe.weight_decay, recipe.warmup,
                                      recipe.steps)

    def train_step(batch):
        network.train()
        loss = flow_matching_loss(model, batch[0])
        optimize(loss, network, opt, lr_schedule, recipe.grad_clip)
        return {"loss": loss}

    start = time.perf_counter()
    history = fit(train_step, Minibatches(z0, batch_size=recipe.batch_size, seed=recipe.seed),
                  recipe.steps, ema=ema, modules={"model": network}, log_every=50,
                  desc="latent flow matching", live_plot=False)
    seconds, threads = time.perf_counter() - start, torch.get_num_threads()
    save_checkpoint(out, {"ema": ema.state_dict(), "history": history.state_dict()}, arch=ARCH,
                    config=to_dict(recipe), step=recipe.steps,
                    metrics={"loss": round(history.last(500)["loss"], 4),
                             "encode_seconds": round(encode_seconds, 1), "scale_factor": s},
                    train_seconds=round(seconds, 1), device=str(device), threads=threads,
                    processes=1, command=command(MODULE, recipe, "train", out=relative_path(out),
                                                 threads=threads))
    return StepTimeModel(ema.model).eval()


@dataclass
class LatentModel:
    """A loaded latent flow model: its velocity network, autoencoder and scale factor s."""

    velocity: StepTimeModel
    autoencoder: LatentAutoencoder
    s: float

    @torch.no_grad()
    def sample(self, n: int, steps: int, sampler: str = "euler", seed: int = 0,
               batch_size: int = 500) -> torch.Tensor:
        """n images [n, 1, 32, 32] in [-1, 1]: scaled latents by the flow ODE from one seeded
        noise, then one decode each."""
        generator, images = torch.Generator().manual_seed(seed), []
        for i in range(0, n, batch_size):
            noise = torch.randn((min(batch_size, n - i), *self.autoencoder.latent_shape),
                                generator=generator)
            z0 = flow_sample(self.velocity, tuple(noise.shape), steps, sampler, noise=noise)
            images.append(decode_latents(self.autoencoder, z0, self.s))
        return torch.cat(images)


def load_latent_flow(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
                     ) -> LatentModel:
    payload = load_checkpoint(path, arch=ARCH)
    recipe = payload["config"]  # the autoencoder's path is relative to the course root
    autoencoder, s = load_autoencoder(course_root() / recipe["autoencoder"], device)
    config = from_dict(UNetConfig, recipe["model"])
    network = UNet(in_channels=autoencoder.latent_shape[0], **to_dict(config))
    load_state(network, payload["state"]["ema"], "ema")
    return LatentModel(StepTimeModel(network.to(device)).eval(), autoencoder,
                       s if recipe["scale"] else 1.0)


# --- the table: latent against pixel space ------------------------------------------------------

@dataclass
class LatentTable:
    """Latent against pixel space. For each latent model of ``models`` and each pixel-space
    flow checkpoint of ``pixel_models`` (notebook 10's recipe; the second trained for the CPU
    time of the whole latent pipeline), Euler at each of ``steps``: the FID of ``samples``
    images (against the 10,000 test images, course classifier features) and the sampling
    milliseconds per image. Each model's training cost at this machine's speed: its training
    steps times the seconds of one step measured here (``timing_steps`` steps of a fresh network
    of its recipe), plus the autoencoder's for a latent model. And the first latent model's
    autoencoder alone: the reconstruction FID of the floor's training images (encoded and
    decoded), beside the floor."""

    models: list[str] = field(default_factory=lambda: [relative_path(CHECKPOINT),
                                                       relative_path(UNSCALED)])
    pixel_models: list[str] = field(default_factory=lambda: [relative_path(PIXEL_CHECKPOINT),
                                                             relative_path(EQUAL_COMPUTE)])
    steps: list[int] = field(default_factory=lambda: [10, 25, 50])
    samples: int = 1000
    timing_steps: int = 10
    seed: int = 0


def _fid(features: ClassifierFeatures, images: torch.Tensor, test_features: torch.Tensor
         ) -> float:
    return round(fid_from_features(features((images + 1) / 2), test_features), 3)


def seconds_per_step(model: nn.Module, loss: Callable[[], torch.Tensor], steps: int) -> float:
    """The mean wall time of ``steps`` AdamW steps on ``loss()`` (after one warm-up step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _unet_step_seconds(config: dict, channels: int, batch_size: int, steps: int) -> float:
    network = UNet(in_channels=channels, **config)
    x0 = torch.randn(batch_size, channels, config["image_size"], config["image_size"])
    return seconds_per_step(network, lambda: flow_matching_loss(StepTimeModel(network), x0), steps)


def _autoencoder_step_seconds(config: dict, steps: int) -> float:
    model = LatentAutoencoder(config["width"], config["latent_channels"])
    x = torch.rand(config["batch_size"], *IMAGE_SHAPE) * 2 - 1

    def loss():
        x_hat, mean, logvar = model(x)
        return autoencoder_loss(x_hat, x, mean, logvar, config["kl_weight"])["loss"]

    return seconds_per_step(model, loss, steps)


def evaluate(table: LatentTable = LatentTable(), out: str | Path = TABLE) -> dict:
    features = ClassifierFeatures()
    test_features = features(load_fashion_mnist("test")[0])
    real = floor_images(_fashion("train", "cpu"), table.samples, table.seed)
    models = {path: load_latent_flow(course_root() / path) for path in table.models}
    first = models[table.models[0]]
    with torch.no_grad():
        reconstructed = first.autoencoder.decode(encode_means(first.autoencoder, real))
    threads = torch.get_num_threads()
    result = {"command": command(MODULE, table, "evaluate", out=relative_path(out),
                                 threads=threads),
              "samples": table.samples, "floor": _fid(features, real, test_features),
              "scale_factor": first.s,
              "reconstruction_fid": _fid(features, reconstructed, test_features),
              "reconstruction_mse": round((reconstructed - real).pow(2).mean().item(), 5),
              "threads": threads, "rows": []}

    def add(name, space, scale, sample, train_steps, train_cpu_seconds):
        for steps in table.steps:
            start = time.perf_counter()
            images = sample(steps)
            seconds = time.perf_counter() - start
            result["rows"].append(
                {"model": name, "space": space, "scale_factor": scale, "sampler": "euler",
                 "steps": steps, "fid": _fid(features, images, test_features),
                 "ms_per_image": round(1000 * seconds / table.samples, 2),
                 "train_steps": train_steps, "train_cpu_seconds": round(train_cpu_seconds)})

    for path, model in models.items():
        recipe = load_checkpoint(course_root() / path, arch=ARCH)
        ae = load_checkpoint(course_root() / recipe["config"]["autoencoder"], arch=AE_ARCH)
        cost = recipe["step"] * _unet_step_seconds(
            recipe["config"]["model"], model.autoencoder.latent_shape[0],
            recipe["config"]["batch_size"], table.timing_steps)
        cost += ae["step"] * _autoencoder_step_seconds(ae["config"], table.timing_steps)
        add(Path(path).name, "latent", model.s,
            lambda steps, model=model: model.sample(table.samples, steps, seed=table.seed),
            recipe["step"], cost)
    for path in table.pixel_models:
        payload = load_checkpoint(course_root() / path, arch=PIXEL_ARCH)
        model = load_flow(course_root() / path)
        cost = payload["step"] * _unet_step_seconds(
            payload["config"]["model"], 1, payload["config"]["batch_size"], table.timing_steps)
        add(Path(path).name, "pixel", None,
            lambda steps, model=model: flow_images(model, table.samples, steps, "euler",
                                                   table.seed, 100, torch.device("cpu")),
            payload["step"], cost)
    update_json(out, lambda old: (old.clear(), old.update(result)))
    return result


# --- the command line --------------------------------------------------------------------------

RECIPES = {"autoencoder": AutoencoderRecipe, "train": LatentFlowRecipe, "evaluate": LatentTable}
OUTPUTS = {"autoencoder": AUTOENCODER, "train": CHECKPOINT, "evaluate": TABLE}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, cls in RECIPES.items():
        sub = commands.add_parser(name)
        add_arguments(sub, cls)
        sub.add_argument("--out", default=str(OUTPUTS[name]))
        sub.add_argument("--threads", type=int, default=None)
    return parser


def parse_args(argv: list[str] | None = None
               ) -> tuple[AutoencoderRecipe | LatentFlowRecipe | LatentTable, argparse.Namespace]:
    """The command line as (the full recipe or table settings, the other options)."""
    return parse_command(_parser(), RECIPES, argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "autoencoder":
        train_autoencoder(config, args.out)
    elif args.command == "train":
        train_latent_flow(config, args.out)
    else:
        for row in evaluate(config, args.out)["rows"]:
            print(row)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
