"""Flow matching on Fashion-MNIST with the shipped DDPM's network and training budget (notebook 10).

    python -m course_lib.experiments.flow train   # the flow-matching loss, resumable
    python -m course_lib.experiments.flow nfe     # FID against network evaluations, flow vs DDIM
    python -m course_lib.experiments.flow reflow  # one reflow step of the shipped model, resumable

The recipe is the DDPM's (:class:`course_lib.experiments.ddpm.DDPMRecipe`: the same U-Net, data,
batch, optimizer, warm-up, clipping, EMA and steps) with the diffusion loss replaced by
:func:`course_lib.flow_matching.flow_matching_loss`, so the two models differ only in what they
learn. The network sees t in [0, 1] as its nearest integer step (:class:`StepTimeModel`).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint, update_json
from course_lib.data import load_fashion_mnist
from course_lib.diffusion import generate
from course_lib.experiments.command_line import parse_command
from course_lib.experiments.config import add_arguments, command, from_dict, relative_path, to_dict
from course_lib.experiments.ddpm import CHECKPOINT as DDPM_CHECKPOINT
from course_lib.experiments.ddpm import UNetConfig, fashion_run, load_ddpm
from course_lib.flow_matching import StepTimeModel, flow_matching_loss, flow_sample, reflow_pairs
from course_lib.metrics import ClassifierFeatures, fid_floor, fid_from_features
from course_lib.runtime import (CHECKPOINT_DIR, DATA_DIR, RUNS_DIR, course_root, get_device,
                                seed_everything)
from course_lib.train import EMA, Minibatches, fit, make_optimizer, optimize
from course_lib.unet import UNet

MODULE = "course_lib.experiments.flow"
ARCH = "flow_unet"
CHECKPOINT = CHECKPOINT_DIR / "flow_fashion.pt"
TRAIN_STATE = RUNS_DIR / "flow_fashion" / "train.pt"
NFE_TABLE = DATA_DIR / "results" / "flow_vs_ddpm_nfe.json"
REFLOW_CHECKPOINT = CHECKPOINT_DIR / "flow_fashion_reflow.pt"
REFLOW_STATE = RUNS_DIR / "flow_fashion_reflow" / "train.pt"


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
    parts = fashion_run(config, lambda: UNet(**to_dict(config.model)), device)
    model = StepTimeModel(parts.model)

    def train_step(batch):
        parts.model.train()
        loss = flow_matching_loss(model, batch[0])
        optimize(loss, parts.model, parts.opt, parts.lr_schedule, config.grad_clip)
        return {"loss": loss}

    history = fit(train_step, parts.batches, config.steps, ema=parts.ema, checkpoint=run,
                  arch=f"{ARCH}_training", config=to_dict(config),
                  checkpoint_every=checkpoint_every, resume=resume, modules=parts.modules,
                  live_plot=live_plot, log_every=50, desc="flow matching")
    seconds = load_checkpoint(run, arch=f"{ARCH}_training")["metrics"]["train_seconds"]
    threads = torch.get_num_threads()
    save_checkpoint(out, {"ema": parts.ema.state_dict(), "history": history.state_dict()},
                    arch=ARCH, config=to_dict(config), step=config.steps,
                    metrics={"loss": round(history.last(500)["loss"], 4)},
                    train_seconds=seconds, device=str(device), threads=threads, processes=1,
                    command=command(MODULE, config, "train", out=relative_path(out),
                                    threads=threads))
    return StepTimeModel(parts.ema.model).eval()


def load_flow(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
              ) -> StepTimeModel:
    """The EMA velocity network of a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    config = from_dict(UNetConfig, payload["config"]["model"])  # a flow or a reflow recipe's
    network = UNet(**to_dict(config))
    load_state(network, payload["state"]["ema"], "ema")
    return StepTimeModel(network.to(device)).eval()


# --- FID against the number of network evaluations ---------------------------------------------

NFES = [1, 2, 4, 10, 25, 50, 100]
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "ddim": 1}


@dataclass
class NFETable:
    """FID at each number of network evaluations (NFE) for the flow checkpoint ``model`` with the
    flow ``samplers`` (Euler: 1 evaluation a step; Heun: 2, so only even NFEs) and, with
    ``"ddim"`` among them, the DDPM checkpoint ``ddpm`` with DDIM at eta = 0 on the trailing
    grid (its ODE sampler; x_0 clipped as the shipped sampler does)."""

    model: str = relative_path(CHECKPOINT)
    ddpm: str = relative_path(DDPM_CHECKPOINT)
    samplers: list[str] = field(default_factory=lambda: ["euler", "heun", "ddim"])
    nfes: list[int] = field(default_factory=lambda: list(NFES))
    samples: int = 1000
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self):
        if set(self.samplers) - set(EVALUATIONS_PER_STEP) or not self.samplers:
            raise ValueError(f"samplers must be among {list(EVALUATIONS_PER_STEP)}, got "
                             f"{self.samplers}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.nfes):
            raise ValueError(f"nfes must be positive integers, got {self.nfes}")


def row_key(checkpoint: str | Path, sampler: str, nfe: int, samples: int) -> str:
    """The table's key of a row: ``<checkpoint stem>_<sampler>_<nfe>@<samples>``."""
    return f"{Path(checkpoint).stem}_{sampler}_{nfe}@{samples}"


def flow_images(model: StepTimeModel, n: int, steps: int, sampler: str, seed: int,
                 batch_size: int, device: torch.device) -> torch.Tensor:
    """n flow samples in [-1, 1] (on CPU), batch by batch from one seeded CPU generator: the same
    starting noise as :func:`course_lib.diffusion.generate` draws for DDIM with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    shape = (model.network.in_channels, model.network.image_size, model.network.image_size)
    batches = []
    for i in range(0, n, batch_size):
        noise = torch.randn((min(batch_size, n - i), *shape), generator=generator)
        batches.append(flow_sample(model, tuple(noise.shape), steps, sampler,
                                   noise=noise.to(device)).cpu())
    return torch.cat(batches).clamp(-1, 1)


def nfe_table(table: NFETable = NFETable(), out: str | Path = NFE_TABLE,
              device: str | torch.device | None = None) -> dict:
    """FID (course classifier features, against the 10,000 Fashion-MNIST test images) and
    sampling wall time of every (sampler, NFE) of ``table`` that the sampler can reach (Heun:
    even NFEs), each merged into the JSON ``out`` as soon as it is measured, beside the FID floor
    of ``samples`` training images (computed once: a floor already in ``out`` is kept)."""
    device = get_device(device)
    features = ClassifierFeatures(device=device)
    test_features = features(load_fashion_mnist("test")[0])
    floors = read_nfe_table(out).get("floor_train_vs_test", {}) if Path(out).exists() else {}
    floor = floors.get(str(table.samples)) or round(fid_floor(
        features, load_fashion_mnist("train")[0], test_features, table.samples, table.seed), 3)
    flow_path, ddpm_path = course_root() / table.model, course_root() / table.ddpm
    flow = load_flow(flow_path, device) if {"euler", "heun"} & set(table.samplers) else None
    ddpm, schedule = load_ddpm(ddpm_path, device) if "ddim" in table.samplers else (None, None)
    for sampler in table.samplers:
        for nfe in table.nfes:
            steps, remainder = divmod(nfe, EVALUATIONS_PER_STEP[sampler])
            if remainder:
                continue
            start = time.perf_counter()
            if sampler == "ddim":
                images = generate(ddpm, schedule, table.samples, "ddim_trailing", steps,
                                  table.seed, table.batch_size, eta=0.0)
            else:
                images = flow_images(flow, table.samples, steps, sampler, table.seed,
                                      table.batch_size, device)
            seconds = time.perf_counter() - start
            checkpoint = table.ddpm if sampler == "ddim" else table.model
            threads = torch.get_num_threads()
            result = {"checkpoint": Path(checkpoint).name, "sampler": sampler, "nfe": nfe,
                      "steps": steps, "samples": table.samples,
                      "fid": round(fid_from_features(features((images + 1) / 2), test_features),
                                   3),
                      "seconds": round(seconds, 1), "device": str(device), "threads": threads,
                      "seed": table.seed,
                      "command": command(MODULE, NFETable(**{**to_dict(table),
                                                             "samplers": [sampler],
                                                             "nfes": [nfe]}),
                                         "nfe", threads=threads)}
            if sampler == "ddim":
                result |= {"eta": 0.0, "clip_x0": True, "timesteps": "trailing"}
            key = row_key(checkpoint, sampler, nfe, table.samples)

            def merge(results: dict, key: str = key, result: dict = result) -> None:
                results.setdefault("rows", {})[key] = result
                results.setdefault("floor_train_vs_test", {})[str(table.samples)] = floor
                results.update({"features": "course classifier, 128-D",
                                "reference": "Fashion-MNIST test set, 10,000 images"})

            update_json(out, merge, sort_keys=True)
            print(f"{key}: FID {result['fid']} ({seconds:.0f} s)", flush=True)
    return read_nfe_table(out)


def read_nfe_table(path: str | Path = NFE_TABLE) -> dict:
    return json.loads(Path(path).read_text())


# --- reflow --------------------------------------------------------------------------------------

PAIRS_ARCH = "flow_reflow_pairs"


@dataclass
class ReflowRecipe:
    """One reflow step (Liu et al. 2023, sec. 2.3) from the flow checkpoint ``base``: ``pairs``
    noises, each paired with the image the base model's ODE carries it to (``pair_sampler``,
    ``pair_steps`` steps; the noise is drawn with seed + 10,000, away from the NFE table's
    evaluation noise), then a copy of the base model fine-tuned on these pairs with the same
    flow-matching loss, EMA and clipping as the base recipe, at a smaller learning rate.
    ``model`` is the base checkpoint's network (checked), so that the recipe alone rebuilds it."""

    base: str = relative_path(CHECKPOINT)
    model: UNetConfig = field(default_factory=UNetConfig)
    pairs: int = 20_000
    pair_steps: int = 50
    pair_sampler: str = "heun"
    pair_batch_size: int = 500
    steps: int = 3_000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0


def _pair_settings(recipe: ReflowRecipe) -> dict:
    return {key: getattr(recipe, key) for key in ("base", "pairs", "pair_steps", "pair_sampler",
                                                  "seed")}


def reflow_data(recipe: ReflowRecipe, path: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x_0, noise) pairs of the base model's ODE (on CPU), generated batch by batch on
    ``device`` and kept in ``path``; a file made with the same settings is reused."""
    path = Path(path)
    if path.exists():
        payload = load_checkpoint(path, arch=PAIRS_ARCH)
        if payload["config"] == _pair_settings(recipe):
            return payload["state"]["x0"], payload["state"]["noise"]
    model = load_flow(course_root() / recipe.base, device)
    shape = (model.network.in_channels, model.network.image_size, model.network.image_size)
    generator = torch.Generator().manual_seed(recipe.seed + 10_000)
    images, noises = [], []
    for i in range(0, recipe.pairs, recipe.pair_batch_size):
        noise = torch.randn((min(recipe.pair_batch_size, recipe.pairs - i), *shape),
                            generator=generator)
        x0, _ = reflow_pairs(model, noise.to(device), recipe.pair_steps, recipe.pair_sampler)
        images.append(x0.cpu())
        noises.append(noise)
    x0, noise = torch.cat(images), torch.cat(noises)
    save_checkpoint(path, {"x0": x0, "noise": noise}, arch=PAIRS_ARCH,
                    config=_pair_settings(recipe), step=recipe.pairs)
    return x0, noise


def train_reflow(recipe: ReflowRecipe = ReflowRecipe(), out: str | Path = REFLOW_CHECKPOINT,
                 run: str | Path = REFLOW_STATE, device: str | torch.device | None = None,
                 resume: bool = True, checkpoint_every: int = 500, live_plot: bool | None = False
                 ) -> StepTimeModel:
    """Reflow once: the pairs (``pairs.pt`` beside ``run``), then a copy of the base network
    fine-tuned on them (the training state in ``run``, resumable); ``out`` receives the EMA
    network, loadable with :func:`load_flow`. Returns it as a velocity model."""
    device = get_device(device)
    seed_everything(recipe.seed)
    base = course_root() / recipe.base
    base_model = load_checkpoint(base, arch=ARCH)["config"]["model"]
    if base_model != to_dict(recipe.model):
        raise ValueError(f"the recipe's model {to_dict(recipe.model)} is not the network of "
                         f"{recipe.base}, {base_model}: give its --model.* settings")
    x0, noise = reflow_data(recipe, Path(run).parent / "pairs.pt", device)
    config = to_dict(recipe)
    network = load_flow(base, device).network
    model = StepTimeModel(network)
    ema = EMA(network, recipe.ema)
    opt, lr_schedule = make_optimizer(network, recipe.lr, recipe.weight_decay, recipe.warmup,
                                      recipe.steps)
    batches = Minibatches(x0.to(device), noise.to(device), batch_size=recipe.batch_size,
                          seed=recipe.seed)

    def train_step(batch):
        network.train()
        loss = flow_matching_loss(model, batch[0], noise=batch[1])
        optimize(loss, network, opt, lr_schedule, recipe.grad_clip)
        return {"loss": loss}

    history = fit(train_step, batches, recipe.steps, ema=ema, checkpoint=run,
                  arch=f"{ARCH}_reflow_training", config=config,
                  checkpoint_every=checkpoint_every, resume=resume,
                  modules={"model": network, "opt": opt, "lr_schedule": lr_schedule},
                  live_plot=live_plot, log_every=50, desc="reflow")
    seconds = load_checkpoint(run, arch=f"{ARCH}_reflow_training")["metrics"]["train_seconds"]
    threads = torch.get_num_threads()
    save_checkpoint(out, {"ema": ema.state_dict(), "history": history.state_dict()}, arch=ARCH,
                    config=config, step=recipe.steps,
                    metrics={"loss": round(history.last(500)["loss"], 4)},
                    train_seconds=seconds, device=str(device), threads=threads, processes=1,
                    command=command(MODULE, recipe, "reflow", out=relative_path(out),
                                    device=str(device), threads=threads))
    return StepTimeModel(ema.model).eval()


# --- the command line --------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the flow-matching EMA checkpoint (resumable)")
    add_arguments(train, FlowRecipe)
    train.add_argument("--out", default=str(CHECKPOINT))
    train.add_argument("--train-state", default=str(TRAIN_STATE))
    nfe = commands.add_parser("nfe", help="FID against the number of network evaluations, "
                                          f"written to {relative_path(NFE_TABLE)}")
    add_arguments(nfe, NFETable)
    nfe.add_argument("--out", default=str(NFE_TABLE))
    reflow = commands.add_parser("reflow", help="one reflow step: pairs from the flow model, "
                                                "then fine-tuning on them (resumable)")
    add_arguments(reflow, ReflowRecipe)
    reflow.add_argument("--out", default=str(REFLOW_CHECKPOINT))
    reflow.add_argument("--train-state", default=str(REFLOW_STATE))
    for sub in (train, nfe, reflow):
        sub.add_argument("--device", default=None)
        sub.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (1 leaves a core to others on a shared machine)")
    return parser


RECIPES = {"train": FlowRecipe, "nfe": NFETable, "reflow": ReflowRecipe}


def parse_args(argv: list[str] | None = None
               ) -> tuple[FlowRecipe | NFETable | ReflowRecipe, argparse.Namespace]:
    """The command line as (the full recipe or table settings, the other options)."""
    return parse_command(_parser(), RECIPES, argv)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        train_flow(config, args.out, args.train_state, args.device)
    elif args.command == "reflow":
        train_reflow(config, args.out, args.train_state, args.device)
    else:
        nfe_table(config, args.out, args.device)
        return
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
