"""Wu & He 2018, Fig. 5 in miniature (notebook 09): batch norm against group norm as the batch
shrinks, a small CNN on Fashion-MNIST.

``python -m course_lib.experiments.normalization`` reruns the experiment (18 small networks by
default, one CPU thread each, ``--jobs`` of them at once; the table records each batch size's
seconds) and writes ``data/results/normalization_batch_size.json``, which notebook 09 plots.
The normalizations and :class:`~course_lib.normalization.SmallCNN` are in
:mod:`course_lib.normalization`.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_lib.checkpoint import update_json
from course_lib.classifier import accuracy
from course_lib.data import load_fashion_mnist
from course_lib.experiments.classifier import cross_entropy_step
from course_lib.experiments.command_line import add_recipe_options
from course_lib.experiments.config import (command, override, overrides_from_args,
                                           relative_path, to_dict)
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
    size, for batch norm and group norm (``groups`` groups), once per seed in ``seeds``.
    ``width`` and ``depth`` (conv-norm-ReLU layers per stage) shape the network, ``base_lr`` is the
    learning rate at 32 images per batch."""
    batch_sizes: list[int] = field(default_factory=lambda: [32, 8, 2])
    images: int = 1_500
    epochs: float = 2
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    width: int = 16
    depth: int = 1
    groups: int = 4
    base_lr: float = 0.05


def train_at_batch_size(norm: str, batch_size: int, x_train: torch.Tensor, y_train: torch.Tensor,
                        config: BatchSizeRecipe = BatchSizeRecipe(), seed: int = 0) -> SmallCNN:
    """SGD with momentum 0.9 and Goyal et al.'s linear scaling rule, lr = base_lr * N / 32, as
    Wu & He do for their batch-size sweep; the same number of epochs at every batch size (so
    small batches take more steps), a cosine schedule to 0."""
    if batch_size < 1 or config.images < batch_size:
        raise ValueError(f"batch_size must be in 1..images={config.images}, got {batch_size}")
    seed_everything(seed)
    model = SmallCNN(norm, config.width, config.depth, config.groups).to(x_train.device)
    lr = config.base_lr * batch_size / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    batches = Minibatches(x_train[:config.images], y_train[:config.images],
                          batch_size=batch_size, seed=seed)
    steps = max(1, int(config.epochs * batches.per_epoch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    fit(lambda batch: cross_entropy_step(model, *batch, opt, schedule), batches, steps,
        desc=f"{norm} norm, batch {batch_size}, seed {seed}", live_plot=False, log_every=100)
    return model


def test_error(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test error in %, rounded to 0.01 (evaluation mode: batch norm uses its running averages)."""
    return round(100 * (1 - accuracy(model, x_test, y_test)), 2)


def mean_and_std(errors: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and sample standard deviation (ddof = 1; 0 for one seed) over the seeds of each
    batch size: ``errors[i]`` holds the errors of batch size i, one per seed."""
    means, stds = [], []
    for row in errors:
        values = torch.tensor(row, dtype=torch.float64)
        if len(values) == 0:
            raise ValueError("mean_and_std needs at least one seed per batch size")
        means.append(round(values.mean().item(), 2))
        stds.append(round(values.std().item(), 2) if len(values) > 1 else 0.0)
    return means, stds


def train_and_test(norm: str, batch_size: int, seed: int,
                   config: BatchSizeRecipe = BatchSizeRecipe(), device: str = "cpu"
                   ) -> tuple[float, float]:
    """(test error %, seconds) of one network of the table, trained on one CPU thread as every
    network of the table is (so the table does not depend on how many train at once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        x_train, y_train = load_fashion_mnist("train", device=device)
        x_test, y_test = load_fashion_mnist("test", device=device)
        model = train_at_batch_size(norm, batch_size, x_train, y_train, config, seed)
        return test_error(model, x_test, y_test), time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def _run_indexed(item: tuple[int, tuple]) -> tuple[int, tuple[float, float]]:
    return item[0], train_and_test(*item[1])


def batch_size_experiment(config: BatchSizeRecipe = BatchSizeRecipe(),
                          device: str | torch.device | None = None,
                          out: str | Path | None = None, jobs: int = 1) -> dict:
    """Test error (%) of BN and GN networks trained at each batch size and seed (Wu & He
    Fig. 5), their mean and standard deviation over the seeds, the training seconds summed
    over the seeds, and the command that reproduces them; written to ``out`` if given.
    ``jobs`` networks train at once, in separate processes (one CPU thread each)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    device = str(get_device(device))
    tasks = [(norm, b, seed, config, device) for norm in ("batch", "group")
             for b in config.batch_sizes for seed in config.seeds]
    if jobs == 1:
        done = [train_and_test(*task) for task in tasks]
    else:  # the smallest batches (the most steps) first, so no long run starts last
        order = sorted(range(len(tasks)), key=lambda i: tasks[i][1])
        done = [None] * len(tasks)
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for i, result in pool.imap_unordered(_run_indexed, [(i, tasks[i]) for i in order]):
                done[i] = result
                norm, batch_size, seed = tasks[i][:3]
                print(f"{norm} norm, batch {batch_size}, seed {seed}: test error "
                      f"{result[0]:.2f} % ({result[1]:.0f} s)", flush=True)
    results = {**to_dict(config), "test_error": {}, "mean": {}, "std": {}, "seconds": {}}
    k, width = len(config.seeds), len(config.seeds) * len(config.batch_sizes)
    for n, norm in enumerate(("batch", "group")):
        rows = [done[n * width + i * k:n * width + (i + 1) * k]
                for i in range(len(config.batch_sizes))]
        results["test_error"][norm] = [[error for error, _ in row] for row in rows]
        results["seconds"][norm] = [round(sum(s for _, s in row), 1) for row in rows]
        results["mean"][norm], results["std"][norm] = mean_and_std(results["test_error"][norm])
    results["command"] = command(MODULE, config, out=relative_path(out) if out else None)
    if out is not None:
        update_json(out, lambda table: (table.clear(), table.update(results)))
    return results


def parse_args(argv: list[str] | None = None) -> tuple[BatchSizeRecipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="Wu & He Fig. 5 in miniature")
    add_recipe_options(parser, BatchSizeRecipe, RESULTS)
    parser.add_argument("--jobs", type=int, default=1,
                        help="networks trained at once, one CPU thread each (the table does "
                             "not depend on it); default: %(default)s")
    args = parser.parse_args(argv)
    return override(BatchSizeRecipe(), overrides_from_args(args, BatchSizeRecipe)), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    results = batch_size_experiment(config, args.device, args.out, args.jobs)
    for norm in ("batch", "group"):
        print(f"{norm:>5} norm, test error % at batch {results['batch_sizes']}: mean "
              f"{results['mean'][norm]}, std {results['std'][norm]}")


if __name__ == "__main__":
    main()
