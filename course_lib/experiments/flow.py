"""Flow matching on Fashion-MNIST with the shipped DDPM's network and training budget (notebook 10).

    python -m course_lib.experiments.flow train   # the flow-matching loss, resumable

The recipe is the DDPM's (:class:`course_lib.experiments.ddpm.DDPMRecipe`: the same U-Net, data,
batch, optimizer, warm-up, clipping, EMA and steps) with the diffusion loss replaced by
:func:`course_lib.flow_matching.flow_matching_loss`, so the two models differ only in what they
learn. The network sees t in [0, 1] as its nearest integer step (:class:`StepTimeModel`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.data import load_fashion_mnist
from course_lib.experiments.config import (add_arguments, command, from_dict, override,
                                           overrides_from_args, relative_path, to_dict)
from course_lib.experiments.ddpm import UNetConfig
from course_lib.flow_matching import StepTimeModel, flow_matching_loss
from course_lib.runtime import CHECKPOINT_DIR, RUNS_DIR, get_device, seed_everything
from course_lib.train import EMA, Minibatches, fit, make_optimizer, optimize
from course_lib.unet import UNet

MODULE = "course_lib.experiments.flow"
ARCH = "flow_unet"
CHECKPOINT = CHECKPOINT_DIR / "flow_fashion.pt"
TRAIN_STATE = RUNS_DIR / "flow_fashion" / "train.pt"


@dataclass
class FlowRecipe:
    """The DDPM recipe's budget and optimizer, trained on the flow-matching loss."""

    model: UNetConfig = field(default_factory=UNetConfig)
    steps: int = 6_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0


def train_flow(config: FlowRecipe = FlowRecipe(), out: str | Path = CHECKPOINT,
               run: str | Path = TRAIN_STATE, device: str | torch.device | None = None,
               resume: bool = True, checkpoint_every: int = 500, live_plot: bool | None = False
               ) -> StepTimeModel:
    """Flow matching on Fashion-MNIST in [-1, 1]; the training state goes to ``run`` every
    ``checkpoint_every`` steps, ``out`` receives the EMA network. Returns it as a velocity model."""
    device = get_device(device)
    seed_everything(config.seed)
    x_train, _ = load_fashion_mnist("train", size=config.model.image_size, value_range=(-1, 1),
                                    device=device)
    network = UNet(**to_dict(config.model)).to(device)
    model = StepTimeModel(network)
    ema = EMA(network, config.ema)
    opt, lr_schedule = make_optimizer(network, config.lr, config.weight_decay, config.warmup,
                                      config.steps)
    batches = Minibatches(x_train, batch_size=config.batch_size, seed=config.seed)

    def train_step(batch):
        network.train()
        loss = flow_matching_loss(model, batch[0])
        optimize(loss, network, opt, lr_schedule, config.grad_clip)
        return {"loss": loss}

    history = fit(train_step, batches, config.steps, ema=ema, checkpoint=run,
                  arch=f"{ARCH}_training", config=to_dict(config),
                  checkpoint_every=checkpoint_every, resume=resume,
                  modules={"model": network, "opt": opt, "lr_schedule": lr_schedule},
                  live_plot=live_plot, log_every=50, desc="flow matching")
    seconds = load_checkpoint(run, arch=f"{ARCH}_training")["metrics"]["train_seconds"]
    threads = torch.get_num_threads()
    save_checkpoint(out, {"ema": ema.state_dict(), "history": history.state_dict()}, arch=ARCH,
                    config=to_dict(config), step=config.steps,
                    metrics={"loss": round(history.last(500)["loss"], 4)},
                    train_seconds=seconds, device=str(device), threads=threads, processes=1,
                    command=command(MODULE, config, "train", out=relative_path(out),
                                    threads=threads))
    return StepTimeModel(ema.model).eval()


def load_flow(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
              ) -> StepTimeModel:
    """The EMA velocity network of a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    config = from_dict(FlowRecipe, payload["config"])
    network = UNet(**to_dict(config.model))
    load_state(network, payload["state"]["ema"], "ema")
    return StepTimeModel(network.to(device)).eval()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the flow-matching EMA checkpoint (resumable)")
    add_arguments(train, FlowRecipe)
    train.add_argument("--out", default=str(CHECKPOINT))
    train.add_argument("--train-state", default=str(TRAIN_STATE))
    train.add_argument("--device", default=None)
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (1 leaves a core to others on a shared machine)")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[FlowRecipe, argparse.Namespace]:
    """The command line as (the full recipe, the other options)."""
    args = _parser().parse_args(argv)
    return override(FlowRecipe(), overrides_from_args(args, FlowRecipe)), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_flow(config, args.out, args.train_state, args.device)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
