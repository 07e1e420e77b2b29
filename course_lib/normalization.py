"""Batch, layer, instance and group normalization from scratch (Wu & He 2018, Sec. 3), and the
small CNN of the paper's batch-size experiment (Fig. 5) in miniature on Fashion-MNIST.

All four compute ``y = (x - mean) / sqrt(var + eps)`` over a set S of axes of an [N, C, H, W]
tensor, then a per-channel scale and shift; they differ only in S (Wu & He, eq. 1-2 and Fig. 2):

- batch norm:    S = (N, H, W)            one mean per channel, shared by the batch
- layer norm:    S = (C, H, W)            one mean per sample
- instance norm: S = (H, W)               one mean per sample and channel
- group norm:    S = (C/G, H, W)          one mean per sample and group of C/G channels

The experiment itself (training at each batch size, the results table notebook 09 plots) is
:mod:`course_lib.experiments.normalization`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and biased variance taken over ``dims``."""
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a feature map [N, C, H, W], got shape {tuple(x.shape)}")


def batch_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Training-mode batch norm (Ioffe & Szegedy 2015): statistics over (N, H, W)."""
    _check(x)
    return normalize(x, (0, 2, 3), eps)


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm (Ba et al. 2016): statistics over (C, H, W) of each sample."""
    _check(x)
    return normalize(x, (1, 2, 3), eps)


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm (Ulyanov et al. 2016): statistics over (H, W) of each sample and channel."""
    _check(x)
    return normalize(x, (2, 3), eps)


def group_norm(x: torch.Tensor, num_groups: int, eps: float = 1e-5) -> torch.Tensor:
    """Group norm (Wu & He 2018, Sec. 3.1): statistics over (C/G, H, W) of each sample.

    G = 1 is layer norm, G = C is instance norm.
    """
    _check(x)
    n, c, h, w = x.shape
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 \
            or c % num_groups:
        raise ValueError(f"num_groups must be a positive int that divides the {c} channels, "
                         f"got {num_groups!r}")
    grouped = x.reshape(n, num_groups, c // num_groups, h, w)  # [N, G, C/G, H, W]
    return normalize(grouped, (2, 3, 4), eps).reshape(n, c, h, w)


def batch_norm_spread(features: torch.Tensor, batch_size: int, draws: int = 200, index: int = 0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Batch norm's output [draws, C, H, W] for sample ``index`` of ``features`` [N, C, H, W] in
    ``draws`` batches of ``batch_size``, its batch-mates drawn at random from the other samples:
    how much one image's normalized features depend on the company it keeps. (Group norm's
    output for the sample is the same in every batch.)"""
    _check(features)
    if not 1 <= batch_size <= len(features):
        raise ValueError(f"batch_size must be in 1..{len(features)}, got {batch_size}")
    if not 0 <= index < len(features) or draws < 1:
        raise ValueError(f"need 0 <= index < {len(features)} and draws >= 1, got index={index}, "
                         f"draws={draws}")
    others = torch.cat([torch.arange(index), torch.arange(index + 1, len(features))])
    mates = others[torch.rand(draws, len(others), generator=generator).argsort(dim=1)
                   [:, :batch_size - 1]]  # [draws, B - 1], without replacement in each row
    batches = torch.cat([features[index].expand(draws, 1, *features.shape[1:]),
                         features[mates]], dim=1)  # [draws, B, C, H, W]
    return normalize(batches, (1, 3, 4))[:, 0]


def norm_layer(kind: str, channels: int, groups: int = 8) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"kind must be 'batch' or 'group', got {kind!r}")


class SmallCNN(nn.Module):
    """Three stages of ``depth`` conv-norm-ReLU layers (``width``, 2 ``width``, 2 ``width``
    channels) each followed by 2x2 max pooling, then global average pooling and a linear
    classifier. ``groups`` is group norm's G (ignored by batch norm)."""

    def __init__(self, norm: str, width: int = 32, depth: int = 1, groups: int = 8):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth (conv layers per stage) must be a positive int, got {depth!r}")
        layers, c_in = [], 1
        for c_out in (width, 2 * width, 2 * width):
            for _ in range(depth):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                           norm_layer(norm, c_out, groups), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(c_in, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def shared_cells(kind: str, n: int = 6, c: int = 6, hw: int = 4, groups: int = 2
                 ) -> torch.Tensor:
    """Boolean [N, C, H*W] mask of the cells that share the first mean and variance of ``kind``."""
    mask = torch.zeros(n, c, hw, dtype=torch.bool)
    if kind == "batch":
        mask[:, 0, :] = True
    elif kind == "layer":
        mask[0, :, :] = True
    elif kind == "instance":
        mask[0, 0, :] = True
    elif kind == "group":
        mask[0, : c // groups, :] = True
    else:
        raise ValueError(f"kind must be batch, layer, instance or group, got {kind!r}")
    return mask


def draw_normalization_axes(kind: str, ax) -> None:
    """Wu & He's Fig. 2 for one method: a feature-map cube with axes N, C and H,W (flattened);
    the blue cells share one mean and variance."""
    shared = shared_cells(kind).numpy()
    colours = np.where(shared[..., None], np.array([0.2, 0.45, 0.85, 0.9]),
                       np.array([0.85, 0.85, 0.85, 0.25]))
    ax.voxels(np.ones_like(shared), facecolors=colours, edgecolor=(0.3, 0.3, 0.3, 0.3))
    ax.set(xlabel="N", ylabel="C", xticks=[], yticks=[], zticks=[], title=f"{kind} norm")
    ax.set_zlabel("H, W", labelpad=-12)
