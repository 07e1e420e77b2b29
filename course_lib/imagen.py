"""Text-to-image diffusion in miniature: Imagen's recipe (Saharia et al. 2022) at 16 and 32 pixels.

- A frozen pretrained transformer encodes the prompt (:mod:`course_lib.text`): token
  embeddings, their mask and a pooled embedding. The baseline encoder learns from scratch.
- :class:`TextUNet` is the course U-Net (:mod:`course_lib.unet`) conditioned two ways: the
  pooled embedding, through an MLP, is added to the time embedding (Imagen's CombineEmbs), and
  the attention layers at low resolution also attend to the token embeddings (cross-attention).
- Classifier-free guidance (Ho & Salimans 2021): the same network learns p(x | c) and p(x) by
  replacing the condition with a learned null condition 10 % of the time; sampling extrapolates
  from the unconditional towards the conditional prediction.
- A cascade: a base model at 16x16 and a super-resolution model 16 -> 32 that sees the
  upsampled low-resolution image as extra input channels. Imagen's noise conditioning
  augmentation: in training the low-resolution image is noised to a random level, which the
  model is told; at sampling a fixed level (0.2) hides the base model's small artefacts.

Guidance convention (this module, Imagen and diffusers)::

    eps~ = w eps(z_t, c) + (1 - w) eps(z_t)        w = 1: no guidance, w = 0: unconditional

Ho & Salimans write eps~ = (1 + w') eps(z_t, c) - w' eps(z_t): the same thing with w = 1 + w'
(:func:`from_ho_salimans`).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.diffusion import (NoiseSchedule, diffusion_loss, make_optimizer, make_schedule,
                                  optimize, q_sample, sample)
from course_lib.runtime import CHECKPOINT_DIR, RUNS_DIR, get_device, seed_everything
from course_lib.text import FrozenTextEncoder, ScratchTextEncoder, TextEmbeddings
from course_lib.unet import UNet, sinusoidal_embedding

ARCH = "text_unet"
P_UNCOND = 0.1  # conditioning dropout of Imagen and Ho & Salimans
AUG_LEVEL = 0.2  # noise augmentation of the low-resolution image at sampling (Imagen)
MAX_TRAIN_AUG_LEVEL = 0.5


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, Imagen's convention: w eps(z, c) + (1 - w) eps(z)."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def from_ho_salimans(w: float) -> float:
    """Ho & Salimans' scale w' ((1 + w') eps(z, c) - w' eps(z)) in this module's convention."""
    return 1.0 + w


def conditioning_dropout(batch_size: int, p: float = P_UNCOND,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """keep [B] bool: False for the ~p of the batch whose prompt is replaced by the null
    condition, so that one network learns both eps(z, c) and eps(z)."""
    if not 0 <= p < 1:
        raise ValueError(f"the conditioning dropout probability must be in [0, 1), got {p}")
    return torch.rand(batch_size, generator=generator) >= p


def augment_low_res(schedule: NoiseSchedule, low_res: torch.Tensor, level: float | torch.Tensor,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise conditioning augmentation: the low-resolution image noised with q(z_s | x) at
    the code step s = level * T, rounded (level in [0, 1)); returns (noised image, s [B])."""
    level = torch.as_tensor(level, dtype=torch.float64).expand(len(low_res))
    if level.min() < 0 or level.max() >= 1:
        raise ValueError(f"augmentation levels must be in [0, 1), got {level.min().item()} .. "
                         f"{level.max().item()}")
    steps = (level * schedule.T).round().long().clamp(max=schedule.T - 1).to(low_res.device)
    return q_sample(schedule, low_res, steps, noise), steps


class TextUNet(nn.Module):
    """eps_theta(z_t, t, text[, low_res, aug_t]) for images [B, channels, size, size].

    ``text=None`` (or ``keep`` False for a row) uses the learned null condition: a null pooled
    vector and one null token. With ``low_res_size``, ``low_res`` [B, channels, low, low] (the
    noise-augmented low-resolution image) is upsampled bilinearly and concatenated to z_t, and
    its augmentation step ``aug_t`` is embedded like t and added to the time embedding.
    ``prediction`` names what the network outputs (:data:`course_lib.diffusion.PREDICTIONS`):
    the base models predict the noise, the super-resolution models v = sqrt(alpha_bar) eps -
    sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022), which at high noise is close to -x_0, i.e. to
    the upsampled conditioning image, a target an eps-predicting network learns far more slowly.
    """

    def __init__(self, text_dim: int, channels: int = 1, image_size: int = 16,
                 low_res_size: int | None = None, base: int = 32, prediction: str = "epsilon",
                 **unet_kwargs):
        super().__init__()
        self.text_dim, self.channels, self.low_res_size = text_dim, channels, low_res_size
        self.prediction = prediction
        self.unet = UNet(in_channels=channels * (2 if low_res_size else 1), base=base,
                         image_size=image_size, context_dim=text_dim, out_channels=channels,
                         **unet_kwargs)
        self.image_size, self.num_steps = image_size, self.unet.num_steps
        time_dim = self.unet.time_dim
        self.text_mlp = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, time_dim),
                                      nn.SiLU(), nn.Linear(time_dim, time_dim))  # CombineEmbs
        self.null_pooled = nn.Parameter(torch.zeros(text_dim))
        self.null_token = nn.Parameter(0.02 * torch.randn(text_dim))
        self.aug_mlp = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(),
                                     nn.Linear(time_dim, time_dim)) if low_res_size else None

    def null_text(self, batch_size: int) -> TextEmbeddings:
        tokens = self.null_token.expand(batch_size, 1, self.text_dim)  # [B, 1, D]
        mask = torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device)
        return TextEmbeddings(tokens, mask, self.null_pooled.expand(batch_size, self.text_dim))

    def _conditions(self, text: TextEmbeddings | None, keep: torch.Tensor | None,
                    batch_size: int) -> TextEmbeddings:
        if text is None:
            return self.null_text(batch_size)
        if len(text) != batch_size or text.pooled.shape[1] != self.text_dim:
            raise ValueError(f"text embeddings must be [{batch_size}, L, {self.text_dim}] (one "
                             f"prompt per image, this network's text_dim), got "
                             f"{tuple(text.tokens.shape)}")
        if keep is None:
            return text
        drop = ~keep.to(text.mask.device)
        tokens = text.tokens.clone()
        tokens[drop] = 0
        tokens[drop, 0] = self.null_token
        mask = text.mask.clone()
        mask[drop] = False
        mask[drop, 0] = True
        pooled = torch.where(drop[:, None], self.null_pooled, text.pooled)
        return TextEmbeddings(tokens, mask, pooled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings | None = None,
                keep: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
                aug_t: torch.Tensor | None = None) -> torch.Tensor:
        cond = self._conditions(text, keep, len(x))
        emb = self.text_mlp(cond.pooled)
        if self.low_res_size:
            expected = (len(x), self.channels, self.low_res_size, self.low_res_size)
            if low_res is None or tuple(low_res.shape) != expected or aug_t is None:
                raise ValueError(f"a super-resolution model needs low_res {list(expected)} and "
                                 f"its augmentation steps aug_t [B]; got "
                                 f"{None if low_res is None else tuple(low_res.shape)}")
            up = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, up], dim=1)  # [B, 2C, H, W]
            emb = emb + self.aug_mlp(sinusoidal_embedding(aug_t, self.aug_mlp[0].in_features))
        elif low_res is not None:
            raise ValueError("this is a base model (no low_res_size); it takes no low_res image")
        return self.unet(x, t, cond=emb, context=cond.tokens, context_mask=cond.mask)


class Guided(nn.Module):
    """The guided prediction w out(z, c) + (1 - w) out(z) as a network that
    :func:`course_lib.diffusion.sample` can run (one conditional and, for w != 1, one
    unconditional evaluation per step). For a v-predicting network the same combination is
    guidance on eps: at a given z_t, v is an affine function of eps."""

    def __init__(self, model: TextUNet, text: TextEmbeddings, w: float,
                 low_res: torch.Tensor | None = None, aug_t: torch.Tensor | None = None):
        super().__init__()
        self.model, self.text, self.w, self.low_res, self.aug_t = model, text, w, low_res, aug_t
        self.num_steps = model.num_steps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_cond = self.model(x, t, self.text, low_res=self.low_res, aug_t=self.aug_t)
        if self.w == 1:
            return eps_cond
        eps_uncond = self.model(x, t, None, low_res=self.low_res, aug_t=self.aug_t)
        return guided_eps(eps_cond, eps_uncond, self.w)


# --- data: images with the captions a training step may draw --------------------------------

SHAPES_TRAIN_IMAGES = 30_000
SHAPES_HELDOUT_TEMPLATE = "synonyms"  # "a tiny red disc over a big blue box": never in training
SHAPES_HELDOUT_COMBOS = (("red", "triangle"), ("blue", "circle"), ("green", "cross"))


def shapes_heldout(colour: str, shape: str) -> bool:
    return (colour, shape) in SHAPES_HELDOUT_COMBOS


@functools.lru_cache(maxsize=2)
def captioned_data(dataset: str) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """Training images [N, C, 32, 32] in [-1, 1] and, per image, the captions a training step
    draws from. Fashion-MNIST (padded to 32x32): every template with every training phrase of
    the class (:data:`course_lib.text.FASHION_PHRASES`; the held-out paraphrases never appear).
    Shapes: every caption of the image except the held-out "synonyms" template, and no image
    that shows a held-out colour-shape combination (:data:`SHAPES_HELDOUT_COMBOS`)."""
    if dataset == "fashion":
        from course_lib.data import load_fashion_mnist
        from course_lib.text import FASHION_PHRASES, TEMPLATES

        images, labels = load_fashion_mnist("train", size=32, value_range=(-1, 1))
        per_class = [tuple(t.format(p) for t in TEMPLATES for p in FASHION_PHRASES[c])
                     for c in range(10)]
        return images, [per_class[c] for c in labels.tolist()]
    if dataset == "shapes":
        from course_lib.data.shapes import describe, make_shapes

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

MODELS = {
    "base": {"image_size": 16, "low_res_size": None, "base": 32, "channel_mults": [1, 2, 2],
             "depth": 1, "attention_resolutions": [8, 4], "dropout": 0.0, "num_steps": 1000,
             "prediction": "epsilon"},
    "sr": {"image_size": 32, "low_res_size": 16, "base": 32, "channel_mults": [1, 2, 2, 2],
           "depth": 1, "attention_resolutions": [8, 4], "dropout": 0.0, "num_steps": 1000,
           "prediction": "v"},
}
# Super-resolution from a given 16x16 image learns faster; its EMA must forget the random
# initialisation within the shorter run (0.995^1000 < 1 %, while 0.999^1000 would keep 37 %).
STAGE_RECIPES = {"base": {"steps": 4_000, "ema": 0.999}, "sr": {"steps": 1_000, "ema": 0.995}}
RECIPE = {"schedule": "cosine", "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4,
          "warmup": 200, "grad_clip": 1.0, "p_uncond": P_UNCOND, "seed": 0}
ENCODERS = ("minilm", "scratch")
STAGES = tuple((dataset, stage, encoder) for dataset in ("fashion", "shapes")
               for stage, encoder in (("base", "minilm"), ("sr", "minilm"), ("base", "scratch")))


def checkpoint_path(dataset: str, stage: str, encoder: str = "minilm") -> Path:
    return CHECKPOINT_DIR / f"t2i_{dataset}_{stage}_{encoder}.pt"


def _build(config: dict, vocabulary: dict | None) -> tuple[nn.ModuleDict, FrozenTextEncoder | None]:
    """The trained modules ({"unet"} plus the from-scratch {"encoder"}) and the frozen encoder."""
    frozen = FrozenTextEncoder() if config["encoder"] == "minilm" else None
    modules = {}
    if frozen is None:
        modules["encoder"] = ScratchTextEncoder(**vocabulary)
    text_dim = frozen.dim if frozen is not None else modules["encoder"].dim
    modules["unet"] = TextUNet(text_dim, channels=config["channels"], **config["model"])
    return nn.ModuleDict(modules), frozen


def train_text2image(dataset: str, stage: str, encoder: str = "minilm",
                     out: str | Path | None = None, run: str | Path | None = None,
                     device: str | torch.device | None = None, resume: bool = True,
                     checkpoint_every: int = 500, live_plot: bool | None = False,
                     **overrides) -> Path:
    """Train one stage of the cascade on ``dataset`` ("fashion" or "shapes"): ``stage="base"``
    generates 16x16 images from text, ``"sr"`` turns 16x16 into 32x32 given the text and the
    noise-augmented low-resolution image. Algorithm 1 with conditioning dropout ``p_uncond``;
    AdamW, warm-up and cosine decay, EMA. Returns the checkpoint path (EMA weights)."""
    from course_lib.train import EMA, Minibatches, fit

    if stage not in MODELS or encoder not in ENCODERS:
        raise ValueError(f"stage must be one of {tuple(MODELS)} and encoder one of {ENCODERS}, "
                         f"got {stage!r}, {encoder!r}")
    device = get_device(device)
    out = Path(out) if out is not None else checkpoint_path(dataset, stage, encoder)
    run = Path(run) if run is not None else RUNS_DIR / out.stem / "train.pt"
    images, options = captioned_data(dataset)
    config = {**RECIPE, **STAGE_RECIPES[stage], "model": MODELS[stage], "dataset": dataset,
              "stage": stage,
              "encoder": encoder, "channels": images.shape[1], **overrides}
    seed_everything(config["seed"])
    vocabulary = (ScratchTextEncoder.from_captions(c for o in options for c in o).config()
                  if encoder == "scratch" else None)
    net, frozen = _build(config, vocabulary)
    net.to(device)
    text_encoder = frozen.to(device) if frozen is not None else net["encoder"]
    unet, schedule = net["unet"], make_schedule(config["schedule"], config["model"]["num_steps"])
    ema = EMA(net, config["ema"])
    opt, lr_schedule = make_optimizer(net, config)
    steps = config["steps"]
    images = images.to(device)
    targets = downsample(images) if stage == "base" else images
    batches = Minibatches(torch.arange(len(images)), batch_size=config["batch_size"],
                          seed=config["seed"])

    def train_step(batch):
        (index,) = batch
        picks = torch.rand(len(index)).tolist()  # torch's RNG: a resumed run draws the same
        prompts = [options[i][int(u * len(options[i]))] for i, u in zip(index.tolist(), picks)]
        net.train()
        text = text_encoder(prompts)
        keep = conditioning_dropout(len(index), config["p_uncond"]).to(device)
        extra = {}
        if stage == "sr":
            level = MAX_TRAIN_AUG_LEVEL * torch.rand(len(index))
            low_res, aug_t = augment_low_res(schedule, downsample(images[index]), level)
            extra = {"low_res": low_res, "aug_t": aug_t}
        loss = diffusion_loss(unet, schedule, targets[index], unet.prediction, text=text,
                              keep=keep, **extra)
        optimize(loss, net, opt, lr_schedule, config["grad_clip"])
        return {"loss": loss}

    history = fit(train_step, batches, steps, ema=ema, checkpoint=run, arch=f"{ARCH}_training",
                  config=config, checkpoint_every=checkpoint_every, resume=resume,
                  modules={"net": net, "opt": opt, "lr_schedule": lr_schedule},
                  live_plot=live_plot, log_every=50, desc=f"{dataset} {stage} ({encoder})")
    seconds = load_checkpoint(run, arch=f"{ARCH}_training")["metrics"]["train_seconds"]
    save_checkpoint(out, {"ema": ema.state_dict(), "history": history.state_dict(),
                          "vocabulary": vocabulary or {}},
                    arch=ARCH, config=config, step=steps,
                    metrics={"loss": round(history.last(500)["loss"], 4)},
                    train_seconds=seconds, device=str(device), threads=torch.get_num_threads(),
                    command=f"python -m course_lib.imagen train {dataset} {stage} "
                            f"--encoder {encoder} --steps {steps}")
    return out


def load_text2image(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[TextUNet, FrozenTextEncoder | ScratchTextEncoder, NoiseSchedule]:
    """The EMA network of a verified checkpoint (eval mode), its text encoder and schedule."""
    payload = load_checkpoint(path, arch=ARCH)
    config = payload["config"]
    net, frozen = _build(config, payload["state"]["vocabulary"] or None)
    load_state(net, payload["state"]["ema"], "ema")
    net.to(device).eval()
    encoder = frozen.to(device) if frozen is not None else net["encoder"]
    return (net["unet"], encoder,
            make_schedule(config["schedule"], config["model"]["num_steps"]))


# --- sampling ----------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model: TextUNet, encoder: nn.Module, schedule: NoiseSchedule,
             prompts: Sequence[str], w: float = 3.0, steps: int = 25, seed: int = 0,
             low_res: torch.Tensor | None = None, aug_level: float = AUG_LEVEL,
             clip: bool | str = "dynamic", batch_size: int = 100) -> torch.Tensor:
    """One image per prompt [N, C, size, size] in [-1, 1] (CPU): DDIM with ``steps`` steps and
    guidance scale ``w`` (Imagen's convention), x_0 predictions dynamically thresholded. A
    super-resolution model also takes the 16x16 images ``low_res`` [N, C, 16, 16], noised to
    ``aug_level``."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of strings (one image per prompt)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (model.channels, model.image_size, model.image_size)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        text = encoder(chunk).to(device)
        extra = {}
        if model.low_res_size:
            if low_res is None or len(low_res) != len(prompts):
                raise ValueError("a super-resolution model needs one low_res image per prompt")
            low = low_res[i:i + batch_size]
            noise = torch.randn(low.shape, generator=generator)
            extra = dict(zip(("low_res", "aug_t"),
                             augment_low_res(schedule, low.to(device), aug_level,
                                             noise.to(device))))
        guided = Guided(model, text, w, **extra)
        out.append(sample(guided, schedule, (len(chunk), *shape), "ddim", steps, clip=clip,
                          prediction=model.prediction, generator=generator, device=device,
                          progress=False).cpu())
    return torch.cat(out).clamp(-1, 1)


def cascade(base: tuple[TextUNet, nn.Module, NoiseSchedule],
            sr: tuple[TextUNet, nn.Module, NoiseSchedule], prompts: Sequence[str],
            w: float = 3.0, sr_w: float = 1.0, steps: int = 25, sr_steps: int = 25,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> 16x16 (base model) -> 32x32 (super-resolution model, conditioned on the same
    prompt and the noise-augmented 16x16 image); each stage a (network, encoder, schedule)
    triple from :func:`load_text2image`. Returns both images, in [-1, 1]."""
    low = generate(*base, prompts, w=w, steps=steps, seed=seed)
    high = generate(*sr, prompts, w=sr_w, steps=sr_steps, seed=seed + 1, low_res=low)
    return low, high


# --- evaluation: does the image show what the prompt asked for? -------------------------------

SHAPES_PROMPT_KINDS = ("single", "paraphrase", "heldout combo", "relation", "count")


def shapes_eval_prompts(kind: str, n: int, seed: int = 1) -> list[tuple[str, list, str | None]]:
    """``n`` (prompt, objects, relation) triples drawn from fresh shapes images (``seed`` 1 is
    not the training seed): "single" asks for one object ("a large red circle"), "paraphrase"
    the same in the held-out synonyms ("a big red disc"), "heldout combo" one object in a
    colour-shape combination never seen in training, "relation" two different objects ("a red
    circle above a blue square"), "count" two equal ones ("two red circles")."""
    from course_lib.data.shapes import COLOURS, SHAPES, ShapeSpec, describe, make_shapes

    if kind not in SHAPES_PROMPT_KINDS:
        raise ValueError(f"kind must be one of {SHAPES_PROMPT_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    items = []
    data = make_shapes(max(20 * n, 100), seed=seed, twin_prob=0.5)
    for i in range(len(data)):
        objects, relation = data.objects(i), data.relation(i)
        if kind == "heldout combo":
            colour, shape = SHAPES_HELDOUT_COMBOS[rng.integers(len(SHAPES_HELDOUT_COMBOS))]
            o = objects[0]
            objects = [ShapeSpec(colour, shape, o.size, o.x, o.y)] if relation is None else []
        held = any(shapes_heldout(o.colour, o.shape) for o in objects)
        if not objects or (held != (kind == "heldout combo")):
            continue
        captions = describe(objects, relation)
        twins = len(objects) == 2 and "count" in captions
        if kind in ("single", "paraphrase", "heldout combo") and len(objects) == 1:
            template = "synonyms" if kind == "paraphrase" else "plain"
            items.append((captions[template], objects, None))
        elif kind == "relation" and len(objects) == 2 and not twins:
            items.append((captions["short"], objects, relation))
        elif kind == "count" and twins:
            items.append((captions["count"], objects, None))
        if len(items) == n:
            return items
    raise RuntimeError(f"only {len(items)} {kind!r} prompts in {len(data)} images; ask for fewer")


def _relation_holds(a, b, relation: str) -> bool:
    return {"above": a.y < b.y, "below": a.y > b.y, "left of": a.x < b.x,
            "right of": a.x > b.x}[relation]


def check_shapes(image: torch.Tensor, objects: list, relation: str | None) -> dict[str, bool]:
    """What a generated image [3, 32, 32] in [0, 1] gets right of its prompt, read back with
    :func:`course_lib.data.shapes.detect_objects`: "count" (as many objects as asked),
    "colour"/"shape"/"size" (one-object prompts), "binding" (two objects: each asked
    colour-shape pair present), "relation" (and placed as asked), and "all"."""
    from course_lib.data.shapes import detect_objects

    found = detect_objects(image)
    result = {"count": len(found) == len(objects)}
    if len(objects) == 1:
        o, f = objects[0], found[0] if len(found) == 1 else None
        for attribute in ("colour", "shape", "size"):
            result[attribute] = f is not None and getattr(f, attribute) == getattr(o, attribute)
        result["all"] = all(result.values())
        return result
    pairs = [(o.colour, o.shape) for o in objects]
    result["binding"] = result["count"] and sorted(pairs) == sorted(
        (f.colour, f.shape) for f in found)
    if relation is not None:
        result["relation"] = result["binding"] and _relation_holds(
            *(next(f for f in found if (f.colour, f.shape) == p) for p in pairs), relation)
    result["all"] = all(result.values())
    return result


def shapes_accuracy(images: torch.Tensor, items: list[tuple[str, list, str | None]]
                    ) -> dict[str, float]:
    """Mean of each :func:`check_shapes` answer over generated images [N, 3, 32, 32] in
    [-1, 1] and their (prompt, objects, relation) items."""
    checks = [check_shapes((image + 1) / 2, objects, relation)
              for image, (_, objects, relation) in zip(images.clamp(-1, 1), items)]
    return {key: float(np.mean([c[key] for c in checks])) for key in checks[0]}


def fashion_eval_prompts(per_class: int, heldout: bool = False, seed: int = 1
                         ) -> tuple[list[str], torch.Tensor]:
    """``per_class`` prompts for each Fashion-MNIST class (training phrases, or the held-out
    paraphrases with ``heldout``) and their labels."""
    from course_lib.text import fashion_captions

    labels = torch.arange(10).repeat_interleave(per_class)
    return fashion_captions(labels, seed, heldout=heldout), labels


def fashion_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of generated images [N, 1, 32, 32] in [-1, 1] that the course classifier puts in
    the class their prompt asked for."""
    from course_lib.classifier import load_classifier, to_classifier_input

    classifier = load_classifier()
    with torch.inference_mode():
        predicted = classifier(to_classifier_input(images, (-1, 1))).argmax(1)
    return (predicted == labels).float().mean().item()


# --- the evaluation table of notebook 07 -------------------------------------------------------

GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0, 8.0)
EVAL_TABLE = CHECKPOINT_DIR / "t2i_eval.json"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, round(time.perf_counter() - start, 1)


Stage = tuple[TextUNet, nn.Module, NoiseSchedule]  # (network, text encoder, schedule)


def evaluate_fashion(base: Stage, sr: Stage, per_class: int, scales: Sequence[float], steps: int,
                     sr_steps: int) -> tuple[float, list[dict]]:
    """The Fashion-MNIST cascade per guidance scale: prompt accuracy (course classifier) and FID
    (course classifier features, against the 10,000 test images) of ``per_class`` prompts per
    class in the training phrasing; and the FID floor of as many real training images."""
    from course_lib.data import load_fashion_mnist
    from course_lib.metrics import ClassifierFeatures, fid_from_features

    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test", size=32)
    x_train, _ = load_fashion_mnist("train", size=32)
    test_features = features(x_test)
    n = 10 * per_class
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:n]
    floor = round(fid_from_features(features(x_train[order]), test_features), 3)
    prompts, labels = fashion_eval_prompts(per_class)
    rows = []
    for w in scales:
        (_, images), seconds = _timed(cascade, base, sr, prompts, w=w, steps=steps,
                                      sr_steps=sr_steps)
        rows.append({"w": w, "samples": n, "accuracy": round(fashion_accuracy(images, labels), 4),
                     "fid": round(fid_from_features(features((images + 1) / 2), test_features),
                                  3), "seconds": seconds})
    return floor, rows


def evaluate_shapes(base: Stage, sr: Stage, items: dict, scales: Sequence[float], steps: int,
                    sr_steps: int) -> list[dict]:
    """The shapes cascade per guidance scale and prompt kind (one object, two in a relation,
    counting): the share of images with each attribute right, and with everything right."""
    rows = []
    for w in scales:
        for kind in ("single", "relation", "count"):
            (_, images), seconds = _timed(cascade, base, sr, [p for p, _, _ in items[kind]], w=w,
                                          steps=steps, sr_steps=sr_steps)
            accuracy = shapes_accuracy(images, items[kind])
            rows.append({"w": w, "kind": kind, "samples": len(items[kind]), "seconds": seconds,
                         **{k: round(v, 4) for k, v in accuracy.items()}})
    return rows


def evaluate_heldout(stages: dict, items: dict, per_class: int, w: float, steps: int,
                     sr_steps: int) -> list[dict]:
    """Per text encoder (pretrained MiniLM, from scratch) at guidance ``w``: Fashion-MNIST
    accuracy on the training phrasing against held-out paraphrases, and the shapes share all
    right for training words, held-out synonyms and held-out colour-shape combinations (left
    out for an encoder without a shapes base checkpoint)."""
    prompts, labels = fashion_eval_prompts(per_class)
    held_prompts, held_labels = fashion_eval_prompts(per_class // 2, heldout=True)
    rows = []
    for encoder in ENCODERS:
        base = stages["fashion", "base", encoder]
        for phrasing, (p, y) in (("training phrases", (prompts[::2], labels[::2])),
                                 ("held-out paraphrases", (held_prompts, held_labels))):
            _, images = cascade(base, stages["fashion", "sr", "minilm"], p, w=w, steps=steps,
                                sr_steps=sr_steps)
            rows.append({"dataset": "fashion", "encoder": encoder, "prompts": phrasing,
                         "samples": len(p), "accuracy": round(fashion_accuracy(images, y), 4)})
        if ("shapes", "base", encoder) not in stages:
            continue
        for kind in ("single", "paraphrase", "heldout combo"):
            _, images = cascade(stages["shapes", "base", encoder], stages["shapes", "sr", "minilm"],
                                [p for p, _, _ in items[kind]], w=w, steps=steps,
                                sr_steps=sr_steps)
            rows.append({"dataset": "shapes", "encoder": encoder, "prompts": kind,
                         "samples": len(items[kind]),
                         "accuracy": round(shapes_accuracy(images, items[kind])["all"], 4)})
    return rows


def evaluate(per_class: int = 100, shapes_n: int = 200, scales: Sequence[float] = GUIDANCE_SCALES,
             w_heldout: float = 3.0, steps: int = 25, sr_steps: int = 25,
             out: str | Path = EVAL_TABLE) -> dict:
    """Measure the shipped cascades (:func:`evaluate_fashion`, :func:`evaluate_shapes`,
    :func:`evaluate_heldout`), write the table ``out`` (JSON) and copy its figures at
    ``w_heldout`` into the manifest (:func:`record_quality`)."""
    import json

    stages = {key: load_text2image(checkpoint_path(*key)) for key in STAGES
              if checkpoint_path(*key).exists()}
    items = {kind: shapes_eval_prompts(kind, shapes_n) for kind in SHAPES_PROMPT_KINDS}
    table = {"command": f"python -m course_lib.imagen evaluate --per-class {per_class} "
                        f"--shapes-n {shapes_n}", "steps": steps, "sr_steps": sr_steps,
             "w_heldout": w_heldout}
    table["fashion_floor_fid"], table["fashion"] = evaluate_fashion(
        stages["fashion", "base", "minilm"], stages["fashion", "sr", "minilm"], per_class, scales,
        steps, sr_steps)
    table["shapes"] = evaluate_shapes(stages["shapes", "base", "minilm"],
                                      stages["shapes", "sr", "minilm"], items, scales, steps,
                                      sr_steps)
    table["heldout"] = evaluate_heldout(stages, items, per_class, w_heldout, steps, sr_steps)
    Path(out).write_text(json.dumps(table, indent=1) + "\n")
    record_quality(table)
    return table


def record_quality(table: dict) -> None:
    """Copy the evaluation's figures at ``w_heldout`` into the stages' manifest entries: prompt
    accuracy per text encoder and phrasing (base stages), and the Fashion-MNIST cascade's
    accuracy and FID (its base and super-resolution stages)."""
    from course_lib.checkpoint import record_metrics

    w = table["w_heldout"]
    metrics: dict[tuple, dict[str, float]] = {}
    for row in table["heldout"]:
        name = row["prompts"].replace("-", " ").replace(" ", "_")
        metrics.setdefault((row["dataset"], "base", row["encoder"]), {})[
            f"accuracy_{name}_w{w:g}"] = row["accuracy"]
    fashion = next(row for row in table["fashion"] if row["w"] == w)
    for stage in ("base", "sr"):
        metrics.setdefault(("fashion", stage, "minilm"), {}).update({
            f"cascade_accuracy_w{w:g}": fashion["accuracy"],
            f"cascade_fid_{fashion['samples']}_w{w:g}": fashion["fid"]})
    shapes = {row["kind"]: row["all"] for row in table["shapes"] if row["w"] == w}
    metrics.setdefault(("shapes", "sr", "minilm"), {}).update(
        {f"cascade_all_right_{kind}_w{w:g}": share for kind, share in shapes.items()})
    for key, values in metrics.items():
        if checkpoint_path(*key).exists():
            record_metrics(checkpoint_path(*key), values)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="train the text-to-image cascade's stages")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one stage into data/checkpoints/ "
                                              "(resumable from runs/)")
    train.add_argument("dataset", choices=["fashion", "shapes"])
    train.add_argument("stage", choices=list(MODELS))
    train.add_argument("--encoder", choices=ENCODERS, default="minilm")
    train.add_argument("--steps", type=int, default=None,
                       help=f"default: base {STAGE_RECIPES['base']['steps']}, "
                            f"sr {STAGE_RECIPES['sr']['steps']}")
    train.add_argument("--seed", type=int, default=RECIPE["seed"])
    train.add_argument("--device", default=None)
    evaluation = commands.add_parser("evaluate", help="prompt accuracy and FID of the shipped "
                                                      "cascades, into " + EVAL_TABLE.name)
    evaluation.add_argument("--per-class", type=int, default=100)
    evaluation.add_argument("--shapes-n", type=int, default=200)
    for sub in (train, evaluation):
        sub.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        evaluate(args.per_class, args.shapes_n)
        print(f"written {EVAL_TABLE}")
        return
    steps = args.steps or STAGE_RECIPES[args.stage]["steps"]
    out = train_text2image(args.dataset, args.stage, args.encoder, device=args.device,
                           steps=steps, seed=args.seed)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
