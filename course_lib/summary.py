"""A Keras-style ``summary(model, input_shape)``: layer, output shape and parameters per layer.

The lecture's tables come from Keras, so two of its habits are available: shapes written
channels-last (``16x16x32``) and BatchNorm counted as 4C (gamma, beta, moving mean, moving
variance) where PyTorch has 2C parameters plus 2C buffers (``keras_batchnorm=True``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Row:
    name: str
    layer: str
    output_shape: tuple[int, ...]  # without the batch dimension, PyTorch order (C, H, W)
    params: int

    def shape_str(self, channels_last: bool) -> str:
        shape = self.output_shape
        if channels_last and len(shape) == 3:
            shape = (*shape[1:], shape[0])  # (C, H, W) -> (H, W, C)
        return "x".join(str(d) for d in shape)


class Summary:
    def __init__(self, rows: list[Row], channels_last: bool):
        self.rows, self.channels_last = rows, channels_last

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    def table(self) -> list[tuple[str, str, int]]:
        """(layer, output shape, params) per row, as printed."""
        return [(r.layer, r.shape_str(self.channels_last), r.params) for r in self.rows]

    def __str__(self) -> str:
        lines = [f"{'Layer (type)':<34}{'Output shape':<18}{'Params':>10}", "=" * 62]
        for r in self.rows:
            label = f"{r.name} ({r.layer})" if r.name else r.layer
            lines.append(f"{label:<34}{r.shape_str(self.channels_last):<18}{r.params:>10,}")
        lines += ["=" * 62, f"Total params: {self.total_params:,}"]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


def count_params(module: nn.Module, keras_batchnorm: bool = False) -> int:
    """Parameters of ``module`` itself (not its children); BatchNorm as 4C when asked."""
    n = sum(p.numel() for p in module.parameters(recurse=False))
    if keras_batchnorm and isinstance(module, _NORMS):
        n += module.running_mean.numel() + module.running_var.numel()
    return n


def summary(model: nn.Module, input_shape: tuple[int, ...], *, keras_batchnorm: bool = False,
            channels_last: bool = True, device: str | torch.device | None = None) -> Summary:
    """Run one forward pass of a zero batch of ``input_shape`` (without the batch dimension,
    e.g. ``(1, 32, 32)``) and record every leaf module's output shape and parameter count."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = [Row("", "Input", tuple(input_shape), 0)]
    hooks = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            def hook(mod, _inputs, output, name=name):
                rows.append(Row(name, type(mod).__name__, tuple(output.shape[1:]),
                                count_params(mod, keras_batchnorm)))
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return Summary(rows, channels_last)
