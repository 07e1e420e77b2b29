"""The shipped VAEs (notebook 04): Foster's Fashion-MNIST and faces recipes.

``python -m course_lib.experiments.vae fashion`` trains ``data/checkpoints/vae_fashion.pt``,
``python -m course_lib.experiments.vae faces`` ``data/checkpoints/vae_faces.pt`` (on CelebA when
:func:`~course_lib.data.find_celeba` finds it, else on the cartoon faces of
:mod:`course_lib.data.faces`; ``--dataset`` chooses).
The networks and the loss are in :mod:`course_lib.vae`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.data import load_fashion_mnist
from course_lib.data.faces import load_faces, resolve_source
from course_lib.experiments.autoencoder import AutoencoderModel
from course_lib.experiments.command_line import add_recipe_options
from course_lib.experiments.config import (command, from_dict, override, overrides_from_args,
                                           relative_path, to_dict)
from course_lib.runtime import CHECKPOINT_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit
from course_lib.vae import VAE, FacesVAE, vae_loss

MODULE = "course_lib.experiments.vae"
CHECKPOINTS = {"fashion": CHECKPOINT_DIR / "vae_fashion.pt",
               "faces": CHECKPOINT_DIR / "vae_faces.pt"}
MODELS = {"fashion": VAE, "faces": FacesVAE}


@dataclass
class _VAERecipe:
    """The settings both recipes have, with the Fashion-MNIST values; the model settings are
    the autoencoder's (the latent dimension)."""
    model: AutoencoderModel = field(default_factory=AutoencoderModel)
    epochs: float = 5
    batch_size: int = 100
    lr: float = 5e-4
    recon: str = "bce"
    recon_weight: float = 500.0
    beta: float = 1.0


@dataclass
class FashionVAERecipe(_VAERecipe):
    """Foster's Fashion-MNIST VAE: 2-D latent, BCE weighted 500 against the KL, 5 epochs."""
    seed: int = 0
    dataset: str = "Fashion-MNIST"


@dataclass
class FacesVAERecipe(_VAERecipe):
    """Foster's faces VAE (200-D latent, MSE, batch 128, Adam 5e-4), on ``images`` training faces
    for 5 epochs instead of CelebA's 162,770 for 10 (a CPU's hour is ~330,000 images through this
    network), with the reconstruction weighted 20,000 instead of Foster's 2,000: a cartoon's
    attributes cover a few pixels each (a mouth about 6 of 1,024), and at 2,000 the KL term
    outweighs them, so the latent does not encode them (notebook 04 gives the figures).
    ``dataset`` "auto": CelebA when present, else cartoon faces."""
    model: AutoencoderModel = field(default_factory=lambda: AutoencoderModel(latent_dim=200))
    epochs: float = 5
    batch_size: int = 128
    recon: str = "mse"
    recon_weight: float = 20_000.0
    images: int = 30_000
    seed: int = 0
    dataset: str = "auto"


RECIPES = {"fashion": FashionVAERecipe(), "faces": FacesVAERecipe()}


def training_images(config: FashionVAERecipe | FacesVAERecipe, device: torch.device
                    ) -> tuple[torch.Tensor, str]:
    """The recipe's training images and the name of their dataset: Fashion-MNIST 32x32, CelebA
    or the cartoon faces."""
    if isinstance(config, FashionVAERecipe):
        if config.dataset != "Fashion-MNIST":
            raise ValueError(f"the Fashion-MNIST VAE trains on 'Fashion-MNIST', got "
                             f"{config.dataset!r}")
        return load_fashion_mnist("train", size=32, device=device)[0], "Fashion-MNIST"
    source = resolve_source(config.dataset)
    return load_faces("train", config.images, source).images.to(device), source


def train_vae(name: str = "fashion", config: FashionVAERecipe | FacesVAERecipe | None = None,
              out: str | Path | None = None, device: str | None = None) -> VAE:
    """The ``name`` VAE trained with ``config`` (default: its recipe); saved to ``out`` if given,
    with the dataset it was trained on in the stored config."""
    config = config or RECIPES[name]
    if type(config) is not type(RECIPES[name]):
        raise TypeError(f"the {name!r} VAE takes a {type(RECIPES[name]).__name__}, got a "
                        f"{type(config).__name__}")
    device = get_device(device)
    seed_everything(config.seed)
    images, dataset = training_images(config, device)
    config = override(config, dataset=dataset)
    model = MODELS[name](config.model.latent_dim).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = Minibatches(images, batch_size=config.batch_size, seed=config.seed)
    steps = max(1, int(config.epochs * batches.per_epoch))

    def train_step(batch):
        x = batch[0].contiguous(memory_format=torch.channels_last)
        model.train()
        x_hat, mu, logvar = model(x)
        losses = vae_loss(x_hat, x, mu, logvar, config.recon_weight, config.beta, config.recon)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return losses

    start = time.perf_counter()
    history = fit(train_step, batches, steps, desc=f"VAE {name}", live_plot=False)
    model.eval()
    if out is not None:
        save_checkpoint(out, {"model": model.cpu().state_dict(), "history": history.state_dict()},
                        arch=f"vae_{name}", config=to_dict(config), step=steps,
                        metrics={k: round(v, 4) for k, v in history.last(100).items()},
                        train_seconds=round(time.perf_counter() - start, 1), device=str(device),
                        command=command(MODULE, config, name, out=relative_path(out)))
    return model.to(device)


def load_vae(name: str = "fashion", path: str | Path | None = None,
             device: str | torch.device = "cpu") -> VAE:
    """The trained ``name`` VAE ("fashion" or "faces") from a verified checkpoint, in eval
    mode."""
    if name not in CHECKPOINTS:
        raise ValueError(f"name must be one of {sorted(CHECKPOINTS)} (the shipped VAEs), got "
                         f"{name!r}; a VAE trained on CelebA is the 'faces' recipe")
    payload = load_checkpoint(path or CHECKPOINTS[name], arch=f"vae_{name}")
    config = from_dict(type(RECIPES[name]), payload["config"])
    model = MODELS[name](config.model.latent_dim)
    load_state(model, payload["state"]["model"])
    return model.to(device).eval()


def parse_args(argv: list[str] | None = None
               ) -> tuple[FashionVAERecipe | FacesVAERecipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="train the lecture's VAEs")
    names = parser.add_subparsers(dest="name", required=True)
    for name, recipe in RECIPES.items():
        sub = names.add_parser(name, help=type(recipe).__doc__.splitlines()[0])
        add_recipe_options(sub, type(recipe), CHECKPOINTS[name])
    args = parser.parse_args(argv)
    recipe = RECIPES[args.name]
    return override(recipe, overrides_from_args(args, type(recipe))), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    train_vae(args.name, config, args.out, args.device)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
