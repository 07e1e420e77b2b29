"""Time to quality: the shipped DDPM recipe on our U-Net and on diffusers' ``UNet2DModel``.

    python -m course_lib.experiments.time_to_quality train --net ours       # resumable
    python -m course_lib.experiments.time_to_quality train --net diffusers
    python -m course_lib.experiments.time_to_quality evaluate               # FID of the snapshots
    python -m course_lib.experiments.time_to_quality evaluate --debias      # ... without theta_0
    python -m course_lib.experiments.time_to_quality report                 # minutes to the FID

``train`` runs :class:`~course_lib.experiments.ddpm.DDPMRecipe` (the same data, batch, optimizer,
schedule, EMA, steps and seed) on one network and keeps the EMA network every ``every`` steps
under ``runs/time_to_quality/<net>/``. ``evaluate`` gives each snapshot the shipped model's FID
row: 1,000 DDIM-50 samples (x_0 clipped) from seed 0, course classifier features, against the
test set; with ``--debias`` the snapshot is first rid of the EMA's memory of the initial
weights (:func:`~course_lib.train.debiased_ema`), which the trained weights do not change, so
no run trains again. ``report`` times one training step of each network on this machine, the two
alternating (:func:`~course_lib.experiments.benchmark.paired`), and turns "steps until the FID is
at most the shipped model's" into CPU minutes. Training under load or on another thread count
changes no step count, only wall time, which is why the minutes come from the paired timing and
not from the training runs' clocks.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint, update_json
from course_lib.data import load_fashion_mnist
from course_lib.diffusion import diffusion_loss, generate, make_schedule
from course_lib.experiments.benchmark import PEER_WIDTHS, diffusers_unet, paired
from course_lib.experiments.command_line import parse_command
from course_lib.experiments.config import add_arguments, command, relative_path, to_dict
from course_lib.experiments.ddpm import FID_TABLE, DDPMRecipe, algorithm_1_step, fashion_run
from course_lib.metrics import ClassifierFeatures, fid_from_features
from course_lib.runtime import DATA_DIR, RUNS_DIR, get_device
from course_lib.train import debiased_ema, fit, make_optimizer, optimize
from course_lib.unet import UNet

MODULE = "course_lib.experiments.time_to_quality"
RESULTS = DATA_DIR / "results" / "time_to_quality.json"
RUN_DIR = RUNS_DIR / "time_to_quality"
NETS = ("ours", "diffusers")
FID_KEYS = {False: "fid", True: "fid_debiased"}  # the EMA as trained, and debiased
SHIPPED_ROW = "ddim_50@1000"


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` (widths ``widths``) behind the course U-Net's interface:
    eps_theta(x_t, t) from integer steps t [B], with ``in_channels``, ``image_size`` and
    ``num_steps`` for the samplers' checks."""

    def __init__(self, image_size: int, num_steps: int, widths: tuple[int, ...]):
        super().__init__()
        self.net = diffusers_unet(image_size, widths)
        self.in_channels, self.image_size, self.num_steps = 1, image_size, num_steps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


@dataclass
class TimeToQuality:
    """The recipe both networks train with, the widths of the peer ``UNet2DModel`` (the
    default, 32/40/40, is the one closest in size to the recipe's U-Net among those that start
    at width 32 and widen with depth), how often the EMA network is kept, the FID evaluation of
    the shipped model's row (``samples`` DDIM-``ddim_steps`` images from ``seed``) and the FID
    levels the report times besides the shipped model's."""

    recipe: DDPMRecipe = field(default_factory=DDPMRecipe)
    peer_widths: list[int] = field(default_factory=lambda: list(PEER_WIDTHS))
    every: int = 500
    samples: int = 1000
    ddim_steps: int = 50
    seed: int = 0
    timing_repeats: int = 5
    levels: list[float] = field(default_factory=lambda: [20.0, 10.0, 6.5])

    def __post_init__(self):
        if len(self.peer_widths) != 3 or any(w <= 0 or w % 8 for w in self.peer_widths):
            raise ValueError(f"peer_widths must be three widths, each a positive multiple of 8 "
                             f"(the peer's GroupNorm has 8 groups), got {self.peer_widths}")


def build(net: str, config: TimeToQuality) -> nn.Module:
    model = config.recipe.model
    if net == "ours":
        return UNet(**to_dict(model))
    if net == "diffusers":
        return DiffusersUNet(model.image_size, model.num_steps, tuple(config.peer_widths))
    raise ValueError(f"net must be one of {NETS}, got {net!r}")


def initial_weights(net: str, config: TimeToQuality) -> dict[str, torch.Tensor]:
    """The weights ``train`` starts ``net`` from: :func:`fashion_run`'s, from the recipe's seed."""
    return fashion_run(config.recipe, lambda: build(net, config),
                       torch.device("cpu")).model.state_dict()


def snapshot_path(net: str, step: int, run_dir: Path = RUN_DIR) -> Path:
    return Path(run_dir) / net / f"ema_{step:05d}.pt"


def train(net: str, config: TimeToQuality = TimeToQuality(), run_dir: str | Path = RUN_DIR,
          device: str | torch.device | None = None) -> None:
    """The DDPM recipe on ``net`` (as :func:`~course_lib.experiments.ddpm.train_ddpm` runs it, in
    the same order, so ``ours`` retraces the shipped model), the EMA network saved every
    ``config.every`` steps. A killed run resumes from its last snapshot."""
    recipe = config.recipe
    parts = fashion_run(recipe, lambda: build(net, config), get_device(device))
    train_step = algorithm_1_step(parts, make_schedule(recipe.schedule, recipe.model.num_steps),
                                  recipe)
    state = Path(run_dir) / net / "train.pt"
    for end in range(config.every, recipe.steps + 1, config.every):
        if snapshot_path(net, end, run_dir).exists():
            continue
        history = fit(train_step, parts.batches, end, ema=parts.ema, checkpoint=state,
                      arch=f"time_to_quality_{net}_training", config=to_dict(config),
                      resume=True, modules=parts.modules, log_every=50, desc=f"{net} to {end}")
        save_checkpoint(snapshot_path(net, end, run_dir), {"ema": parts.ema.state_dict()},
                        arch=f"time_to_quality_{net}", config=to_dict(config), step=end,
                        metrics={"loss": round(history.last(500)["loss"], 4)},
                        threads=torch.get_num_threads())


def evaluate(config: TimeToQuality = TimeToQuality(), nets: tuple[str, ...] = NETS,
             stride: int = 1, run_dir: str | Path = RUN_DIR, out: str | Path = RESULTS,
             steps: list[int] | None = None, debias: bool = False) -> dict:
    """FID of every ``stride``-th snapshot (or of those at ``steps``) of each net not yet in
    ``out`` (merged row by row, so that two processes can evaluate the two nets); with
    ``debias``, of the snapshot without the initial weights' share, under ``"fid_debiased"``."""
    key = FID_KEYS[debias]
    schedule = make_schedule(config.recipe.schedule, config.recipe.model.num_steps)
    features = ClassifierFeatures()
    test_features = features(load_fashion_mnist("test")[0])
    done = json.loads(Path(out).read_text()).get(key, {}) if Path(out).exists() else {}
    for net in nets:
        initial = initial_weights(net, config) if debias else None
        snapshots = sorted((Path(run_dir) / net).glob("ema_*.pt"))
        for path in snapshots[stride - 1::stride] if steps is None else snapshots:
            step = int(path.stem.split("_")[1])
            if str(step) in done.get(net, {}) or (steps is not None and step not in steps):
                continue
            model = build(net, config)
            ema = load_checkpoint(path)["state"]["ema"]
            if debias:
                ema = debiased_ema(ema, initial, config.recipe.ema, step)
            load_state(model, ema, "ema")
            images = generate(model.eval(), schedule, config.samples, "ddim", config.ddim_steps,
                              config.seed, clip=True)
            fid = round(fid_from_features(features((images + 1) / 2), test_features), 3)
            print(f"{net} step {step}{' (debiased EMA)' * debias}: FID {fid}")
            update_json(out, lambda table, net=net, step=step, fid=fid: table.setdefault(
                key, {}).setdefault(net, {}).update({str(step): fid}))
    return json.loads(Path(out).read_text())


def seconds_per_step(config: TimeToQuality) -> dict[str, float]:
    """Best-of-``timing_repeats`` seconds of one training step (the recipe's loss, backward,
    clipping and AdamW, batch ``recipe.batch_size``) of each net, the two alternating."""
    recipe = config.recipe
    schedule = make_schedule(recipe.schedule, recipe.model.num_steps)
    x0 = torch.randn(recipe.batch_size, 1, recipe.model.image_size, recipe.model.image_size)

    def steps(net: str):
        torch.manual_seed(recipe.seed)
        model = build(net, config).train()
        opt, lr_schedule = make_optimizer(model, recipe.lr, recipe.weight_decay, recipe.warmup,
                                          recipe.steps)

        def run(n: int = 5):
            for _ in range(n):
                optimize(diffusion_loss(model, schedule, x0, recipe.prediction), model, opt,
                         lr_schedule, recipe.grad_clip)
        return run

    ours, theirs = paired(steps("ours"), steps("diffusers"), config.timing_repeats)
    return {"ours": ours / 5, "diffusers": theirs / 5}


def steps_to(fids: dict[str, float], target: float) -> tuple[int | None, float | None]:
    """(the first evaluated step whose FID is at most ``target``, the step where the FID
    crosses it, interpolated linearly in log FID from the evaluation before); (None, None) if
    no evaluation reaches it."""
    points = sorted((int(step), fid) for step, fid in fids.items())
    for i, (step, fid) in enumerate(points):
        if fid <= target:
            if i == 0:
                return step, float(step)
            (step0, fid0) = points[i - 1]
            share = (math.log(fid0) - math.log(target)) / (math.log(fid0) - math.log(fid))
            return step, step0 + share * (step - step0)
    return None, None


def time_to_levels(fids: dict[str, dict[str, float]], levels: list[float], target: float,
                   timing: dict[str, float]) -> list[dict]:
    """For each FID level (and the shipped model's, ``target``), each net's steps and CPU
    minutes until its FID is at most that level, and the ratio of the minutes (diffusers' over
    ours)."""
    rows = []
    for level in sorted({*levels, target}, reverse=True):
        row = {"fid": level, "shipped": level == target}
        for net in NETS:
            first, crossing = steps_to(fids.get(net, {}), level)
            row[net] = {"first_step": first,
                        "steps": None if crossing is None else round(crossing),
                        "minutes": None if crossing is None
                        else round(crossing * timing[net] / 60, 1)}
        minutes = [row[net]["minutes"] for net in NETS]
        row["speedup"] = None if None in minutes else round(minutes[1] / minutes[0], 3)
        rows.append(row)
    return rows


def report(config: TimeToQuality = TimeToQuality(), out: str | Path = RESULTS) -> dict:
    """Seconds per step of each net and :func:`time_to_levels` of the FID levels of
    ``config.levels`` and the shipped model's (``ddim_50@1000`` of the shipped FID table): for
    the EMA snapshots as trained (``levels``) and debiased (``levels_debiased``), each where
    ``out`` has its evaluations (a candidate network may have the debiased ones only)."""
    target = json.loads(FID_TABLE.read_text())["rows"][SHIPPED_ROW]["fid"]
    table = json.loads(Path(out).read_text())
    timing = seconds_per_step(config)
    summary = {"target_fid": target, "target": f"the shipped DDPM's {SHIPPED_ROW} FID",
               "threads": torch.get_num_threads(),
               "seconds_per_step": {net: round(timing[net], 4) for net in NETS},
               "speedup_per_step": round(timing["diffusers"] / timing["ours"], 3),
               "config": to_dict(config),
               "commands": {
                   "train": [command(MODULE, config, "train", net=net) for net in NETS],
                   "evaluate": command(MODULE, config, "evaluate", out=relative_path(out)),
                   "evaluate_debiased": command(MODULE, config, "evaluate", "--debias",
                                                out=relative_path(out)),
                   "report": command(MODULE, config, "report", out=relative_path(out),
                                     threads=torch.get_num_threads())}}
    for debias, name in ((False, "levels"), (True, "levels_debiased")):
        if FID_KEYS[debias] in table:
            summary[name] = time_to_levels(table[FID_KEYS[debias]], config.levels, target, timing)
    update_json(out, lambda t: t.update(summary))
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[TimeToQuality, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "evaluate", "report"):
        sub = commands.add_parser(name)
        add_arguments(sub, TimeToQuality)
        sub.add_argument("--threads", type=int, default=None)
        sub.add_argument("--run-dir", default=str(RUN_DIR))
        if name == "train":
            sub.add_argument("--net", choices=NETS, required=True)
            sub.add_argument("--device", default=None)
        else:
            sub.add_argument("--out", default=str(RESULTS))
        if name == "evaluate":
            sub.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
            sub.add_argument("--stride", type=int, default=1,
                             help="evaluate every stride-th snapshot (default: %(default)s)")
            sub.add_argument("--steps", type=int, nargs="+", default=None,
                             help="evaluate the snapshots of these steps only")
            sub.add_argument("--debias", action="store_true",
                             help="remove the initial weights' share from each EMA snapshot "
                                  "(course_lib.train.debiased_ema)")
    return parse_command(parser, dict.fromkeys(("train", "evaluate", "report"), TimeToQuality),
                         argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args.net, config, args.run_dir, args.device)
    elif args.command == "evaluate":
        evaluate(config, tuple(args.nets), args.stride, args.run_dir, args.out, args.steps,
                 args.debias)
    else:
        print(json.dumps(report(config, args.out), indent=1))


if __name__ == "__main__":
    main()
