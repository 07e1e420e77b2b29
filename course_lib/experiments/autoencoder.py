"""The shipped autoencoders (notebook 03): Foster's recipe, with a 2-D and a 16-D latent.

``python -m course_lib.experiments.autoencoder`` trains ``data/checkpoints/autoencoder.pt``;
``--model.latent-dim 16 --out data/checkpoints/autoencoder_16.pt`` the 16-D one, and
``--epochs 5 --lr 0.0005 --out data/checkpoints/autoencoder_vae_recipe.pt`` the 2-D one with the
VAE's recipe (notebook 04 compares the two). The network and
its loss are in :mod:`course_lib.autoencoder`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.autoencoder import Autoencoder, reconstruction_loss
from course_lib.checks import check_count
from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.data import load_fashion_mnist
from course_lib.experiments.command_line import parse_recipe
from course_lib.experiments.config import command, from_dict, relative_path, to_dict
from course_lib.runtime import CHECKPOINT_DIR, get_device, seed_everything
from course_lib.train import History, Minibatches, fit

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


def autoencoder_step(model: Autoencoder, opt: torch.optim.Optimizer, x: torch.Tensor,
                     loss: str = "bce") -> dict[str, torch.Tensor]:
    """One training step: the batch mean of the per-image reconstruction loss, backpropagated,
    and one optimizer step. Returns {"loss": the batch's loss before the step}."""
    value = reconstruction_loss(model(x), x, loss).mean()
    opt.zero_grad(set_to_none=True)
    value.backward()
    opt.step()
    return {"loss": value}


def fit_autoencoder(config: AutoencoderRecipe = AutoencoderRecipe(), steps: int | None = None,
                    device: str | None = None) -> tuple[Autoencoder, History]:
    """The autoencoder trained with ``config`` on Fashion-MNIST padded to 32x32, for ``steps``
    minibatches (default: the recipe's epochs), and its loss history."""
    device = get_device(device)
    seed_everything(config.seed)
    x_train, _ = load_fashion_mnist("train", size=32, device=device)
    model = Autoencoder(config.model.latent_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = Minibatches(x_train, batch_size=config.batch_size, seed=config.seed)
    steps = steps if steps is not None else max(1, int(config.epochs * batches.per_epoch))
    check_count(steps, "steps")

    def train_step(batch):
        return autoencoder_step(model, opt, batch[0], config.loss)

    history = fit(train_step, batches, steps, desc="autoencoder", live_plot=False)
    return model.eval(), history


def train_autoencoder(config: AutoencoderRecipe = AutoencoderRecipe(),
                      out: str | Path | None = None, device: str | None = None) -> Autoencoder:
    """The autoencoder trained with the recipe ``config``; saved to ``out`` if given."""
    start = time.perf_counter()
    model, history = fit_autoencoder(config, device=device)
    if out is not None:
        steps = len(history)
        save_checkpoint(out, {"model": model.cpu().state_dict(), "history": history.state_dict()},
                        arch=ARCH, config=to_dict(config), step=steps,
                        metrics={"train_loss": round(history.last(100)["loss"], 4)},
                        train_seconds=round(time.perf_counter() - start, 1),
                        device=str(get_device(device)),
                        command=command(MODULE, config, out=relative_path(out)))
    return model.to(get_device(device))


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
