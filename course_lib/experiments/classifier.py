"""The shipped Fashion-MNIST classifier, whose pooled features the course's FIDs use.

``python -m course_lib.experiments.classifier`` trains ``data/checkpoints/fashion_classifier.pt``.
The network, :func:`~course_lib.classifier.accuracy` and
:func:`~course_lib.classifier.load_classifier` are in :mod:`course_lib.classifier`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_lib.checkpoint import save_checkpoint
from course_lib.classifier import ARCH, CHECKPOINT, FashionClassifier, accuracy
from course_lib.data import load_fashion_mnist
from course_lib.experiments.command_line import parse_recipe
from course_lib.experiments.config import command, relative_path, to_dict
from course_lib.runtime import get_device, seed_everything
from course_lib.train import Minibatches, fit

MODULE = "course_lib.experiments.classifier"


@dataclass
class ClassifierModel:
    width: int = 32
    dropout: float = 0.3


@dataclass
class ClassifierRecipe:
    """Adam with a one-cycle schedule to ``lr``, batch 128, random horizontal flips."""
    model: ClassifierModel = field(default_factory=ClassifierModel)
    epochs: float = 8
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def cross_entropy_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       opt: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler
                       ) -> dict[str, torch.Tensor]:
    """One step of the optimizer and its schedule on the cross-entropy of the logits."""
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()
    return {"loss": loss}


def train_classifier(config: ClassifierRecipe = ClassifierRecipe(), out: str | Path = CHECKPOINT,
                     device: str | torch.device | None = None
                     ) -> tuple[FashionClassifier, float]:
    """The classifier trained and saved to ``out``; returns it and its test accuracy."""
    device = get_device(device)
    seed_everything(config.seed)
    x_train, y_train = load_fashion_mnist("train", device=device)
    x_test, y_test = load_fashion_mnist("test", device=device)
    model = FashionClassifier(config.model.width, config.model.dropout).to(device)
    batches = Minibatches(x_train, y_train, batch_size=config.batch_size, seed=config.seed)
    steps = max(1, int(config.epochs * batches.per_epoch))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)

    def train_step(batch):
        x, y = batch
        flip = torch.rand(len(x), 1, 1, 1, device=device) < 0.5
        model.train()
        return cross_entropy_step(model, torch.where(flip, x.flip(-1), x), y, opt, schedule)

    start = time.perf_counter()
    fit(train_step, batches, steps, desc="classifier", live_plot=False)
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, x_test, y_test)
    save_checkpoint(out, {"model": model.cpu().state_dict()}, arch=ARCH, config=to_dict(config),
                    step=steps, metrics={"test_accuracy": round(test_acc, 4)},
                    train_seconds=round(seconds, 1), device=str(device),
                    command=command(MODULE, config, out=relative_path(out)))
    return model.to(device), test_acc


def parse_args(argv: list[str] | None = None) -> tuple[ClassifierRecipe, argparse.Namespace]:
    return parse_recipe(ClassifierRecipe(), __doc__.splitlines()[0], CHECKPOINT, argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    _, acc = train_classifier(config, args.out, args.device)
    print(f"test accuracy {acc:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
