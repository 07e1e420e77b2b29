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
- Both stages sample with DDIM on the trailing grid of Lin et al. (2024), which starts from
  pure noise at t = T - 1.

Guidance convention (this module, Imagen and diffusers)::

    eps~ = w eps(z_t, c) + (1 - w) eps(z_t)        w = 1: no guidance, w = 0: unconditional

Ho & Salimans write eps~ = (1 + w') eps(z_t, c) - w' eps(z_t): the same thing with w = 1 + w'
(:func:`from_ho_salimans`).

The recipes, the training runs and the evaluation of the shipped cascades are in
:mod:`course_lib.experiments.text2image`; this module only defines what they run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.diffusion import NoiseSchedule, q_sample, sample
from course_lib.text import TextEmbeddings
from course_lib.unet import Attention, UNet, sinusoidal_embedding

P_UNCOND = 0.1  # conditioning dropout of Imagen and Ho & Salimans
AUG_LEVEL = 0.2  # noise augmentation of the low-resolution image at sampling (Imagen)
MAX_TRAIN_AUG_LEVEL = 0.5  # training draws the augmentation level uniformly in [0, 0.5)
# DDIM on Lin et al.'s trailing grid: 25 steps start from pure noise at t = 999. The leading grid
# starts at t = 960, where the networks expect 6 % of the image in z_t (sqrt(alpha_bar)); notebook
# 07 measures both (text2image_eval grid).
SAMPLER = "ddim_trailing"


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, Imagen's convention: w eps(z, c) + (1 - w) eps(z)."""
    if not math.isfinite(w) or eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"guidance needs a finite scale w and two eps estimates of one shape, "
                         f"got w = {w}, shapes {tuple(eps_cond.shape)} and "
                         f"{tuple(eps_uncond.shape)}")
    return eps_uncond + w * (eps_cond - eps_uncond)


def guided_prediction(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                      text: TextEmbeddings | None, w: float, **conditions) -> torch.Tensor:
    """Classifier-free guidance at one step: the conditional pass ``model(x_t, t, text)``, the
    unconditional pass ``model(x_t, t, None)`` (the learned null condition), combined by
    :func:`guided_eps`. ``conditions`` (a super-resolution model's ``low_res`` and ``aug_t``) go
    to both passes."""
    eps_cond = model(x_t, t, text, **conditions)
    eps_uncond = model(x_t, t, None, **conditions)
    return guided_eps(eps_cond, eps_uncond, w)


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


@torch.inference_mode()
def trace_conditioning(model: TextUNet, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings
                       ) -> list[dict]:
    """Where the text enters ``model``, with the tensor shapes of one forward pass on ``x``, t
    and ``text`` (read by forward hooks): one row per tensor, ``{"part", "tensor", "shape"}``,
    in the order the pass computes them. CombineEmbs: the pooled embedding's MLP output is
    added to the time embedding. Cross-attention, per attention layer: the queries of the
    h x w pixels attend to keys and values of the pixels and of the L projected tokens."""
    rows: list[dict] = []

    def add(part: str, tensor: str, shape) -> None:
        rows.append({"part": part, "tensor": tensor, "shape": list(shape)})

    def combine(module, inputs, output):
        add("CombineEmbs", "pooled text embedding", inputs[0].shape)
        add("CombineEmbs", "text MLP(pooled), added to the time embedding", output.shape)

    def time(module, inputs, output):
        add("CombineEmbs", "time embedding MLP(sinusoid(t))", output.shape)
        add("CombineEmbs", "their sum: to every residual block", output.shape)

    def attention(module, inputs, output):
        b, c, h, w = inputs[0].shape
        length = inputs[1].shape[1]
        part = f"cross-attention {h}x{w}"
        add(part, "pixel features in", inputs[0].shape)
        add(part, "queries (one per pixel)", (b, h * w, c))
        add(part, "text keys and values (each): Linear(tokens)", (b, length, c))
        add(part, "keys and values (each): pixels, then tokens", (b, h * w + length, c))
        add(part, "attention weights (padding tokens masked)", (b, h * w, h * w + length))
        add(part, "pixel features out (residual)", output.shape)

    hooks = [model.text_mlp.register_forward_hook(combine),
             model.unet.time_mlp.register_forward_hook(time)]
    hooks += [module.register_forward_hook(attention) for module in model.unet.modules()
              if isinstance(module, Attention)]
    add("prompt", "token embeddings (frozen encoder)", text.tokens.shape)
    add("prompt", "token mask (True: a real token)", text.mask.shape)
    try:
        out = model(x, t, text)
    finally:
        for hook in hooks:
            hook.remove()
    add("output", "predicted noise", out.shape)
    return rows


class Guided(nn.Module):
    """The guided prediction w out(z, c) + (1 - w) out(z) as a network that
    :func:`course_lib.diffusion.sample` can run (a conditional and an unconditional evaluation
    per step; one of them for w = 1 or w = 0). For a v-predicting network the same combination is
    guidance on eps: at a given z_t, v is an affine function of eps."""

    def __init__(self, model: TextUNet, text: TextEmbeddings, w: float,
                 low_res: torch.Tensor | None = None, aug_t: torch.Tensor | None = None):
        super().__init__()
        self.model, self.text, self.w, self.low_res, self.aug_t = model, text, w, low_res, aug_t
        self.num_steps = model.num_steps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditions = {"low_res": self.low_res, "aug_t": self.aug_t}
        if self.w in (0, 1):  # one pass: unconditional (w = 0) or conditional (w = 1)
            return self.model(x, t, self.text if self.w == 1 else None, **conditions)
        return guided_prediction(self.model, x, t, self.text, self.w, **conditions)


Stage = tuple[TextUNet, nn.Module, NoiseSchedule]  # (network, text encoder, schedule)


# --- sampling ----------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model: TextUNet, encoder: nn.Module, schedule: NoiseSchedule,
             prompts: Sequence[str], w: float = 3.0, steps: int = 25, seed: int = 0,
             low_res: torch.Tensor | None = None, aug_level: float = AUG_LEVEL,
             clip: bool | str = "dynamic", batch_size: int = 100, sampler: str = SAMPLER
             ) -> torch.Tensor:
    """One image per prompt [N, C, size, size] in [-1, 1] (CPU): ``sampler`` (DDIM on the
    trailing grid, or ``"ddim"`` on the leading one) with ``steps`` steps and guidance scale
    ``w`` (Imagen's convention), x_0 predictions dynamically thresholded. A
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
        out.append(sample(guided, schedule, (len(chunk), *shape), sampler, steps, clip=clip,
                          prediction=model.prediction, generator=generator, device=device,
                          progress=False).cpu())
    return torch.cat(out).clamp(-1, 1)


def cascade(base: Stage, sr: Stage, prompts: Sequence[str], w: float = 3.0, sr_w: float = 1.0,
            steps: int = 25, sr_steps: int = 25, seed: int = 0, sampler: str = SAMPLER,
            sr_sampler: str = SAMPLER) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> 16x16 (base model) -> 32x32 (super-resolution model, conditioned on the same
    prompt and the noise-augmented 16x16 image); each stage a (network, encoder, schedule)
    triple (:func:`course_lib.experiments.text2image.load_text2image` loads the shipped ones)
    sampled by :func:`generate`. Returns both images, in [-1, 1]."""
    low = generate(*base, prompts, w=w, steps=steps, seed=seed, sampler=sampler)
    high = generate(*sr, prompts, w=sr_w, steps=sr_steps, seed=seed + 1, low_res=low,
                    sampler=sr_sampler)
    return low, high
