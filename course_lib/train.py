"""The training loop every model of the course uses.

A model supplies ``train_step(batch) -> {loss name: value}``; :func:`fit` does the rest: a
progress bar (a widget in notebooks, text in a terminal, silent with ``TQDM_DISABLE=1``), the loss
history, a live loss plot in notebooks, the EMA of weights, periodic checkpoints and resuming.
Resuming restores the weights, optimizers, EMA, data position and RNG state, so an interrupted
run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib import distributed
from course_lib.checkpoint import load_checkpoint, load_state, save_checkpoint
from course_lib.runtime import in_notebook


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging; Ho et al. 2020 use
    decay 0.9999): ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every step.
    Buffers (e.g. BatchNorm statistics) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.source, self.decay = model, decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for ema_p, p in zip(self.model.parameters(), self.source.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), self.source.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)


def debiased_ema(ema_state: dict[str, torch.Tensor], initial_state: dict[str, torch.Tensor],
                 decay: float, steps: int) -> dict[str, torch.Tensor]:
    """The EMA of the weights without its memory of the initial weights.

    After n updates of :class:`EMA`, theta_ema = d^n theta_0 + (1 - d) sum_{k=1..n} d^(n-k)
    theta_k: the random (or zero) initial weights keep the share d^n, 37 % after 1,000 steps at
    d = 0.999. Dividing the rest by its total weight 1 - d^n, as Adam corrects its moment
    estimates (Kingma & Ba 2015, Algorithm 1), leaves the weighted mean of the trained weights:

        theta_hat = (theta_ema - d^n theta_0) / (1 - d^n).

    Integer tensors (step counters) are the EMA's own."""
    if not 0.0 <= decay < 1.0 or isinstance(steps, bool) or not isinstance(steps, int) \
            or steps < 1:
        raise ValueError(f"debiasing needs the EMA's decay in [0, 1) and its number of updates "
                         f"(an int >= 1), got decay={decay!r}, steps={steps!r}")
    if ema_state.keys() != initial_state.keys():
        raise ValueError(f"the EMA and the initial weights must be of one network; keys differ: "
                         f"{sorted(ema_state.keys() ^ initial_state.keys())[:5]}")
    share = decay ** steps
    return {name: (value - share * initial_state[name]) / (1 - share)
            if value.is_floating_point() else value for name, value in ema_state.items()}


class History:
    """Per-step values of every logged quantity: ``history["loss_D"] -> list[float]``."""

    def __init__(self):
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {}

    def append(self, step: int, values: dict[str, float]) -> None:
        self.steps.append(step)
        for name, value in values.items():
            self.values.setdefault(name, []).append(float(value))

    def __getitem__(self, name: str) -> list[float]:
        return self.values[name]

    def __len__(self) -> int:
        return len(self.steps)

    def last(self, window: int = 1) -> dict[str, float]:
        """Mean of the last ``window`` values of each quantity."""
        return {k: sum(v[-window:]) / len(v[-window:]) for k, v in self.values.items()}

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        self.values = {k: list(v) for k, v in state["values"].items()}


class Minibatches:
    """Shuffled minibatches of in-memory tensors, forever, as a function of the step.

    Epoch ``e`` is the permutation drawn from ``seed + e``; the last incomplete batch of an epoch
    is dropped. Its ``state_dict`` is the step, so a resumed run sees the same batches.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("Minibatches needs one or more tensors of the same length, got "
                             f"lengths {[len(t) for t in tensors]}")
        if not 0 < batch_size <= len(tensors[0]):
            raise ValueError(f"batch_size must be in 1..{len(tensors[0])}, got {batch_size}")
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.per_epoch = len(tensors[0]) // batch_size
        self.step, self._epoch, self._perm = 0, -1, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        epoch, i = divmod(self.step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.tensors[0]),
                                                            generator=generator)
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        self.step += 1
        return tuple(t[idx.to(t.device)] for t in self.tensors)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def fit(train_step: Callable[[Any], dict[str, Any]], batches: Iterator, num_steps: int, *,
        modules: dict[str, Any] | None = None, ema: EMA | None = None,
        checkpoint: str | Path | None = None, arch: str = "", config: dict | None = None,
        checkpoint_every: int = 0, resume: bool = False, log_every: int = 10,
        live_plot: bool | None = None, plot_every: int = 100, desc: str = "training",
        history: History | None = None) -> History:
    """Run ``train_step`` on ``num_steps`` batches and return the loss :class:`History`.

    ``modules`` maps names to everything with a ``state_dict`` that a checkpoint must hold
    (models, optimizers, the :class:`Minibatches`); the EMA is added as ``"ema"``.
    ``checkpoint`` is written every ``checkpoint_every`` steps (0: only at the end); with
    ``resume=True`` and an existing checkpoint, training continues from its step.
    ``live_plot`` defaults to on inside a notebook. Under torchrun only rank 0 shows progress
    and writes the checkpoint (every rank resumes from it). (One function on purpose: resuming
    relies on the order of train step, EMA, logging and checkpoint within a step.)
    """
    modules = dict(modules or {})
    if ema is not None:
        modules["ema"] = ema
    if isinstance(batches, Minibatches):
        modules.setdefault("batches", batches)
    history = history or History()
    start, seconds = 0, 0.0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start, seconds = _resume(checkpoint, arch, modules, history)

    def save(step: int) -> None:
        state = {name: module.state_dict() for name, module in modules.items()}
        state |= {"history": history.state_dict(), "rng": torch.get_rng_state()}
        save_checkpoint(checkpoint, state, arch=arch, config=config or {}, step=step,
                        metrics={**history.last(log_every), "train_seconds": round(seconds, 1)})

    main = distributed.is_main()
    live = LossPlot() if main and (in_notebook() if live_plot is None else live_plot) else None
    pending: list[tuple[int, dict[str, Any]]] = []
    t0 = time.perf_counter()
    quiet = {} if main else {"disable": True}  # on rank 0, TQDM_DISABLE still decides
    with tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps, **quiet) as bar:
        for step in bar:
            losses = train_step(next(batches))
            if ema is not None:
                ema.update()
            pending.append((step + 1, {k: v.detach() if torch.is_tensor(v) else v
                                       for k, v in losses.items()}))
            last = step + 1 == num_steps
            if (step + 1) % log_every == 0 or last:
                for s, values in pending:  # one host sync per log_every steps, not per step
                    history.append(s, {k: float(v) for k, v in values.items()})
                pending.clear()
                bar.set_postfix({k: f"{v:.4g}" for k, v in history.last(log_every).items()})
            if live is not None and ((step + 1) % plot_every == 0 or last):
                live.update(history)
            if main and checkpoint is not None and (last or (checkpoint_every
                                                    and (step + 1) % checkpoint_every == 0)):
                seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save(step + 1)
    return history


def make_optimizer(module: nn.Module, lr: float, weight_decay: float, warmup: int, steps: int
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer of the course's diffusion recipes: AdamW (``lr``, ``weight_decay``) with a
    linear warm-up over ``warmup`` steps, then cosine decay towards 0 at ``steps``."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
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


def _resume(checkpoint: str | Path, arch: str, modules: dict[str, Any], history: History
            ) -> tuple[int, float]:
    """Restore ``modules``, ``history`` and torch's RNG from a training state; returns its step
    and the training seconds spent so far."""
    payload = load_checkpoint(checkpoint, arch=arch or None)
    for name, module in modules.items():
        load_state(module, payload["state"][name], name)
    history.load_state_dict(payload["state"]["history"])
    torch.set_rng_state(payload["state"]["rng"])
    return payload["step"], payload["metrics"].get("train_seconds", 0.0)


class LossPlot:
    """A loss plot that redraws in place in a notebook output cell (outside a notebook it only
    draws into ``self.fig``)."""

    def __init__(self):
        # deferred: a training run outside a notebook never imports matplotlib or IPython
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.fig, self.ax = plt.subplots(figsize=(6, 3))
        self.handle = display(self.fig, display_id=True)  # None outside IPython
        plt.close(self.fig)

    def update(self, history: History) -> None:
        from course_lib.plot import plot_losses  # deferred with matplotlib (see __init__)

        self.ax.clear()
        plot_losses(history, ax=self.ax)
        if self.handle is not None:
            self.handle.update(self.fig)
