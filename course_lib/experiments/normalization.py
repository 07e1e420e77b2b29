"""Wu & He 2018, Fig. 5 in miniature (notebook 09): batch norm against group norm as the batch
shrinks, a small CNN on Fashion-MNIST.

``python -m course_lib.experiments.normalization`` reruns the experiment (about 11 minutes on a
2-core CPU) and writes ``data/results/normalization_batch_size.json``, which notebook 09 plots.
The normalizations and :class:`~course_lib.normalization.SmallCNN` are in
:mod:`course_lib.normalization`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.checkpoint import update_json
from course_lib.classifier import accuracy
from course_lib.data import load_fashion_mnist
from course_lib.experiments.classifier import cross_entropy_step
from course_lib.experiments.command_line import parse_recipe
from course_lib.experiments.config import command, relative_path, to_dict
from course_lib.normalization import SmallCNN
from course_lib.runtime import DATA_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit

MODULE = "course_lib.experiments.normalization"
RESULTS = DATA_DIR / "results" / "normalization_batch_size.json"
BATCH_SIZES = (32, 16, 8, 4, 2)
# Wu & He 2018, Fig. 5: ResNet-50 ImageNet top-1 error (%) at 32/16/8/4/2 images per GPU.
PAPER_ERROR = {"batch": [23.6, 23.7, 24.8, 27.3, 34.7], "group": [24.1, 24.2, 24.0, 24.2, 24.1]}


@dataclass
class BatchSizeRecipe:
    """The sweep: the same ``epochs`` over the first ``images`` training images at each batch
    size, for batch norm and group norm."""
    batch_sizes: list[int] = field(default_factory=lambda: list(BATCH_SIZES))
    images: int = 12_000
    epochs: float = 4
    seed: int = 0


def train_at_batch_size(norm: str, batch_size: int, images: int, epochs: float,
                        x_train: torch.Tensor, y_train: torch.Tensor, seed: int = 0,
                        base_lr: float = 0.05) -> SmallCNN:
    """SGD with momentum 0.9 and Goyal et al.'s linear scaling rule, lr = base_lr * N / 32, as
    Wu & He do for their batch-size sweep; the same number of epochs at every batch size."""
    seed_everything(seed)
    model = SmallCNN(norm).to(x_train.device)
    lr = base_lr * batch_size / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    batches = Minibatches(x_train[:images], y_train[:images], batch_size=batch_size, seed=seed)
    steps = max(1, int(epochs * batches.per_epoch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    fit(lambda batch: cross_entropy_step(model, *batch, opt, schedule), batches, steps,
        desc=f"{norm} norm, batch {batch_size}", live_plot=False, log_every=100)
    return model


def batch_size_experiment(config: BatchSizeRecipe = BatchSizeRecipe(),
                          device: str | torch.device | None = None,
                          out: str | Path | None = None) -> dict:
    """Test error (%) and training seconds of BN and GN networks trained at each batch size
    (Wu & He Fig. 5), with the command that reproduces them; written to ``out`` if given."""
    device = get_device(device)
    x_train, y_train = load_fashion_mnist("train", device=device)
    x_test, y_test = load_fashion_mnist("test", device=device)
    results = {**to_dict(config), "test_error": {}, "seconds": {}}
    for norm in ("batch", "group"):
        errors, seconds = [], []
        for batch_size in config.batch_sizes:
            start = time.perf_counter()
            model = train_at_batch_size(norm, batch_size, config.images, config.epochs,
                                        x_train, y_train, config.seed)
            errors.append(round(100 * (1 - accuracy(model, x_test, y_test)), 2))
            seconds.append(round(time.perf_counter() - start, 1))
        results["test_error"][norm], results["seconds"][norm] = errors, seconds
    results["command"] = command(MODULE, config, out=relative_path(out) if out else None)
    if out is not None:
        update_json(out, lambda table: (table.clear(), table.update(results)))
    return results


def parse_args(argv: list[str] | None = None) -> tuple[BatchSizeRecipe, argparse.Namespace]:
    return parse_recipe(BatchSizeRecipe(), "Wu & He Fig. 5 in miniature", RESULTS, argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    results = batch_size_experiment(config, args.device, args.out)
    for norm in ("batch", "group"):
        print(f"{norm:>5} norm, test error % at batch {results['batch_sizes']}: "
              f"{results['test_error'][norm]}")


if __name__ == "__main__":
    main()
