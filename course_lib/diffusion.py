"""Denoising diffusion (Ho et al. 2020, DDPM; Song et al. 2021, DDIM): noise schedules, the forward
process, the training objective and the two samplers.

The step convention, the classic off-by-one: the paper counts t = 1..T; the code, like
diffusers, indexes arrays and the network by ``t`` = 0..T-1, so code ``t`` is the paper's t + 1.
``schedule.betas[0]`` is the paper's beta_1, ``q_sample(x0, t=0)`` is one step of noise, and
Algorithm 2's last step (paper t = 1, where no noise is added) is code ``t = 0``. The clean image
x_0 has no index in the arrays; where a formula needs alpha_bar_0 it is 1.

Images live in [-1, 1] (Ho et al.); every sampler can clip the predicted x_0 to that range,
as Ho et al.'s code and diffusers do by default.

``python -m course_lib.diffusion train`` trains the shipped Fashion-MNIST checkpoint and
``python -m course_lib.diffusion fid`` measures its sampler table (see :func:`main`).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_lib import distributed
from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.runtime import CHECKPOINT_DIR, RUNS_DIR, get_device, seed_everything
from course_lib.unet import UNet

PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("beta", "posterior")


class NoiseSchedule:
    """beta_1..beta_T and what follows from them, as float64 tensors of length T indexed by
    code t = 0..T-1 (paper t = 1..T):

    alphas = 1 - beta, alphas_cumprod = alpha_bar_t = prod_{i<=t} alpha_i,
    signal_rate = sqrt(alpha_bar_t), noise_rate = sqrt(1 - alpha_bar_t),
    snr = alpha_bar_t / (1 - alpha_bar_t).
    """

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a vector of values in (0, 1], got shape "
                             f"{tuple(betas.shape)}, range [{betas.min():.3g}, {betas.max():.3g}]")
        self.name, self.betas = name, betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.signal_rate = self.alphas_cumprod.sqrt()
        self.noise_rate = (1 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def T(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, T={self.T})"

    def alpha_bar_prev(self, t: int) -> float:
        """alpha_bar of the step before code t; 1 before the first step (x_0 is clean)."""
        return self.alphas_cumprod[t - 1].item() if t > 0 else 1.0

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, name: str) -> NoiseSchedule:
        """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} with alpha_bar_0 = 1."""
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return cls(1 - alphas_cumprod / previous, name)


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
                    ) -> NoiseSchedule:
    """Ho et al. 2020: beta_t linear from 1e-4 to 0.02 (their T = 1000)."""
    return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); beta_t = 1 - alpha_bar(t) / alpha_bar(t-1)
    clipped at ``max_beta`` so that the last steps stay finite."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return NoiseSchedule((1 - f[1:] / f[:-1]).clamp(max=max_beta), "cosine")


def offset_cosine_schedule(T: int = 1000, min_signal_rate: float = 0.02,
                           max_signal_rate: float = 0.95) -> NoiseSchedule:
    """Foster, ch. 8: signal rate cos(angle), noise rate sin(angle), the angle linear in t/T
    from acos(max_signal_rate) to acos(min_signal_rate). Paper t = 1 already has the noise rate
    sqrt(1 - 0.95^2) = 0.31 ("a large initial noise"), t = T the signal rate 0.02."""
    start, end = math.acos(max_signal_rate), math.acos(min_signal_rate)
    angles = start + torch.arange(1, T + 1, dtype=torch.float64) / T * (end - start)
    return NoiseSchedule.from_alphas_cumprod(torch.cos(angles) ** 2, "offset_cosine")


SCHEDULES: dict[str, Callable[[int], NoiseSchedule]] = {
    "linear": linear_schedule, "cosine": cosine_schedule, "offset_cosine": offset_cosine_schedule}


def make_schedule(name: str, T: int = 1000) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](T)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")


def _noise_for(x: torch.Tensor, noise: torch.Tensor | None, name: str) -> torch.Tensor:
    """Checked ``noise`` for images ``x`` (drawn when None)."""
    _check_finite(name, x)
    if noise is None:
        return torch.randn_like(x)
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of {name}, {tuple(x.shape)}, got "
                         f"{tuple(noise.shape)}")
    _check_finite("noise", noise)
    return noise


def _check_step_inputs(x_t: torch.Tensor, output: torch.Tensor) -> None:
    if output.shape != x_t.shape:
        raise ValueError(f"the network output must have the shape of x_t, {tuple(x_t.shape)}, "
                         f"got {tuple(output.shape)}")
    _check_finite("x_t", x_t)
    _check_finite("the network output", output)


def _steps(schedule: NoiseSchedule, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Code steps t as a long tensor [B], checked to lie in 0..T-1."""
    t = torch.as_tensor(t, device=x.device)
    if t.is_floating_point() or t.ndim > 1 or (t.ndim == 1 and len(t) != len(x)):
        raise ValueError(f"t must be an integer or integer tensor [B] = [{len(x)}], got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.numel() and (t.min() < 0 or t.max() >= schedule.T):
        raise ValueError(f"t must be in 0..{schedule.T - 1} (code steps; the paper's t = 1..T "
                         f"is code t = 0..T-1), got values in [{t.min().item()}, "
                         f"{t.max().item()}]")
    return t.long().expand(len(x))


def _at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [B, 1, 1, 1] to broadcast over images x [B, C, H, W]."""
    return values.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def q_step(schedule: NoiseSchedule, x_prev: torch.Tensor, t: int | torch.Tensor,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """One forward step, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (eq. 2):
    x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps. Code t = 0 noises the clean x_0 into x_1."""
    t = _steps(schedule, t, x_prev)
    noise = _noise_for(x_prev, noise, "x_prev")
    beta = _at(schedule.betas, t, x_prev)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """The shortcut q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. (The lecture slide writes the noise
    coefficient without its square root; this is the correct form.)"""
    t = _steps(schedule, t, x0)
    noise = _noise_for(x0, noise, "x0")
    return _at(schedule.signal_rate, t, x0) * x0 + _at(schedule.noise_rate, t, x0) * noise


def training_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
    """What the network learns to output: eps (Ho et al.), x_0, or
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return _at(schedule.signal_rate, t, x0) * noise - _at(schedule.noise_rate, t, x0) * x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def diffusion_loss(model: Callable[..., torch.Tensor], schedule: NoiseSchedule, x0: torch.Tensor,
                   prediction: str = "epsilon", t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """Algorithm 1: t ~ Uniform{1..T} (code 0..T-1), eps ~ N(0, I),
    || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2, the mean over
    the batch and the pixels (Ho et al.'s L_simple). ``prediction`` swaps the target. ``t`` and
    ``noise`` are drawn here unless given (data-parallel training draws them for the global
    batch)."""
    if t is None:
        t = torch.randint(0, schedule.T, (len(x0),), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, t, noise)
    return F.mse_loss(model(x_t, t, **model_kwargs),
                      training_target(schedule, x0, noise, t, prediction))


def predict_x0_and_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, output: torch.Tensor,
                       prediction: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output at code step t turned into (x_0 estimate, eps estimate), using
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 15 for eps-prediction)."""
    a, b = schedule.signal_rate[t].item(), schedule.noise_rate[t].item()
    if prediction == "epsilon":
        return (x_t - b * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / b
    if prediction == "v":
        return a * x_t - b * output, b * x_t + a * output
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s is the
    ``percentile`` quantile of |x_0|, raised to at least 1; x_0 is clipped to [-s, s] and divided
    by s. Where |x_0| <= 1 already (s = 1) it is static clipping; large guidance scales push x_0
    far out, and dividing by s pulls saturated pixels back instead of flattening them at +-1."""
    magnitudes = x0.abs().flatten(1)  # [B, C*H*W]
    if magnitudes.dtype != torch.float64:
        magnitudes = magnitudes.float()  # quantile takes float32 or float64
    s = torch.quantile(magnitudes, percentile, dim=1).clamp(min=1)  # [B]
    s = s.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))  # [B, 1, 1, 1]
    return x0.clamp(-s, s) / s


def _clipped(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, x0: torch.Tensor,
             clip: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 clipped to [-1, 1] (``clip=True``) or dynamically thresholded (``"dynamic"``), and
    the eps consistent with it and x_t."""
    x0 = dynamic_threshold(x0) if clip == "dynamic" else x0.clamp(-1, 1)
    return x0, (x_t - schedule.signal_rate[t].item() * x0) / schedule.noise_rate[t].item()


def _check_clip(clip: bool | str) -> None:
    if not (isinstance(clip, bool) or clip == "dynamic"):
        raise ValueError(f"clip must be True (x_0 clipped to [-1, 1]), False or 'dynamic' "
                         f"(Imagen's dynamic thresholding), got {clip!r}")


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, output: torch.Tensor,
              variance: str = "beta", clip: bool | str = True, prediction: str = "epsilon",
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 2 from code step t (paper t + 1) to t - 1; returns (x_{t-1}, x_0
    estimate):

        x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - alpha_bar_t) eps) + sigma_t z,

    z ~ N(0, I) except at code t = 0 (paper t = 1), where z = 0. ``variance="beta"`` is
    sigma_t^2 = beta_t (Ho et al.'s CIFAR-10 choice, diffusers' ``fixed_large``);
    ``"posterior"`` is beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (diffusers'
    default ``fixed_small``). With ``clip``, the x_0 estimate is clipped to [-1, 1] and eps
    recomputed from it, which makes the mean the posterior mean mu~_t(x_t, clip(x_0)) (eq. 7),
    as in Ho et al.'s code and diffusers' ``clip_sample=True``; ``clip="dynamic"`` uses
    :func:`dynamic_threshold` instead.
    """
    if not 0 <= t < schedule.T:
        raise ValueError(f"t must be in 0..{schedule.T - 1} (code steps), got {t}")
    _check_step_inputs(x_t, output)
    x0, eps = predict_x0_and_eps(schedule, x_t, t, output, prediction)
    _check_clip(clip)
    if clip:
        x0, eps = _clipped(schedule, x_t, t, x0, clip)
    alpha, beta = schedule.alphas[t].item(), schedule.betas[t].item()
    mean = (x_t - beta / schedule.noise_rate[t].item() * eps) / math.sqrt(alpha)
    if t == 0:
        return mean, x0
    if variance == "beta":
        sigma2 = beta
    elif variance == "posterior":
        sigma2 = (1 - schedule.alpha_bar_prev(t)) / (1 - schedule.alphas_cumprod[t].item()) * beta
    else:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
    return mean + math.sqrt(sigma2) * noise, x0


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The DDIM sub-sequence of code steps, spaced by T // steps from 0 and descending
    (Song et al.'s code and diffusers' default ``leading`` spacing): 10 of 1000 -> 900, ..., 0."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM takes 1..{T} steps for T = {T}, got {steps}")
    return list(range(0, T, T // steps))[:steps][::-1]


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_prev: int,
              output: torch.Tensor, eta: float = 0.0, clip: bool | str = True,
              prediction: str = "epsilon", noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) from code step t to t_prev < t (t_prev = -1:
    to the clean image, alpha_bar = 1); returns (x_{t_prev}, x_0 estimate):

        x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev).

    eta = 0 is deterministic; eta = 1 with every step is DDPM with the posterior variance.
    ``clip`` as in :func:`ddpm_step` (diffusers: ``clip_sample=True, use_clipped_model_output=True``).
    """
    if not (0 <= t < schedule.T and -1 <= t_prev < t):
        raise ValueError(f"need 0 <= t < T = {schedule.T} and -1 <= t_prev < t (code steps), "
                         f"got t = {t}, t_prev = {t_prev}")
    _check_step_inputs(x_t, output)
    x0, eps = predict_x0_and_eps(schedule, x_t, t, output, prediction)
    _check_clip(clip)
    if clip:
        x0, eps = _clipped(schedule, x_t, t, x0, clip)
    a_t = schedule.alphas_cumprod[t].item()
    a_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    if sigma > 0:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        x_prev = x_prev + sigma * noise
    return x_prev, x0


@dataclass
class Trajectory:
    """What a sampler went through: ``timesteps[i]`` is the code step of ``x[i]`` (x_t, before
    the step) and of ``x0[i]`` (the network's x_0 estimate from it); ``x[-1]`` is the sample."""

    timesteps: list[int] = field(default_factory=list)
    x: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)


def _check_model(model: nn.Module, schedule: NoiseSchedule) -> None:
    num_steps = getattr(model, "num_steps", schedule.T)
    if num_steps != schedule.T:
        raise ValueError(f"the network was trained with T = {num_steps} steps but the schedule "
                         f"has T = {schedule.T}; sample with the schedule it was trained with")


@torch.inference_mode()
def sample(model: Callable[..., torch.Tensor], schedule: NoiseSchedule,
           shape: tuple[int, ...], sampler: str = "ddpm", steps: int | None = None,
           eta: float = 0.0, variance: str = "beta", clip: bool | str = True,
           prediction: str = "epsilon", generator: torch.Generator | None = None,
           device: str | torch.device = "cpu", return_trajectory: bool = False,
           progress: bool = True, **model_kwargs) -> torch.Tensor | Trajectory:
    """Draw x_T ~ N(0, I) and denoise it: ``sampler="ddpm"`` runs Algorithm 2 over all T steps
    (:func:`ddpm_step`); ``"ddim"`` runs ``steps`` DDIM steps (:func:`ddim_step`, default 50).
    Noise comes from the CPU ``generator``, so a seed gives the same images on every device.
    Returns the samples [shape] or, with ``return_trajectory``, a :class:`Trajectory` (on CPU).
    """
    _check_model(model, schedule)
    if sampler == "ddpm":
        timesteps = list(range(schedule.T - 1, -1, -1))
    elif sampler == "ddim":
        timesteps = ddim_timesteps(schedule.T, steps or 50)
    else:
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    x = torch.randn(shape, generator=generator).to(device)
    trajectory = Trajectory()
    for i, t in enumerate(tqdm(timesteps, desc=sampler.upper(), leave=False,
                               disable=not progress)):
        output = model(x, torch.full((shape[0],), t, device=device), **model_kwargs)
        if sampler == "ddpm":
            x_next, x0 = ddpm_step(schedule, x, t, output, variance, clip, prediction,
                                   generator=generator)
        else:
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x_next, x0 = ddim_step(schedule, x, t, t_prev, output, eta, clip, prediction,
                                   generator=generator)
        if return_trajectory:
            trajectory.timesteps.append(t)
            trajectory.x.append(x.cpu())
            trajectory.x0.append(x0.cpu())
        x = x_next
    if not return_trajectory:
        return x
    trajectory.x.append(x.cpu())
    return trajectory


ARCH = "ddpm_unet"
CHECKPOINT = CHECKPOINT_DIR / "ddpm_fashion.pt"
FID_TABLE = CHECKPOINT_DIR / "ddpm_fashion_fid.json"
RECIPE = {"model": {"base": 32, "channel_mults": [1, 2, 2], "depth": 1,
                    "attention_resolutions": [7, 8], "image_size": 28, "dropout": 0.0,
                    "num_steps": 1000},
          "schedule": "cosine", "prediction": "epsilon", "steps": 6_000, "batch_size": 64,
          "lr": 1e-3, "weight_decay": 1e-4, "warmup": 300, "grad_clip": 1.0, "ema": 0.999,
          "seed": 0}


def make_optimizer(module: nn.Module, config: dict
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer of the course's diffusion recipes: AdamW (``lr``, ``weight_decay``) with a
    linear warm-up over ``warmup`` steps, then cosine decay towards 0 at ``steps``."""
    opt = torch.optim.AdamW(module.parameters(), lr=config["lr"],
                            weight_decay=config["weight_decay"])
    steps, warmup = config["steps"], config["warmup"]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    return opt, lr_schedule


def optimize(loss: torch.Tensor, module: nn.Module, opt: torch.optim.Optimizer,
             lr_schedule: torch.optim.lr_scheduler.LRScheduler, grad_clip: float) -> None:
    """One update: backward (under DDP the gradients are averaged over the ranks here), the
    gradient norm clipped at ``grad_clip`` (1 in Ho et al.), the optimizer and schedule steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    lr_schedule.step()


def train_ddpm(out: str | Path = CHECKPOINT, run: str | Path | None = None,
               device: str | torch.device | None = None, resume: bool = True,
               checkpoint_every: int = 500, live_plot: bool | None = False, **overrides
               ) -> tuple[UNet, NoiseSchedule]:
    """Algorithm 1 on Fashion-MNIST in [-1, 1]: AdamW with linear warm-up and cosine decay,
    gradient clipping at 1 (Ho et al.), EMA of the weights. The training state goes to ``run``
    every ``checkpoint_every`` steps (a killed run resumes from there); ``out`` receives the EMA
    network only. Returns the EMA network and the schedule."""
    from course_lib.data import load_fashion_mnist
    from course_lib.train import EMA, Minibatches, fit

    device = distributed.local_device(get_device(device))
    distributed.init(device)
    config = {**RECIPE, **overrides}
    run = Path(run) if run is not None else RUNS_DIR / "ddpm_fashion" / "train.pt"
    seed_everything(config["seed"])
    x_train, _ = load_fashion_mnist("train", size=config["model"]["image_size"],
                                    value_range=(-1, 1), device=device)
    schedule = make_schedule(config["schedule"], config["model"]["num_steps"])
    model = UNet(**config["model"]).to(device)
    ema = EMA(model, config["ema"])
    opt, lr_schedule = make_optimizer(model, config)
    steps = config["steps"]
    batches = Minibatches(x_train, batch_size=config["batch_size"], seed=config["seed"])
    net = distributed.wrap(model)

    def train_step(batch):
        model.train()
        x0 = batch[0]  # the global batch; every rank draws the same t and noise for it
        t = torch.randint(0, schedule.T, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        loss = diffusion_loss(net, schedule, distributed.shard(x0), config["prediction"],
                              t=distributed.shard(t), noise=distributed.shard(noise))
        optimize(loss, model, opt, lr_schedule, config["grad_clip"])
        return {"loss": distributed.mean_over_ranks(loss)}

    history = fit(train_step, batches, steps, ema=ema, checkpoint=run, arch=f"{ARCH}_training",
                  config=config, checkpoint_every=checkpoint_every, resume=resume,
                  modules={"model": model, "opt": opt, "lr_schedule": lr_schedule},
                  live_plot=live_plot, log_every=50, desc="DDPM")
    distributed.check_in_sync(model)
    if not distributed.is_main():
        return ema.model.eval(), schedule
    seconds = load_checkpoint(run, arch=f"{ARCH}_training")["metrics"]["train_seconds"]
    save_checkpoint(out, {"ema": ema.state_dict(), "history": history.state_dict()}, arch=ARCH,
                    config=config, step=steps,
                    metrics={"loss": round(history.last(500)["loss"], 4)},
                    train_seconds=seconds, device=str(device), threads=torch.get_num_threads(),
                    processes=distributed.world_size(),
                    command=f"python -m course_lib.diffusion train --steps {steps} --threads "
                            f"{torch.get_num_threads()}")
    return ema.model.eval(), schedule


def load_ddpm(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
              ) -> tuple[UNet, NoiseSchedule]:
    """The EMA network of a verified checkpoint (eval mode) and the schedule it was trained
    with."""
    payload = load_checkpoint(path, arch=ARCH)
    config = payload["config"]
    model = UNet(**config["model"])
    load_state(model, payload["state"]["ema"], "ema")
    return model.to(device).eval(), make_schedule(config["schedule"],
                                                  config["model"]["num_steps"])


@torch.inference_mode()
def generate(model: UNet, schedule: NoiseSchedule, n: int, sampler: str = "ddim",
             steps: int | None = None, seed: int = 0, batch_size: int = 100,
             **sample_kwargs) -> torch.Tensor:
    """n images [n, C, H, W] in [-1, 1] (on CPU), drawn batch by batch from one seeded
    generator with :func:`sample` (a progress bar over the batches)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (model.in_channels, model.image_size, model.image_size)
    return torch.cat([
        sample(model, schedule, (min(batch_size, n - i), *shape), sampler, steps,
               generator=generator, device=device, progress=False, **sample_kwargs).cpu()
        for i in tqdm(range(0, n, batch_size), desc=f"{sampler.upper()} {steps or ''}".strip())
    ]).clamp(-1, 1)


TABLE_ROWS = {"ddpm_1000": ("ddpm", None), "ddim_10": ("ddim", 10), "ddim_25": ("ddim", 25),
              "ddim_50": ("ddim", 50), "ddim_100": ("ddim", 100)}


def fid_table(rows: list[str], samples: int = 1000, large_samples: int = 10_000,
              large_row: str = "ddim_50", path: str | Path = CHECKPOINT,
              out: str | Path = FID_TABLE, seed: int = 0) -> dict:
    """FID (course classifier features, against the 10,000 Fashion-MNIST test images) and
    sampling wall time of the checkpoint for each of ``rows`` (keys of ``TABLE_ROWS``, each at
    ``samples`` images; ``"large"`` is ``large_row`` at ``large_samples``). Each finished row is
    merged into the JSON ``out`` at once, so several processes can share the work."""
    from course_lib.data import load_fashion_mnist
    from course_lib.metrics import ClassifierFeatures, fid_from_features

    model, schedule = load_ddpm(path)
    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test")
    x_train, _ = load_fashion_mnist("train")
    test_features = features(x_test)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    floor = {str(n): round(fid_from_features(features(x_train[order[:n]]), test_features), 3)
             for n in sorted({samples, large_samples})}
    for row in rows:
        name, n = (large_row, large_samples) if row == "large" else (row, samples)
        sampler, steps = TABLE_ROWS[name]
        start = time.perf_counter()
        images = generate(model, schedule, n, sampler, steps, seed)
        seconds = time.perf_counter() - start
        threads = torch.get_num_threads()
        result = {"sampler": sampler.upper(), "steps": steps or schedule.T, "samples": n,
                  "fid": round(fid_from_features(features((images + 1) / 2), test_features), 3),
                  "seconds": round(seconds, 1), "threads": threads, "seed": seed,
                  "command": f"python -m course_lib.diffusion fid --rows {row} --samples "
                             f"{samples} --large-samples {large_samples} --large-row "
                             f"{large_row} --threads {threads}"}
        table = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        table.setdefault("rows", {})[f"{name}@{n}"] = result
        table |= {"checkpoint": Path(path).name, "features": "course classifier, 128-D",
                  "reference": "Fashion-MNIST test set, 10,000 images",
                  "floor_train_vs_test": floor, "ddpm_variance": "beta", "clip_x0": True}
        Path(out).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        print(f"{name} at {n} samples: FID {result['fid']}, {seconds:.0f} s")
    return json.loads(Path(out).read_text())


def record_fid(path: str | Path = CHECKPOINT, table_path: str | Path = FID_TABLE) -> None:
    """Copy the table's FIDs into the checkpoint's manifest metrics (re-saving the checkpoint
    with :func:`save_checkpoint`, which records it)."""
    from course_lib.checkpoint import read_manifest

    payload = load_checkpoint(path, arch=ARCH)
    table = json.loads(Path(table_path).read_text())
    metrics = payload["metrics"] | {
        f"fid_{row['samples']}_{row['sampler'].lower()}{row['steps']}": row["fid"]
        for row in table["rows"].values()}
    info = {k: v for k, v in read_manifest(Path(path).parent)[Path(path).name].items()
            if k not in ("sha256", "size_bytes", "arch", "config", "step", "metrics")}
    save_checkpoint(path, payload["state"], arch=ARCH, config=payload["config"],
                    step=payload["step"], metrics=metrics, **info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train and evaluate the course's DDPM on "
                                                 "Fashion-MNIST")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the shipped EMA checkpoint (resumable)")
    train.add_argument("--steps", type=int, default=RECIPE["steps"])
    train.add_argument("--seed", type=int, default=RECIPE["seed"])
    train.add_argument("--out", default=str(CHECKPOINT))
    train.add_argument("--train-state", default=str(RUNS_DIR / "ddpm_fashion" / "train.pt"),
                       help="the resumable training state (torchrun reserves --run...)")
    train.add_argument("--device", default=None)
    train.add_argument("--batch-size", type=int, default=RECIPE["batch_size"],
                       help="the global batch, split over the processes under torchrun")
    train.add_argument("--model", type=json.loads, default={},
                       help='U-Net overrides as JSON, e.g. \'{"base": 64}\' (see RECIPE)')
    table = commands.add_parser("fid", help="FID and wall time of DDPM-1000 and DDIM-10/25/50/"
                                              "100, written to data/checkpoints/" + FID_TABLE.name)
    table.add_argument("--rows", default=",".join([*TABLE_ROWS, "large"]),
                       help="comma-separated rows to compute: " + ", ".join(TABLE_ROWS)
                            + ", large (the --large-row sampler at --large-samples)")
    table.add_argument("--samples", type=int, default=1000)
    table.add_argument("--large-samples", type=int, default=10_000)
    table.add_argument("--large-row", default="ddim_50", choices=list(TABLE_ROWS))
    table.add_argument("--record", action="store_true",
                       help="only copy the table's FIDs into the checkpoint's manifest metrics")
    for sub in (train, table):
        sub.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (1 leaves a core to others on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        train_ddpm(args.out, args.train_state, args.device, steps=args.steps, seed=args.seed,
                   batch_size=args.batch_size, model={**RECIPE["model"], **args.model})
        if distributed.is_main():
            print(f"saved {args.out} ({distributed.world_size()} process(es))")
        distributed.finish()
    elif args.record:
        record_fid()
    else:
        fid_table(args.rows.split(","), args.samples, args.large_samples, args.large_row)


if __name__ == "__main__":
    main()
