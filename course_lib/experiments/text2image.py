"""The shipped text-to-image cascades: their recipes, training runs, checkpoints and evaluation.

    python -m course_lib.experiments.text2image train fashion base --encoder minilm
    python -m course_lib.experiments.text2image train shapes sr   # resumable from runs/
    python -m course_lib.experiments.text2image evaluate --per-class 50 --shapes-n 200

Six stages ship (:data:`STAGES`): for Fashion-MNIST and the shapes, a 16x16 base model and a
16 -> 32 super-resolution model on the frozen MiniLM encoder, and a base model whose text
encoder learns from scratch. The networks, guidance and sampling are in
:mod:`course_lib.imagen`, the text encoders in :mod:`course_lib.text`; the prompt checkers and
the evaluation table in :mod:`course_lib.experiments.text2image_eval`.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint, update_json
from course_lib.data import load_fashion_mnist
from course_lib.data.shapes import describe, make_shapes
from course_lib.diffusion import NoiseSchedule, diffusion_loss, make_schedule
from course_lib.experiments.config import (ConfigError, add_arguments, command, from_dict, override,
                                           overrides_from_args, relative_path, to_dict)
from course_lib.experiments.ddpm import UNetConfig
from course_lib.experiments.text2image_eval import (EVAL_TABLE, SHAPES_HELDOUT_TEMPLATE,
                                                    Text2ImageEvaluation, evaluate, record_quality,
                                                    shapes_heldout)
from course_lib.imagen import (MAX_TRAIN_AUG_LEVEL, P_UNCOND, TextUNet, augment_low_res,
                               conditioning_dropout)
from course_lib.runtime import CHECKPOINT_DIR, RUNS_DIR, get_device, seed_everything
from course_lib.text import FASHION_PHRASES, TEMPLATES, FrozenTextEncoder, ScratchTextEncoder
from course_lib.train import EMA, Minibatches, fit, make_optimizer, optimize
from course_lib.unet import check_sizes

MODULE = "course_lib.experiments.text2image"
ARCH = "text_unet"
DATASETS = {"fashion": 1, "shapes": 3}  # image channels
ENCODERS = ("minilm", "scratch")
STAGES = tuple((dataset, stage, encoder) for dataset in DATASETS
               for stage, encoder in (("base", "minilm"), ("sr", "minilm"), ("base", "scratch")))
SHAPES_TRAIN_IMAGES = 30_000


# --- the recipes -------------------------------------------------------------------------------

@dataclass
class TextUNetConfig(UNetConfig):
    """The settings of :class:`course_lib.imagen.TextUNet` (the base stage's by default): the
    DDPM's U-Net at 16x16, a ``low_res_size`` for a super-resolution stage, the target the
    network predicts."""

    attention_resolutions: list[int] = field(default_factory=lambda: [8, 4])
    image_size: int = 16
    low_res_size: int | None = None
    prediction: str = "epsilon"


@dataclass
class Text2ImageRecipe:
    """One stage of the cascade: Algorithm 1 with text and conditioning dropout ``p_uncond``,
    AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights; trained on
    ``dataset`` (``channels`` its image channels) with the text ``encoder``; the U-Net attends to
    MiniLM's hidden states ``encoder_layers`` side by side (6: the last layer)."""

    schedule: str = "cosine"
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    grad_clip: float = 1.0
    p_uncond: float = P_UNCOND
    seed: int = 0
    steps: int = 4_000
    ema: float = 0.999
    model: TextUNetConfig = field(default_factory=TextUNetConfig)
    dataset: str = "fashion"
    stage: str = "base"
    encoder: str = "minilm"
    encoder_layers: list[int] = field(default_factory=lambda: [6])
    channels: int = 1

    def __post_init__(self):
        if (self.dataset not in DATASETS or self.stage not in ("base", "sr")
                or self.encoder not in ENCODERS):
            raise ConfigError(f"dataset must be one of {tuple(DATASETS)}, stage 'base' or 'sr' "
                              f"and encoder one of {ENCODERS}; got {self.dataset!r}, "
                              f"{self.stage!r}, {self.encoder!r}")
        if self.encoder == "scratch" and self.encoder_layers != [6]:
            raise ConfigError(f"encoder_layers picks hidden states of MiniLM; the scratch encoder "
                              f"has no such choice (leave it at [6]), got {self.encoder_layers}")
        if self.channels != DATASETS[self.dataset] or (
                (self.model.low_res_size is None) != (self.stage == "base")):
            raise ConfigError(f"{self.dataset} images have {DATASETS[self.dataset]} channels "
                              f"(got channels={self.channels}), and only an 'sr' stage has a "
                              f"low_res_size (got {self.model.low_res_size} for {self.stage!r})")


# The from-scratch base stages keep the short recipe they shipped with (4,000 steps predicting
# epsilon). A prompt fixes every object of a shapes image, and 4,000 steps left them speckled and
# misshapen: the MiniLM stages train longer, and the base predicts v (Salimans & Ho 2022), whose
# x_0 estimate does not divide by sqrt(alpha_bar_t), near 0 at the noisiest steps. The
# super-resolution stage learns faster from its given 16x16 image; its EMA must still forget
# the random initialisation within the run (0.999^4500 is about 1 %).
_SCRATCH_BASE = Text2ImageRecipe()
_BASE = override(_SCRATCH_BASE, {"steps": 15_000, "ema": 0.9995, "model": {"prediction": "v"}})
_SR = Text2ImageRecipe(steps=4_500, ema=0.999, stage="sr", model=TextUNetConfig(
    image_size=32, low_res_size=16, channel_mults=[1, 2, 2, 2], prediction="v"))
STAGE_RECIPES = {
    (dataset, stage, encoder): _SCRATCH_BASE if encoder == "scratch" else
    (_BASE if stage == "base" else _SR) for dataset, stage, encoder in STAGES}


def recipe(dataset: str, stage: str, encoder: str = "minilm", **changes) -> Text2ImageRecipe:
    """The recipe of ``stage`` ("base" or "sr") on ``dataset`` ("fashion" or "shapes") with the
    text ``encoder`` (one super-resolution recipe per dataset), ``changes`` merged in
    (:func:`course_lib.experiments.config.override`)."""
    if dataset not in DATASETS or stage not in ("base", "sr"):
        raise ConfigError(f"dataset must be one of {tuple(DATASETS)} and stage 'base' or 'sr', "
                          f"got {dataset!r}, {stage!r}")
    if encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    key = (dataset, stage, encoder if stage == "base" else "minilm")
    return override(STAGE_RECIPES[key], {"dataset": dataset, "encoder": encoder,
                                         "channels": DATASETS[dataset], **changes})


def checkpoint_path(dataset: str, stage: str, encoder: str = "minilm") -> Path:
    return CHECKPOINT_DIR / f"t2i_{dataset}_{stage}_{encoder}.pt"


# --- the data: images with the captions a training step may draw --------------------------------

@functools.lru_cache(maxsize=2)
def captioned_data(dataset: str) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """Training images [N, C, 32, 32] in [-1, 1] and, per image, the captions a training step
    draws from. Fashion-MNIST (padded to 32x32): every template with every training phrase of
    the class (:data:`course_lib.text.FASHION_PHRASES`; the held-out paraphrases never appear).
    Shapes: every caption of the image except the held-out "synonyms" template, and no image
    that shows a held-out colour-shape combination
    (:data:`course_lib.experiments.text2image_eval.SHAPES_HELDOUT_COMBOS`)."""
    if dataset == "fashion":
        images, labels = load_fashion_mnist("train", size=32, value_range=(-1, 1))
        per_class = [tuple(t.format(p) for t in TEMPLATES for p in FASHION_PHRASES[c])
                     for c in range(10)]
        return images, [per_class[c] for c in labels.tolist()]
    if dataset == "shapes":
        data = make_shapes(SHAPES_TRAIN_IMAGES, seed=0)
        keep, options = [], []
        for i in range(len(data)):
            objects = data.objects(i)
            if any(shapes_heldout(o.colour, o.shape) for o in objects):
                continue
            keep.append(i)
            captions = describe(objects, data.relation(i))
            options.append(tuple(c for name, c in captions.items()
                                 if name != SHAPES_HELDOUT_TEMPLATE))
        return data.images[keep] * 2 - 1, options
    raise ValueError(f"dataset must be 'fashion' or 'shapes', got {dataset!r}")


def downsample(images: torch.Tensor) -> torch.Tensor:
    """32x32 -> 16x16 by averaging 2x2 blocks: the base model's images."""
    return F.avg_pool2d(images, 2)


# --- training and loading ----------------------------------------------------------------------

def _build(config: Text2ImageRecipe, vocabulary: dict | None
           ) -> tuple[nn.ModuleDict, FrozenTextEncoder | None]:
    """The trained modules ({"unet"} plus the from-scratch {"encoder"}) and the frozen encoder."""
    frozen = FrozenTextEncoder(layers=config.encoder_layers) if config.encoder == "minilm" else None
    modules = {}
    if frozen is None:
        modules["encoder"] = ScratchTextEncoder(**vocabulary)
    text_dim = frozen.dim if frozen is not None else modules["encoder"].dim
    modules["unet"] = TextUNet(text_dim, channels=config.channels, **to_dict(config.model))
    return nn.ModuleDict(modules), frozen


def _train_step(config: Text2ImageRecipe, net: nn.ModuleDict, text_encoder: nn.Module,
                schedule: NoiseSchedule, images: torch.Tensor, options: list[tuple[str, ...]],
                opt: torch.optim.Optimizer, lr_schedule: torch.optim.lr_scheduler.LRScheduler):
    """Algorithm 1 with text on a batch of image indices: a caption drawn per image, dropped
    with probability ``p_uncond``; an "sr" stage also sees its noise-augmented 16x16 image."""
    unet, device = net["unet"], images.device
    targets = downsample(images) if config.stage == "base" else images

    def train_step(batch):
        (index,) = batch
        picks = torch.rand(len(index)).tolist()  # torch's RNG: a resumed run draws the same
        prompts = [options[i][int(u * len(options[i]))] for i, u in zip(index.tolist(), picks)]
        net.train()
        text = text_encoder(prompts)
        keep = conditioning_dropout(len(index), config.p_uncond).to(device)
        extra = {}
        if config.stage == "sr":
            level = MAX_TRAIN_AUG_LEVEL * torch.rand(len(index))
            low_res, aug_t = augment_low_res(schedule, downsample(images[index]), level)
            extra = {"low_res": low_res, "aug_t": aug_t}
        loss = diffusion_loss(unet, schedule, targets[index], unet.prediction, text=text,
                              keep=keep, **extra)
        optimize(loss, net, opt, lr_schedule, config.grad_clip)
        return {"loss": loss}

    return train_step


def train_text2image(config: Text2ImageRecipe, out: str | Path | None = None,
                     run: str | Path | None = None, device: str | torch.device | None = None,
                     resume: bool = True, checkpoint_every: int = 500,
                     live_plot: bool | None = False) -> Path:
    """Train one stage of the cascade (:func:`recipe`): ``stage="base"`` generates 16x16 images
    from text, ``"sr"`` turns 16x16 into 32x32 given the text and the noise-augmented
    low-resolution image. The training state goes to ``run`` (a killed run resumes from there);
    ``out`` (default: the shipped stage's path) receives the EMA weights. Returns ``out``."""
    device = get_device(device)
    out = Path(out) if out is not None else checkpoint_path(config.dataset, config.stage,
                                                            config.encoder)
    run = Path(run) if run is not None else RUNS_DIR / out.stem / "train.pt"
    images, options = captioned_data(config.dataset)
    seed_everything(config.seed)
    vocabulary = (ScratchTextEncoder.from_captions(c for o in options for c in o).config()
                  if config.encoder == "scratch" else None)
    net, frozen = _build(config, vocabulary)
    net.to(device)
    text_encoder = frozen.to(device) if frozen is not None else net["encoder"]
    schedule = make_schedule(config.schedule, config.model.num_steps)
    ema = EMA(net, config.ema)
    opt, lr_schedule = make_optimizer(net, config.lr, config.weight_decay, config.warmup,
                                      config.steps)
    train_step = _train_step(config, net, text_encoder, schedule, images.to(device), options,
                             opt, lr_schedule)
    batches = Minibatches(torch.arange(len(images)), batch_size=config.batch_size,
                          seed=config.seed)
    history = fit(train_step, batches, config.steps, ema=ema, checkpoint=run,
                  arch=f"{ARCH}_training", config=to_dict(config),
                  checkpoint_every=checkpoint_every, resume=resume,
                  modules={"net": net, "opt": opt, "lr_schedule": lr_schedule},
                  live_plot=live_plot, log_every=50,
                  desc=f"{config.dataset} {config.stage} ({config.encoder})")
    seconds = load_checkpoint(run, arch=f"{ARCH}_training")["metrics"]["train_seconds"]
    threads = torch.get_num_threads()
    save_checkpoint(out, {"ema": ema.state_dict(), "history": history.state_dict(),
                          "vocabulary": vocabulary or {}},
                    arch=ARCH, config=to_dict(config), step=config.steps,
                    metrics={"loss": round(history.last(500)["loss"], 4)},
                    train_seconds=seconds, device=str(device), threads=threads,
                    command=command(MODULE, config, "train", config.dataset, config.stage,
                                    out=relative_path(out), threads=threads))
    return out


def load_text2image(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[TextUNet, FrozenTextEncoder | ScratchTextEncoder, NoiseSchedule]:
    """The EMA network of a verified checkpoint (eval mode), its text encoder and schedule."""
    payload = load_checkpoint(path, arch=ARCH)
    config = from_dict(Text2ImageRecipe, payload["config"])
    check_sizes(**to_dict(config.model))  # before the text encoder is built
    net, frozen = _build(config, payload["state"]["vocabulary"] or None)
    load_state(net, payload["state"]["ema"], "ema")
    net.to(device).eval()
    encoder = frozen.to(device) if frozen is not None else net["encoder"]
    return net["unet"], encoder, make_schedule(config.schedule, config.model.num_steps)


def evaluate_checkpoints(config: Text2ImageEvaluation | None = None,
                         out: str | Path = EVAL_TABLE,
                         paths: dict[tuple[str, str, str], Path] | None = None) -> dict:
    """Evaluate the stages ``paths`` (default: the shipped ones) with
    :func:`course_lib.experiments.text2image_eval.evaluate` (``config`` default: its defaults),
    write the table to ``out`` (JSON, atomically under a lock) and copy its figures into the
    manifest (``record_quality``)."""
    config = config or Text2ImageEvaluation()
    paths = paths or {key: checkpoint_path(*key) for key in STAGES
                      if checkpoint_path(*key).exists()}
    table = {"command": command(MODULE, config, "evaluate", out=relative_path(out)),
             **evaluate(config, {key: load_text2image(path) for key, path in paths.items()})}

    def replace(old: dict) -> None:
        old.clear()
        old.update(table)

    update_json(out, replace)
    record_quality(table, paths)
    return table


# --- the command line --------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="train and evaluate the text-to-image cascades")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one stage into data/checkpoints/ "
                                              "(resumable from runs/)")
    train.add_argument("dataset", choices=list(DATASETS))
    train.add_argument("stage", choices=["base", "sr"],
                       help="picks the stage's recipe; the flags below change it")
    add_arguments(train, Text2ImageRecipe)
    train.add_argument("--out", default=None, help="default: data/checkpoints/t2i_<dataset>_"
                                                   "<stage>_<encoder>.pt")
    train.add_argument("--device", default=None)
    evaluation = commands.add_parser("evaluate", help="prompt accuracy and FID of the shipped "
                                                      "cascades, into " + EVAL_TABLE.name)
    add_arguments(evaluation, Text2ImageEvaluation)
    evaluation.add_argument("--out", default=str(EVAL_TABLE))
    for sub in (train, evaluation):
        sub.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (1 leaves a core to others on a shared machine)")
    return parser


def parse_args(argv: list[str] | None = None
               ) -> tuple[Text2ImageRecipe | Text2ImageEvaluation, argparse.Namespace]:
    """The command line as (the full recipe or evaluation settings, the other options)."""
    args = _parser().parse_args(argv)
    if args.command == "evaluate":
        return override(Text2ImageEvaluation(),
                        overrides_from_args(args, Text2ImageEvaluation)), args
    config = override(recipe(args.dataset, args.stage),
                      overrides_from_args(args, Text2ImageRecipe))
    if (config.dataset, config.stage) != (args.dataset, args.stage):
        raise ConfigError(f"--dataset {config.dataset} --stage {config.stage} contradict the "
                          f"positional {args.dataset} {args.stage}")
    return config, args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        evaluate_checkpoints(config, args.out)
        print(f"written {args.out}")
        return
    print(f"saved {train_text2image(config, args.out, device=args.device)}")


if __name__ == "__main__":
    main()
