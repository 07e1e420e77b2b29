"""Layout guidance: put each object where the prompt says, without retraining the U-Net.

The shapes base model binds colours to shapes but places "a red circle above a blue square" at
chance (notebook 07, section 8). The text encoder does say which object is the upper one (a
linear probe reads it from MiniLM's middle layers); the U-Net never learned to use it. Layout-
grounded diffusion splits the problem in two (Lian et al. 2023, "LLM-grounded Diffusion": a
layout from the prompt, then generation that follows the layout):

1. A layout stage, :class:`RoleHead`: a softmax regression on the frozen encoder's tokens gives
   every prompt token a distribution over :data:`ROLES`: "none" (not an object's word, or an
   object that no relation places: "a red circle", "two red circles") or the half of the image
   its object belongs in.
2. Backward guidance (Chen, Laina & Vedaldi 2024, "Training-Free Layout Control with
   Cross-Attention Guidance", eq. 3-4). A_uj is the attention of pixel u to token j in one
   cross-attention layer, B_r the half of role r. The energy

       E(x_t) = mean over layers  sum_{r != none}  (1 - sum_{u in B_r} A_ur / sum_u A_ur)^2,
       A_ur = sum_j p_j(r) A_uj,

   is lowered in the first sampling steps by a gradient step on the noisy image,

       x_t <- x_t - eta sqrt(1 - alpha_bar_t) grad_x E(x_t),

   before the usual guided DDIM step. Chen et al. scale the step by sigma_t^2 of a variance-
   exploding latent; x_t here has unit variance, and sqrt(1 - alpha_bar_t) is its noise level.

:mod:`course_lib.experiments.layout` fits the head on the shapes captions and measures what the
guidance buys.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from course_lib.diffusion import SAMPLERS, NoiseSchedule, ddim_step
from course_lib.imagen import SAMPLER, Guided, TextUNet
from course_lib.text import FrozenTextEncoder, TextEmbeddings
from course_lib.unet import Attention

ROLES = ("none", "upper", "lower", "left", "right")
ROLE_OF_RELATION = {"above": "upper", "below": "lower", "left of": "left", "right of": "right"}


def role_regions(size: int) -> torch.Tensor:
    """The halves B_r of a size x size grid for the roles after "none": [4, size * size] of 0/1,
    rows upper, lower, left, right (row-major pixels, as the attention flattens them)."""
    centre = torch.arange(size, dtype=torch.float32) + 0.5
    first = (centre < size / 2).float()
    upper = first[:, None].expand(size, size)  # [rows, columns]
    left = first[None, :].expand(size, size)
    return torch.stack([upper, 1 - upper, left, 1 - left]).flatten(1)


class RoleHead(nn.Module):
    """p_j(role) for every token j: softmax(W h_j + b) on the hidden states ``layers`` of the
    frozen encoder (``dim`` = their width side by side)."""

    def __init__(self, dim: int, layers: Sequence[int]):
        super().__init__()
        self.layers = list(layers)
        self.linear = nn.Linear(dim, len(ROLES))

    def forward(self, text: TextEmbeddings) -> torch.Tensor:
        """Role probabilities [B, L, len(ROLES)]; padding tokens get "none"."""
        if text.tokens.shape[-1] != self.linear.in_features:
            raise ValueError(f"the role head reads {self.linear.in_features}-wide tokens (encoder "
                             f"layers {self.layers}), got {text.tokens.shape[-1]}; encode the "
                             f"prompts with FrozenTextEncoder(layers={self.layers})")
        probs = self.linear(text.tokens).softmax(-1)
        none = torch.zeros(len(ROLES), dtype=probs.dtype, device=probs.device)
        none[0] = 1
        return torch.where(text.mask[..., None], probs, none)


def read_layout(head: RoleHead, encoder: FrozenTextEncoder, prompts: Sequence[str]
                ) -> torch.Tensor:
    """The layout stage: p_j(role) [N, L, len(ROLES)] of every token of every prompt."""
    if encoder.layers != head.layers:
        raise ValueError(f"the role head was fitted on encoder layers {head.layers}, the encoder "
                         f"gives {encoder.layers}")
    with torch.no_grad():
        return head(encoder(list(prompts)))


def token_attention(attention: Attention, x: torch.Tensor, context: torch.Tensor,
                    context_mask: torch.Tensor) -> torch.Tensor:
    """A_uj [B, H*W, L]: the weight pixel u gives token j in ``attention`` (its keys are the
    pixels, then the tokens; one softmax over both), recomputed from the layer's inputs so that
    gradients reach x."""
    b, c, h, w = x.shape
    qkv = attention.qkv(attention.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]
    q, k, _ = qkv.chunk(3, dim=2)  # [B, HW, C] each
    k_ctx, _ = attention.context_kv(context).chunk(2, dim=2)  # [B, L, C]
    logits = q @ torch.cat([k, k_ctx], dim=1).transpose(1, 2) / math.sqrt(c)  # [B, HW, HW + L]
    keys = torch.cat([torch.ones(b, h * w, dtype=torch.bool, device=x.device),
                      context_mask.bool()], dim=1)  # [B, HW + L]
    weights = logits.masked_fill(~keys[:, None, :], float("-inf")).softmax(-1)
    return weights[:, :, h * w:]


def layout_energy(maps: Sequence[torch.Tensor], roles: torch.Tensor) -> torch.Tensor:
    """E per image [B] (Chen et al. eq. 3, averaged over the attention layers): ``maps`` A
    [B, H*W, L] per layer, ``roles`` p [B, L, len(ROLES)]. Chen et al. add up the maps of an
    object's tokens; here role r's map is sum_j p_j(r) A_uj, and its term is weighted by
    min(1, sum_j p_j(r)), so a prompt without a placed object costs nothing."""
    p = roles[..., 1:]  # [B, L, 4]
    weight = p.sum(1).clamp(max=1)  # [B, 4]
    energy = 0
    for a in maps:
        regions = role_regions(math.isqrt(a.shape[1])).to(a)  # [4, HW]
        role_maps = torch.einsum("buj,bjr->bur", a, p)  # [B, HW, 4]
        inside = torch.einsum("bur,ru->br", role_maps, regions) / role_maps.sum(1).clamp_min(1e-8)
        energy = energy + (weight * (1 - inside) ** 2).sum(1)  # [B]
    return energy / len(maps)


@contextmanager
def attention_inputs(model: TextUNet):
    """Collects (attention layer, x, context, context_mask) of every cross-attention call of
    ``model`` while the block runs."""
    calls: list[tuple] = []
    hooks = [m.register_forward_hook(lambda m, inputs, output: calls.append((m, *inputs)))
             for m in model.unet.modules() if isinstance(m, Attention)]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def layout_step(model: TextUNet, schedule: NoiseSchedule, x_t: torch.Tensor, t: int,
                text: TextEmbeddings, roles: torch.Tensor, eta: float) -> torch.Tensor:
    """One backward-guidance update of x_t [B, C, H, W] at code step t (Chen et al. eq. 4)."""
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad(), attention_inputs(model) as calls:
        model(x, torch.full((len(x),), t, device=x.device), text)
        energy = layout_energy([token_attention(*call) for call in calls], roles).sum()
        (grad,) = torch.autograd.grad(energy, x)
    noise_level = math.sqrt(1 - schedule.alphas_cumprod[t].item())
    return (x - eta * noise_level * grad).detach()


def generate_with_layout(model: TextUNet, encoder: nn.Module, schedule: NoiseSchedule,
                         prompts: Sequence[str], roles: torch.Tensor, w: float = 2.0,
                         steps: int = 25, seed: int = 0, eta: float = 10.0,
                         guided_steps: int = 10, batch_size: int = 100) -> torch.Tensor:
    """Base-stage images [N, C, size, size] in [-1, 1]: guided DDIM on the trailing grid (as
    :func:`course_lib.imagen.generate`, the same noise for a seed) with a backward-guidance
    update (:func:`layout_step`, strength ``eta``) before each of the first ``guided_steps``
    steps. ``roles`` [N, L, len(ROLES)] comes from :func:`read_layout`; eta = 0 or
    guided_steps = 0 is :func:`course_lib.imagen.generate`."""
    if isinstance(prompts, str) or not len(prompts) or model.low_res_size:
        raise ValueError("generate_with_layout takes a base model and a non-empty list of prompts")
    if not (math.isfinite(eta) and eta >= 0) or not 0 <= guided_steps <= steps:
        raise ValueError(f"eta must be >= 0 and guided_steps in [0, steps={steps}], got eta = "
                         f"{eta}, guided_steps = {guided_steps}")
    if roles.ndim != 3 or roles.shape[0] != len(prompts) or roles.shape[2] != len(ROLES):
        raise ValueError(f"roles must be [N, L, {len(ROLES)}] for the {len(prompts)} prompts, "
                         f"got {tuple(roles.shape)}; read them with read_layout")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (model.channels, model.image_size, model.image_size)
    timesteps = SAMPLERS[SAMPLER].timesteps(schedule.T, steps)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        text = encoder(chunk).to(device)
        length = text.mask.shape[1]  # the chunk's longest prompt
        if roles.shape[1] < length:
            raise ValueError(f"roles cover {roles.shape[1]} tokens, the prompts have up to "
                             f"{length}; read them with read_layout")
        p = roles[i:i + batch_size, :length].to(device)  # [b, length, len(ROLES)]
        guided = Guided(model, text, w)
        x = torch.randn((len(chunk), *shape), generator=generator).to(device)
        for k, (t, t_prev) in enumerate(zip(timesteps, [*timesteps[1:], -1])):
            if k < guided_steps and eta > 0:
                x = layout_step(model, schedule, x, t, text, p, eta)
            with torch.no_grad():
                output = guided(x, torch.full((len(x),), t, device=device))
                x, _ = ddim_step(schedule, x, t, t_prev, output, clip="dynamic",
                                 prediction=model.prediction)
        out.append(x.cpu())
    return torch.cat(out).clamp(-1, 1)
