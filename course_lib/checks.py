"""The checks the networks and metrics make at their entry points: one clear ``ValueError`` that
says what was expected and what to do, instead of a raw error from deep inside torch or a
silently wrong result."""
from __future__ import annotations

import torch


def check_batch(x: torch.Tensor, shape: tuple[int, ...], what: str = "images",
                value_range: tuple[float, float] | None = None, dtype: torch.dtype | None = None,
                hint: str = "") -> None:
    """``x`` must be a non-empty float tensor [N, *shape] of finite values (in ``value_range``,
    and of ``dtype``, when given); ``hint`` is appended to the error (how to get there)."""
    expected = f"{what} [N, {', '.join(map(str, shape))}]"
    hint = f"; {hint}" if hint else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected {expected} as a torch.Tensor, got {type(x).__name__}{hint}")
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected {expected}, got {tuple(x.shape)}{hint}")
    if len(x) == 0:
        raise ValueError(f"expected {expected} with N >= 1, got an empty batch")
    if not x.is_floating_point():
        raise ValueError(f"expected float {what}, got {x.dtype}: convert with x.float() (and "
                         f"scale integer pixels to the expected range){hint}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"expected {dtype} {what} (the network's weights are {dtype}), got "
                         f"{x.dtype}: convert with x.to({dtype}){hint}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values")
    if value_range is not None and (x.min() < value_range[0] or x.max() > value_range[1]):
        low, high = value_range
        raise ValueError(f"expected {what} with values in [{low:g}, {high:g}], got values in "
                         f"[{x.min().item():.3g}, {x.max().item():.3g}]{hint}")


def check_count(n: int, what: str = "n (the number of samples)") -> None:
    """``n`` must be a positive int."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
