"""Conditional flow matching with the linear (rectified-flow) path (Lipman et al. 2023; Liu et al.
2023), and its ODE samplers.

Convention (Stable Diffusion 3's; papers differ on which end is noise)::

    t = 0: data x_0            t = 1: noise eps ~ N(0, I)
    x_t = (1 - t) x_0 + t eps                     the path (Eq. 1 of Liu et al., ends swapped)
    u_t = d x_t / dt = eps - x_0                  the velocity target, constant along a path
    L(theta) = E_{t ~ U(0, 1), x_0, eps} || v_theta(x_t, t) - (eps - x_0) ||^2

The minimiser of L is the marginal velocity v(x, t) = E[eps - x_0 | x_t = x] (Lipman et al.'s
Theorem 2), whose ODE dx/dt = v(x, t), run from t = 1 down to t = 0, carries N(0, I) to the
data. A sampler integrates it on a descending time grid; each step is
``step(model, x_t, t, t_next) -> (x_{t_next}, x_0 estimate, network evaluations)``:

    Euler    x_{t'} = x_t + (t' - t) v(x_t, t)                                   1 evaluation
    Heun     x~ = Euler step; x_{t'} = x_t + (t' - t) (v(x_t, t) + v(x~, t')) / 2     2 evaluations

``model(x_t, t)`` takes ``t`` as floats [B] in [0, 1]; :class:`StepTimeModel` adapts a network
built for integer steps (the course U-Net) to it. The x_0 estimate of a velocity is
x_t - t v (the path solved for x_0 with eps - x_0 = v).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _times(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as [B, 1, ..., 1] to broadcast over a batch x [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps; ``t`` a number or [B]."""
    t = _times(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u_t = eps - x_0, the time derivative of :func:`interpolate`."""
    return noise - x0


def x0_estimate(x_t: torch.Tensor, t: float | torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x_0 = x_t - t v: where the straight line through x_t with velocity v is at t = 0."""
    return x_t - _times(t, x_t) * velocity


def flow_matching_loss(model: Velocity, x0: torch.Tensor, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The conditional flow-matching loss: t ~ U(0, 1), eps ~ N(0, I),
    || v_theta(x_t, t) - (eps - x_0) ||^2, the mean over the batch and the pixels. ``t`` and
    ``noise`` are drawn here (from ``generator``) unless given."""
    if t is None:
        t = torch.rand(len(x0), generator=generator).to(x0)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0)
    return F.mse_loss(model(interpolate(x0, noise, t), t), velocity_target(x0, noise))


def _velocity(model: Velocity, x: torch.Tensor, t: float) -> torch.Tensor:
    return model(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device))


def euler_step(model: Velocity, x_t: torch.Tensor, t: float, t_next: float
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One explicit Euler step of dx/dt = v(x, t) from t to t_next (< t)."""
    v = _velocity(model, x_t, t)
    return x_t + (t_next - t) * v, x0_estimate(x_t, t, v), 1


def heun_step(model: Velocity, x_t: torch.Tensor, t: float, t_next: float
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One Heun step (the explicit trapezoidal rule, second order; Karras et al. 2022's
    Algorithm 1 without its noise): an Euler step, then the mean of the velocities at both ends."""
    # 1. the slope at t and the Euler prediction at t_next
    v = _velocity(model, x_t, t)
    x_euler = x_t + (t_next - t) * v
    # 2. the slope at the prediction, and the step along the mean of the two slopes
    v_next = _velocity(model, x_euler, t_next)
    return x_t + (t_next - t) * (v + v_next) / 2, x0_estimate(x_t, t, v), 2


SAMPLERS = {"euler": euler_step, "heun": heun_step}


def time_grid(steps: int) -> list[float]:
    """The descending grid 1 = t_0 > t_1 > ... > t_steps = 0, evenly spaced."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def flow_sample(model: Velocity, shape: tuple[int, ...], steps: int = 50, sampler: str = "euler",
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                return_trajectory: bool = False, device: str | torch.device = "cpu"):
    """Integrate dx/dt = v_theta(x, t) from noise at t = 1 to t = 0 in ``steps`` steps.

    Returns x_0, or (x_0, trajectory) with ``return_trajectory``: the states [steps + 1, *shape]
    from the noise to x_0, the x_0 estimates [steps, *shape] and the network evaluations used."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    step = SAMPLERS[sampler]
    grid = time_grid(steps)
    if noise is None:
        noise = torch.randn(shape, generator=generator).to(device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have the shape {tuple(shape)}, got {tuple(noise.shape)}")
    x, states, estimates, evaluations = noise, [noise], [], 0
    for t, t_next in zip(grid[:-1], grid[1:]):
        x, x0_hat, used = step(model, x, t, t_next)
        evaluations += used
        if return_trajectory:
            states.append(x)
            estimates.append(x0_hat)
    if not return_trajectory:
        return x
    return x, {"x": torch.stack(states), "x0": torch.stack(estimates), "evaluations": evaluations}


class StepTimeModel(nn.Module):
    """A network taking integer steps 0..num_steps-1 (the course U-Net) as a velocity model
    taking t in [0, 1]: t is mapped to the nearest step round(t (num_steps - 1))."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if t.min() < 0 or t.max() > 1:
            raise ValueError(f"t must be in [0, 1], got values in [{t.min().item()}, "
                             f"{t.max().item()}]")
        steps = torch.round(t * (self.network.num_steps - 1)).long()
        return self.network(x_t, steps, *args, **kwargs)


class VelocityMLP(nn.Module):
    """v_theta(x, t) for points x [B, dim]: an MLP on (x, sinusoidal features of t)."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_features: int = 16):
        super().__init__()
        if min(dim, hidden, layers, time_features) < 1 or time_features % 2:
            raise ValueError("dim, hidden and layers must be positive and time_features a positive "
                             f"even number, got {dim}, {hidden}, {layers}, {time_features}")
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, 6, time_features // 2)))
        sizes = [dim + time_features] + [hidden] * layers
        blocks = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(x)[:, None] * self.frequencies[None]  # [B, time_features / 2]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


@torch.no_grad()
def reflow_pairs(model: Velocity, noise: torch.Tensor, steps: int = 100, sampler: str = "heun"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Liu et al.'s reflow coupling: each noise paired with the sample its ODE reaches. Training
    on (x_0, eps) pairs from this coupling, instead of independent ones, straightens the paths."""
    return flow_sample(model, tuple(noise.shape), steps, sampler, noise=noise), noise


# --- notebook 10's exercises as course_lib computes them ---------------------------------------
# my_flow_matching_loss(model, x0, t, noise) is flow_matching_loss itself.

def euler_update(model: Velocity, x_t: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """10's ``my_euler_step``: x_{t_next} of :func:`euler_step`, without its x_0 estimate and
    evaluation count."""
    return euler_step(model, x_t, t, t_next)[0]
