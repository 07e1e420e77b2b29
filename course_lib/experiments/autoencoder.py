"""The shipped autoencoders (notebook 03): Foster's recipe, with a 2-D and a 16-D latent.

``python -m course_lib.experiments.autoencoder`` trains ``data/checkpoints/autoencoder.pt``;
``--model.latent-dim 16 --out data/checkpoints/autoencoder_16.pt`` the 16-D one. The network and
its loss are in :mod:`course_lib.autoencoder`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.autoencoder import Autoencoder, reconstruction_loss
from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.data import load_fashion_mnist
from course_lib.experiments.command_line import parse_recipe
from course_lib.experiments.config import command, from_dict, relative_path, to_dict
from course_lib.runtime import CHECKPOINT_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit

MODULE = "course_lib.experiments.autoencoder"
ARCH = "autoencoder"
CHECKPOINT = CHECKPOINT_DIR / "autoencoder.pt"


@dataclass
class AutoencoderModel:
    latent_dim: int = 2


@dataclass
class AutoencoderRecipe:
    """Foster's recipe: Adam 1e-3, binary cross-entropy, batch 100, 3 epochs."""
    model: AutoencoderModel = field(default_factory=AutoencoderModel)
    epochs: float = 3
    batch_size: int = 100
    lr: float = 1e-3
    loss: str = "bce"
    seed: int = 0


def train_autoencoder(config: AutoencoderRecipe = AutoencoderRecipe(),
                      out: str | Path | None = None, device: str | None = None) -> Autoencoder:
    """The autoencoder trained on Fashion-MNIST padded to 32x32; saved to ``out`` if given."""
    device = get_device(device)
    seed_everything(config.seed)
    x_train, _ = load_fashion_mnist("train", size=32, device=device)
    model = Autoencoder(config.model.latent_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = Minibatches(x_train, batch_size=config.batch_size, seed=config.seed)
    steps = max(1, int(config.epochs * batches.per_epoch))

    def train_step(batch):
        (x,) = batch
        value = reconstruction_loss(model(x), x, config.loss).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return {"loss": value}

    start = time.perf_counter()
    history = fit(train_step, batches, steps, desc="autoencoder", live_plot=False)
    model.eval()
    if out is not None:
        save_checkpoint(out, {"model": model.cpu().state_dict(), "history": history.state_dict()},
                        arch=ARCH, config=to_dict(config), step=steps,
                        metrics={"train_loss": round(history.last(100)["loss"], 4)},
                        train_seconds=round(time.perf_counter() - start, 1), device=str(device),
                        command=command(MODULE, config, out=relative_path(out)))
    return model.to(device)


def load_autoencoder(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
                     ) -> Autoencoder:
    """The trained autoencoder from a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    model = Autoencoder(from_dict(AutoencoderRecipe, payload["config"]).model.latent_dim)
    load_state(model, payload["state"]["model"])
    return model.to(device).eval()


def parse_args(argv: list[str] | None = None) -> tuple[AutoencoderRecipe, argparse.Namespace]:
    return parse_recipe(AutoencoderRecipe(), "train the lecture's autoencoder", CHECKPOINT, argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    train_autoencoder(config, args.out, args.device)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
