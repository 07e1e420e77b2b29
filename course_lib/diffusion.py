"""Denoising diffusion (Ho et al. 2020, DDPM; Song et al. 2021, DDIM): noise schedules, the forward
process, the training objective, the reverse steps and one sampling loop.

Notation (code name: paper symbol)::

    t                           code step 0..T-1, the paper's t = 1..T (see below)
    t_prev                      the step a reverse step goes to; -1 is the clean image
    schedule.betas[t]           beta_t
    schedule.alphas[t]          alpha_t = 1 - beta_t
    schedule.alphas_cumprod[t]  alpha_bar_t = prod_{s <= t} alpha_s  (alpha_bar = 1 at t = -1)
    schedule.signal_rate[t]     sqrt(alpha_bar_t)       (Foster's name, used by q(x_t | x_0))
    schedule.noise_rate[t]      sqrt(1 - alpha_bar_t)
    x0, eps                     x_0, epsilon
    model_output                eps_theta(x_t, t); with ``prediction`` the network's x_0 or v
    sigma                       sigma_t, the standard deviation of a reverse step's noise z

The step convention, the classic off-by-one: the paper counts t = 1..T; the code, like
diffusers, indexes arrays and the network by ``t`` = 0..T-1, so code ``t`` is the paper's t + 1.
``schedule.betas[0]`` is the paper's beta_1, ``q_sample(x0, t=0)`` is one step of noise, and
Algorithm 2's last step (paper t = 1, where no noise is added) is code ``t = 0``.

Images live in [-1, 1] (Ho et al.); every sampler can clip the predicted x_0 to that range,
as Ho et al.'s code and diffusers do by default.

Every sampler is a pair in :data:`SAMPLERS`: the descending timesteps it visits and a step
``step(schedule, x_t, t, t_prev, model_output, **options) -> (x_{t_prev}, x_0 estimate)``, so
:func:`sample` is one loop for all of them. The steps do no input checks; :func:`sample` checks
its arguments once. Training and evaluation of the shipped model live in
:mod:`course_lib.experiments.ddpm`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_lib.checks import check_count

PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("beta", "posterior")
DDIM_STEPS = 50  # the DDIM sampler's default number of steps


class NoiseSchedule:
    """beta_1..beta_T and what follows from them, as float64 tensors of length T indexed by
    code t = 0..T-1 (paper t = 1..T):

    alphas = 1 - beta, alphas_cumprod = alpha_bar_t = prod_{i<=t} alpha_i,
    signal_rate = sqrt(alpha_bar_t), noise_rate = sqrt(1 - alpha_bar_t),
    snr = alpha_bar_t / (1 - alpha_bar_t).
    """

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a vector of T >= 1 values, got shape "
                             f"{tuple(betas.shape)}")
        if not ((betas > 0) & (betas <= 1)).all():
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

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, name: str) -> NoiseSchedule:
        """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} with alpha_bar_0 = 1."""
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return cls(1 - alphas_cumprod / previous, name)


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
                    ) -> NoiseSchedule:
    """Ho et al. 2020: beta_t linear from 1e-4 to 0.02 (their T = 1000)."""
    check_count(T, "T (the number of diffusion steps)")
    return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); beta_t = 1 - alpha_bar(t) / alpha_bar(t-1)
    clipped at ``max_beta`` so that the last steps stay finite."""
    check_count(T, "T (the number of diffusion steps)")
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return NoiseSchedule((1 - f[1:] / f[:-1]).clamp(max=max_beta), "cosine")


def offset_cosine_schedule(T: int = 1000, min_signal_rate: float = 0.02,
                           max_signal_rate: float = 0.95) -> NoiseSchedule:
    """Foster, ch. 8: signal rate cos(angle), noise rate sin(angle), the angle linear in t/T
    from acos(max_signal_rate) to acos(min_signal_rate). Paper t = 1 already has the noise rate
    sqrt(1 - 0.95^2) = 0.31 ("a large initial noise"), t = T the signal rate 0.02."""
    check_count(T, "T (the number of diffusion steps)")
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


def predict_x0_and_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: int,
                       model_output: torch.Tensor, prediction: str = "epsilon"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output at code step t turned into (x_0 estimate, eps estimate), using
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4; eq. 15 for eps-prediction)
    and v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
    alpha_bar_t = schedule.alphas_cumprod[t].item()
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction == "epsilon":
        return (x_t - sqrt_one_minus_alpha_bar * model_output) / sqrt_alpha_bar, model_output
    if prediction == "x0":
        return model_output, (x_t - sqrt_alpha_bar * model_output) / sqrt_one_minus_alpha_bar
    if prediction == "v":
        return (sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * model_output,
                sqrt_one_minus_alpha_bar * x_t + sqrt_alpha_bar * model_output)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s is the
    ``percentile`` quantile of |x_0|, raised to at least 1; x_0 is clipped to [-s, s] and divided
    by s. Where |x_0| <= 1 already (s = 1) it is static clipping; large guidance scales push x_0
    far out, and dividing by s pulls saturated pixels back instead of flattening them at +-1."""
    magnitudes = x0.abs().flatten(1)  # [B, C*H*W]
    if magnitudes.dtype != torch.float64:
        magnitudes = magnitudes.float()  # quantile takes float32 or float64
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1] (Imagen uses 0.995), got {percentile}")
    s = torch.quantile(magnitudes, percentile, dim=1).clamp(min=1)  # [B]
    s = s.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))  # [B, 1, 1, 1]
    return x0.clamp(-s, s) / s


def clip_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, x0: torch.Tensor,
            clip: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 clipped to [-1, 1] (``clip=True``) or dynamically thresholded (``"dynamic"``), and
    the eps consistent with it and x_t:
    eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    x0 = dynamic_threshold(x0) if clip == "dynamic" else x0.clamp(-1, 1)
    alpha_bar_t = schedule.alphas_cumprod[t].item()
    return x0, (x_t - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)


def _standard_normal(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) of x's shape, drawn on the CPU (a seed gives the same images on any device)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def ddpm_timesteps(T: int, steps: int | None = None) -> list[int]:
    """Algorithm 2 visits every step: code T-1, ..., 0."""
    if steps not in (None, T):
        raise ValueError(f"DDPM (Algorithm 2) runs all T = {T} steps, got steps={steps}; use the "
                         f"'ddim' sampler for fewer")
    return list(range(T - 1, -1, -1))


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_prev: int,
              model_output: torch.Tensor, *, variance: str = "beta", clip: bool | str = True,
              prediction: str = "epsilon", noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 2 from code step t (paper t + 1) to t_prev = t - 1; returns
    (x_{t-1}, x_0 estimate):

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z,

    z ~ N(0, I) except at code t = 0 (paper t = 1), where z = 0. ``variance="beta"`` is
    sigma_t^2 = beta_t (Ho et al.'s CIFAR-10 choice, diffusers' ``fixed_large``);
    ``"posterior"`` is beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (eq. 7,
    diffusers' default ``fixed_small``). With ``clip``, the x_0 estimate is clipped to [-1, 1]
    and eps recomputed from it, which makes the mean the posterior mean mu~_t(x_t, clip(x_0))
    (eq. 7), as in Ho et al.'s code and diffusers' ``clip_sample=True``; ``clip="dynamic"``
    uses :func:`dynamic_threshold` instead. ``noise`` is z (drawn from ``generator`` if None).
    """
    # 1. the schedule at step t
    alpha_t, beta_t = schedule.alphas[t].item(), schedule.betas[t].item()
    alpha_bar_t = schedule.alphas_cumprod[t].item()
    # 2. the network's output as x_0 and eps
    x0, eps = predict_x0_and_eps(schedule, x_t, t, model_output, prediction)
    # 3. x_0 clipped to the data range, eps consistent with it
    if clip:
        x0, eps = clip_x0(schedule, x_t, t, x0, clip)
    # 4. the mean, Algorithm 2 line 4
    mean = (x_t - beta_t / math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_t)
    if t == 0:  # paper t = 1: z = 0
        return mean, x0
    # 5. the variance sigma_t^2
    if variance == "beta":
        sigma2 = beta_t
    else:
        alpha_bar_prev = schedule.alphas_cumprod[t_prev].item()
        sigma2 = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    # 6. x_{t-1} = mean + sigma_t z
    z = _standard_normal(x_t, generator) if noise is None else noise
    return mean + math.sqrt(sigma2) * z, x0


def ddim_timesteps(T: int, steps: int | None = None) -> list[int]:
    """The DDIM sub-sequence of ``steps`` code steps (default :data:`DDIM_STEPS`), spaced by
    T // steps from 0 and descending (Song et al.'s code and diffusers' default ``leading``
    spacing): 10 of 1000 -> 900, ..., 0."""
    steps = DDIM_STEPS if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM takes 1..{T} steps for T = {T}, got {steps}")
    stride = T // steps
    timesteps = list(range(0, T, stride))[:steps][::-1]
    if T - 1 - timesteps[0] >= 2 * stride:
        raise ValueError(f"{steps} DDIM steps of stride T // steps = {stride} would start at "
                         f"t = {timesteps[0]}, far below T - 1 = {T - 1}: the sampler would "
                         f"treat pure noise as a less noisy image. Take a number of steps "
                         f"whose stride covers T, such as a divisor of T (10, 25, 50, 100, ...)")
    return timesteps


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_prev: int,
              model_output: torch.Tensor, *, eta: float = 0.0, clip: bool | str = True,
              prediction: str = "epsilon", noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) from code step t to t_prev < t (t_prev = -1:
    to the clean image, alpha_bar = 1); returns (x_{t_prev}, x_0 estimate):

        x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
                    * sqrt(1 - alpha_bar_t / alpha_bar_prev)                   (eq. 16).

    eta = 0 is deterministic; eta = 1 with every step is DDPM with the posterior
    variance. ``clip`` as in :func:`ddpm_step` (diffusers: ``clip_sample=True,
    use_clipped_model_output=True``).
    """
    # 1. alpha_bar at both ends of the step
    alpha_bar_t = schedule.alphas_cumprod[t].item()
    alpha_bar_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    # 2. the network's output as x_0 and eps
    x0, eps = predict_x0_and_eps(schedule, x_t, t, model_output, prediction)
    # 3. x_0 clipped to the data range, eps consistent with it
    if clip:
        x0, eps = clip_x0(schedule, x_t, t, x0, clip)
    # 4. sigma (eq. 16)
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                            * (1 - alpha_bar_t / alpha_bar_prev))
    # 5. the "predicted x_0" and "direction pointing to x_t" terms of eq. 12
    x_prev = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    # 6. the random noise term
    if sigma > 0:
        x_prev = x_prev + sigma * (_standard_normal(x_t, generator) if noise is None else noise)
    return x_prev, x0


class Sampler(NamedTuple):
    """A reverse process: the code steps it visits, ``timesteps(T, steps)``, and its ``step``."""

    timesteps: Callable[[int, int | None], list[int]]
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]]


SAMPLERS = {"ddpm": Sampler(ddpm_timesteps, ddpm_step), "ddim": Sampler(ddim_timesteps, ddim_step)}


def ddim_trailing_timesteps(T: int, steps: int | None = None) -> list[int]:
    """``steps`` code steps in "trailing" spacing (Lin et al. 2024, Table 2; diffusers'
    ``timestep_spacing="trailing"``): round(T - i T / steps) - 1 for i = 0..steps-1, so the
    first step starts from pure noise at T - 1 for any number of steps (1 of 1000 -> [999];
    4 -> 999, 749, 499, 249), where the leading spacing of :func:`ddim_timesteps` would start
    at 0, 500 or 750. The last step goes from T / steps - 1 to the clean image. Default: all T
    steps (the grid then ends at 0)."""
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM takes 1..{T} steps for T = {T}, got {steps}")
    return [round(T - i * T / steps) - 1 for i in range(steps)]


SAMPLERS["ddim_trailing"] = Sampler(ddim_trailing_timesteps, ddim_step)  # DDIM on that grid


@dataclass
class Trajectory:
    """What a sampler went through: ``timesteps[i]`` is the code step of ``x[i]`` (x_t, before
    the step) and of ``x0[i]`` (the network's x_0 estimate from it); ``x[-1]`` is the sample."""

    timesteps: list[int] = field(default_factory=list)
    x: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)


def _check_sampling(model: Callable, schedule: NoiseSchedule, sampler: str, options: dict
                    ) -> Sampler:
    """The checks every step function relies on, made once before a sampling loop."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    num_steps = getattr(model, "num_steps", schedule.T)
    if num_steps != schedule.T:
        raise ValueError(f"the network was trained with T = {num_steps} steps but the schedule "
                         f"has T = {schedule.T}; sample with the schedule it was trained with")
    allowed = set(inspect.signature(SAMPLERS[sampler].step).parameters) - {
        "schedule", "x_t", "t", "t_prev", "model_output", "noise", "generator"}
    if set(options) - allowed:
        raise ValueError(f"the {sampler!r} sampler takes the options {sorted(allowed)}, got "
                         f"{sorted(set(options) - allowed)}")
    clip = options.get("clip", True)
    if not (isinstance(clip, bool) or clip == "dynamic"):
        raise ValueError(f"clip must be True (x_0 clipped to [-1, 1]), False or 'dynamic' "
                         f"(Imagen's dynamic thresholding), got {clip!r}")
    if options.get("prediction", "epsilon") not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got "
                         f"{options['prediction']!r}")
    if options.get("variance", "beta") not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {options['variance']!r}")
    if not 0 <= options.get("eta", 0.0) <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got "
                         f"{options['eta']}")
    return SAMPLERS[sampler]


def _check_model_output(model_output: torch.Tensor, x_t: torch.Tensor) -> None:
    if model_output.shape != x_t.shape:
        raise ValueError(f"the network output must have the shape of x_t, {tuple(x_t.shape)}, "
                         f"got {tuple(model_output.shape)}")
    _check_finite("the network output", model_output)


@torch.inference_mode()
def sample(model: Callable[..., torch.Tensor], schedule: NoiseSchedule,
           shape: tuple[int, ...], sampler: str = "ddpm", steps: int | None = None, *,
           generator: torch.Generator | None = None, device: str | torch.device = "cpu",
           return_trajectory: bool = False, progress: bool = True,
           x_T: torch.Tensor | None = None, **options) -> torch.Tensor | Trajectory:
    """Draw x_T ~ N(0, I) (or start from the given ``x_T`` [shape]) and denoise it with a
    sampler of :data:`SAMPLERS`: ``"ddpm"`` runs Algorithm 2 over all T steps, ``"ddim"``
    ``steps`` DDIM steps (default 50). ``options`` go to the step (``clip`` and ``prediction``
    for both; ``variance`` for DDPM, ``eta`` for DDIM). Noise comes from the CPU ``generator``,
    so a seed gives the same images on every device. Returns the samples [shape] or, with
    ``return_trajectory``, a :class:`Trajectory` (on CPU).
    """
    check_count(shape[0], "the number of images shape[0]")
    timesteps_of, step = _check_sampling(model, schedule, sampler, options)
    timesteps = timesteps_of(schedule.T, steps)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have the shape {tuple(shape)}, got {tuple(x_T.shape)}")
    _check_finite("x_T", x_T)
    x = x_T.to(device)
    trajectory = Trajectory()
    for t, t_prev in tqdm(list(zip(timesteps, [*timesteps[1:], -1])), desc=sampler.upper(),
                          leave=False, disable=not progress):
        model_output = model(x, torch.full((shape[0],), t, device=device))
        _check_model_output(model_output, x)
        x_prev, x0 = step(schedule, x, t, t_prev, model_output, generator=generator, **options)
        if return_trajectory:
            trajectory.timesteps.append(t)
            trajectory.x.append(x.cpu())
            trajectory.x0.append(x0.cpu())
        x = x_prev
    if not return_trajectory:
        return x
    trajectory.x.append(x.cpu())
    return trajectory


@torch.inference_mode()
def generate(model: Callable[..., torch.Tensor], schedule: NoiseSchedule, n: int,
             sampler: str = "ddim", steps: int | None = None, seed: int = 0,
             batch_size: int = 100, **options) -> torch.Tensor:
    """n images [n, C, H, W] in [-1, 1] (on CPU), drawn batch by batch from one seeded
    generator with :func:`sample` (a progress bar over the batches)."""
    check_count(n)
    check_count(batch_size, "batch_size")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (model.in_channels, model.image_size, model.image_size)
    return torch.cat([
        sample(model, schedule, (min(batch_size, n - i), *shape), sampler, steps,
               generator=generator, device=device, progress=False, **options).cpu()
        for i in tqdm(range(0, n, batch_size), desc=f"{sampler.upper()} {steps or ''}".strip())
    ]).clamp(-1, 1)


# --- the notebooks' exercises as course_lib computes them ------------------------------------
# The same arguments as the exercise each stands in for (plain tensors of the schedule, indexed
# by code step), so a notebook loop runs on the student's function or, unwritten, on this one
# (course_lib.exercises.or_reference).

def forward_step(x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 betas: torch.Tensor) -> torch.Tensor:
    """05's ``my_q_step``: :func:`q_step` for code steps t [B] of the schedule ``betas`` [T]."""
    return q_step(NoiseSchedule(betas), x_prev, t, noise)


def forward_shortcut(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """05's ``my_q_sample``: :func:`q_sample` for code steps t [B] of the schedule
    ``alphas_cumprod`` [T]."""
    return q_sample(NoiseSchedule.from_alphas_cumprod(alphas_cumprod, "given"), x0, t, noise)


def simple_loss(eps_model: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """06's ``my_ddpm_loss``: :func:`diffusion_loss` (Ho et al.'s L_simple) for the given code
    steps t [B] and noise, on the schedule ``alphas_cumprod`` [T]."""
    schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod, "given")
    return diffusion_loss(eps_model, schedule, x0, t=t, noise=noise)


def algorithm_2_step(x_t: torch.Tensor, t: int, eps: torch.Tensor, betas: torch.Tensor,
                     alphas_cumprod: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """06's ``my_ddpm_step``: x_{t-1} from code step t by Algorithm 2 as printed,
    sigma_t^2 = beta_t and no clipping (:func:`ddpm_step` with ``clip=False``); z is not used
    at code t = 0. ``alphas_cumprod`` is the cumulative product of ``1 - betas``, as in the
    exercise."""
    return ddpm_step(NoiseSchedule(betas), x_t, t, t - 1, eps, variance="beta", clip=False,
                     noise=z)[0]
