"""The shipped DDPM on Fashion-MNIST: its recipe, its training run and its sampler table.

    python -m course_lib.experiments.ddpm train   # Algorithm 1, resumable, torchrun-ready
    python -m course_lib.experiments.ddpm fid     # FID and wall time of DDPM-1000 and DDIM-k

The algorithms are in :mod:`course_lib.diffusion` (schedules, loss, steps, sampler) and
:mod:`course_lib.unet` (the network); this module only runs them.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_lib import distributed
from course_lib.checkpoint import (load_checkpoint, load_state, record_metrics, save_checkpoint,
                                   update_json)
from course_lib.data import load_fashion_mnist
from course_lib.diffusion import NoiseSchedule, diffusion_loss, generate, make_schedule
from course_lib.experiments.config import (add_arguments, command, from_dict, override,
                                           overrides_from_args, relative_path, to_dict)
from course_lib.metrics import ClassifierFeatures, fid_floor, fid_from_features
from course_lib.runtime import CHECKPOINT_DIR, RUNS_DIR, get_device, seed_everything
from course_lib.train import EMA, Minibatches, fit, make_optimizer, optimize
from course_lib.unet import UNet

MODULE = "course_lib.experiments.ddpm"
ARCH = "ddpm_unet"
CHECKPOINT = CHECKPOINT_DIR / "ddpm_fashion.pt"
FID_TABLE = CHECKPOINT_DIR / "ddpm_fashion_fid.json"
TRAIN_STATE = RUNS_DIR / "ddpm_fashion" / "train.pt"


@dataclass
class UNetConfig:
    """The settings of :class:`course_lib.unet.UNet` the recipe fixes (0.51M parameters)."""

    base: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    depth: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [7, 8])
    image_size: int = 28
    dropout: float = 0.0
    num_steps: int = 1000
    adaptive_norm: bool = False


@dataclass
class DDPMRecipe:
    """Ho et al.'s recipe at CPU scale: eps-prediction on the cosine schedule, AdamW with
    warm-up and cosine decay, gradient clipping at 1, an EMA of the weights."""

    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: str = "cosine"
    prediction: str = "epsilon"
    steps: int = 6_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0


@dataclass
class FashionRun:
    """What a recipe on Fashion-MNIST trains: the network, its EMA, AdamW with warm-up and cosine
    decay, and the minibatches of the training set in [-1, 1]."""

    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    batches: Minibatches

    @property
    def modules(self) -> dict[str, object]:
        """The state :func:`~course_lib.train.fit` saves and resumes besides the EMA."""
        return {"model": self.model, "opt": self.opt, "lr_schedule": self.lr_schedule}


def fashion_run(recipe: DDPMRecipe, build: Callable[[], nn.Module],
                device: torch.device) -> FashionRun:
    """The set-up the DDPM, flow-matching and time-to-quality runs share, in one order: the seed,
    then the network ``build`` makes (its initial weights), then the optimizer and batches.
    ``recipe`` is a :class:`DDPMRecipe` or a recipe with its budget and optimizer fields."""
    seed_everything(recipe.seed)
    x_train, _ = load_fashion_mnist("train", size=recipe.model.image_size, value_range=(-1, 1),
                                    device=device)
    model = build().to(device)
    opt, lr_schedule = make_optimizer(model, recipe.lr, recipe.weight_decay, recipe.warmup,
                                      recipe.steps)
    return FashionRun(model, EMA(model, recipe.ema), opt, lr_schedule,
                      Minibatches(x_train, batch_size=recipe.batch_size, seed=recipe.seed))


def algorithm_1_step(run: FashionRun, schedule: NoiseSchedule, recipe: DDPMRecipe
                     ) -> Callable[[tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]:
    """One step of Algorithm 1 on a batch, for :func:`~course_lib.train.fit`. Under torchrun
    each rank takes its shard of the global batch; alone, the whole batch."""
    net = distributed.wrap(run.model)

    def train_step(batch):
        run.model.train()
        x0 = batch[0]  # the global batch; every rank draws the same t and noise for it
        t = torch.randint(0, schedule.T, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        loss = diffusion_loss(net, schedule, distributed.shard(x0), recipe.prediction,
                              t=distributed.shard(t), noise=distributed.shard(noise))
        optimize(loss, run.model, run.opt, run.lr_schedule, recipe.grad_clip)
        return {"loss": distributed.mean_over_ranks(loss)}

    return train_step


def train_ddpm(config: DDPMRecipe = DDPMRecipe(), out: str | Path = CHECKPOINT,
               run: str | Path = TRAIN_STATE, device: str | torch.device | None = None,
               resume: bool = True, checkpoint_every: int = 500, live_plot: bool | None = False
               ) -> tuple[UNet, NoiseSchedule]:
    """Algorithm 1 on Fashion-MNIST in [-1, 1]. The training state goes to ``run`` every
    ``checkpoint_every`` steps (a killed run resumes from there); ``out`` receives the EMA
    network only. Under torchrun each rank trains on its shard of the global batch. Returns the
    EMA network and the schedule."""
    device = distributed.local_device(get_device(device))
    distributed.init(device)
    parts = fashion_run(config, lambda: UNet(**to_dict(config.model)), device)
    schedule = make_schedule(config.schedule, config.model.num_steps)
    history = fit(algorithm_1_step(parts, schedule, config), parts.batches, config.steps,
                  ema=parts.ema, checkpoint=run, arch=f"{ARCH}_training", config=to_dict(config),
                  checkpoint_every=checkpoint_every, resume=resume, modules=parts.modules,
                  live_plot=live_plot, log_every=50, desc="DDPM")
    distributed.check_in_sync(parts.model)
    if distributed.is_main():
        seconds = load_checkpoint(run, arch=f"{ARCH}_training")["metrics"]["train_seconds"]
        threads = torch.get_num_threads()
        save_checkpoint(out, {"ema": parts.ema.state_dict(), "history": history.state_dict()},
                        arch=ARCH, config=to_dict(config), step=config.steps,
                        metrics={"loss": round(history.last(500)["loss"], 4)},
                        train_seconds=seconds, device=str(device), threads=threads,
                        processes=distributed.world_size(),
                        command=command(MODULE, config, "train", out=relative_path(out),
                                        threads=threads))
    return parts.ema.model.eval(), schedule


def load_ddpm(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
              ) -> tuple[UNet, NoiseSchedule]:
    """The EMA network of a verified checkpoint (eval mode) and the schedule it was trained
    with."""
    payload = load_checkpoint(path, arch=ARCH)
    config = from_dict(DDPMRecipe, payload["config"])
    model = UNet(**to_dict(config.model))
    load_state(model, payload["state"]["ema"], "ema")
    return (model.to(device).eval(), make_schedule(config.schedule, config.model.num_steps))


# --- the sampler table -------------------------------------------------------------------------

TABLE_ROWS = {"ddpm_1000": ("ddpm", None), "ddim_10": ("ddim", 10), "ddim_25": ("ddim", 25),
              "ddim_50": ("ddim", 50), "ddim_100": ("ddim", 100)}


@dataclass
class FIDTable:
    """Which rows of the sampler table to compute, at how many samples, and whether the sampler
    clips its x_0 estimate to [-1, 1] (the shipped sampler does; Algorithm 2 as printed does
    not: ``--no-clip`` rows are keyed ``<row>_unclipped@<samples>``)."""

    rows: list[str] = field(default_factory=lambda: [*TABLE_ROWS, "large"])
    samples: int = 1000
    large_samples: int = 10_000
    large_row: str = "ddim_50"
    clip: bool = True
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.rows) - {*TABLE_ROWS, "large"}
        if unknown or self.large_row not in TABLE_ROWS:
            raise ValueError(f"rows must be among {[*TABLE_ROWS, 'large']} and large_row among "
                             f"{list(TABLE_ROWS)}, got rows {self.rows}, large_row "
                             f"{self.large_row!r}")


def _floor(features: ClassifierFeatures, test_features: torch.Tensor, sizes: set[int],
           seed: int) -> dict[str, float]:
    """FID of n training images against the test set, for each n: the best a model can score."""
    x_train, _ = load_fashion_mnist("train")
    return {str(n): round(fid_floor(features, x_train, test_features, n, seed), 3)
            for n in sorted(sizes)}


def fid_table(table: FIDTable = FIDTable(), path: str | Path = CHECKPOINT,
              out: str | Path = FID_TABLE) -> dict:
    """FID (course classifier features, against the 10,000 Fashion-MNIST test images) and
    sampling wall time of the checkpoint for each of ``table.rows`` (each at ``samples``
    images; ``"large"`` is ``large_row`` at ``large_samples``), with x_0 clipped or not as
    ``table.clip`` says (each row records it as ``clip_x0``). Each finished row is merged into
    the JSON ``out`` at once, under a lock, so several processes can share the work."""
    model, schedule = load_ddpm(path)
    features = ClassifierFeatures()
    test_features = features(load_fashion_mnist("test")[0])
    floor = _floor(features, test_features, {table.samples, table.large_samples}, table.seed)
    for row in table.rows:
        name, n = (table.large_row, table.large_samples) if row == "large" else (row,
                                                                                 table.samples)
        sampler, steps = TABLE_ROWS[name]
        start = time.perf_counter()
        images = generate(model, schedule, n, sampler, steps, table.seed, clip=table.clip)
        seconds = time.perf_counter() - start
        threads = torch.get_num_threads()
        result = {"sampler": sampler.upper(), "steps": steps or schedule.T, "samples": n,
                  "clip_x0": table.clip,
                  "fid": round(fid_from_features(features((images + 1) / 2), test_features), 3),
                  "seconds": round(seconds, 1), "threads": threads, "seed": table.seed,
                  "command": command(MODULE, FIDTable(**{**to_dict(table), "rows": [row]}),
                                     "fid", threads=threads)}
        key = f"{name}{'' if table.clip else '_unclipped'}@{n}"

        def merge(results: dict, key: str = key, result: dict = result) -> None:
            rows = results.setdefault("rows", {})
            clipped_before = results.pop("clip_x0", True)  # tables from before clip was per row
            for earlier in rows.values():
                earlier.setdefault("clip_x0", clipped_before)
            rows[key] = result
            results.setdefault("floor_train_vs_test", {}).update(floor)
            results.update({"checkpoint": Path(path).name,
                            "features": "course classifier, 128-D",
                            "reference": "Fashion-MNIST test set, 10,000 images",
                            "ddpm_variance": "beta"})

        update_json(out, merge, sort_keys=True)
        print(f"{key}: FID {result['fid']}, {seconds:.0f} s")
    return read_fid_table(out)


def read_fid_table(path: str | Path = FID_TABLE) -> dict:
    return json.loads(Path(path).read_text())


def record_fid(path: str | Path = CHECKPOINT, table_path: str | Path = FID_TABLE) -> None:
    """Copy the table's FIDs into the checkpoint's manifest metrics (the file is left as is)."""
    rows = read_fid_table(table_path)["rows"].values()
    record_metrics(path, {f"fid_{row['samples']}_{row['sampler'].lower()}{row['steps']}"
                          f"{'' if row.get('clip_x0', True) else '_unclipped'}": row["fid"]
                          for row in rows})


# --- the command line --------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split(
        "\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the shipped EMA checkpoint (resumable)")
    add_arguments(train, DDPMRecipe)
    train.add_argument("--out", default=str(CHECKPOINT))
    train.add_argument("--train-state", default=str(TRAIN_STATE),
                       help="the resumable training state (torchrun reserves --run...)")
    train.add_argument("--device", default=None)
    table = commands.add_parser("fid", help="FID and wall time of DDPM-1000 and DDIM-10/25/50/"
                                            f"100, written to {relative_path(FID_TABLE)}")
    add_arguments(table, FIDTable)
    table.add_argument("--record", action="store_true",
                       help="only copy the table's FIDs into the checkpoint's manifest metrics")
    for sub in (train, table):
        sub.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (1 leaves a core to others on a shared machine)")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[DDPMRecipe | FIDTable, argparse.Namespace]:
    """The command line as (the full recipe or table settings, the other options)."""
    args = _parser().parse_args(argv)
    cls = DDPMRecipe if args.command == "train" else FIDTable
    return override(cls(), overrides_from_args(args, cls)), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        train_ddpm(config, args.out, args.train_state, args.device)
        if distributed.is_main():
            print(f"saved {args.out} ({distributed.world_size()} process(es))")
        distributed.finish()
    elif args.record:
        record_fid()
    else:
        fid_table(config)


if __name__ == "__main__":
    main()
