"""Plot helpers shared by the notebooks: image grids, loss curves, labelled 2-D scatters."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int = 8, value_range: tuple[float, float] = (0, 1),
               padding: int = 2) -> np.ndarray:
    """Tile images [N, C, H, W] into one [H', W', C] array in [0, 1] for ``imshow``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    lo, hi = value_range
    images = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)  # [3, H', W']
    return grid.permute(1, 2, 0).numpy()


def show_images(images: torch.Tensor, nrow: int = 8, value_range: tuple[float, float] = (0, 1),
                title: str | None = None, ax: plt.Axes | None = None,
                labels: Sequence[str] | None = None) -> plt.Axes | np.ndarray:
    """Show a grid of images; with ``labels`` (one per image) each tile gets its caption."""
    if labels is not None:
        return _labelled_tiles(images, labels, nrow, value_range, title)
    if ax is None:
        ncol, nrows = min(nrow, len(images)), -(-len(images) // nrow)
        _, ax = plt.subplots(figsize=(1.1 * ncol, 1.1 * nrows))
    ax.imshow(image_grid(images, nrow, value_range), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def _labelled_tiles(images: torch.Tensor, labels: Sequence[str], nrow: int,
                    value_range: tuple[float, float], title: str | None) -> np.ndarray:
    if len(labels) != len(images):
        raise ValueError(f"one label per image expected: {len(images)} images, {len(labels)} "
                         f"labels")
    ncol, nrows = min(nrow, len(images)), -(-len(images) // nrow)
    width = max(len(label) for label in labels)
    wrap = 18 if width > 18 else width
    lines = max(len(textwrap.wrap(label, wrap)) for label in labels)
    fig, axes = plt.subplots(nrows, ncol, squeeze=False,
                             figsize=(1.3 * ncol, (1.3 + 0.13 * lines) * nrows))
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(image_grid(images[i:i + 1], 1, value_range, padding=0),
                      interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(labels[i], wrap)), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return axes


def plot_losses(history, names: Sequence[str] | None = None, ax: plt.Axes | None = None,
                smooth: int = 0) -> plt.Axes:
    """Loss curves of a :class:`course_lib.train.History`, with an optional moving average."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    for name in names or list(history.values):
        values = np.asarray(history[name])
        steps = np.asarray(history.steps)
        if smooth > 1 and len(values) >= smooth:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1:]
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.legend()
    return ax


def scatter_2d(points: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None,
               class_names: Sequence[str] | None = None, ax: plt.Axes | None = None,
               s: float = 2.0, alpha: float = 0.6, title: str | None = None) -> plt.Axes:
    """Scatter 2-D points (latents or samples) coloured by class, with a legend of names."""
    points = np.asarray(points.detach().cpu() if torch.is_tensor(points) else points)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be [N, 2], got {points.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=s, alpha=alpha)
    else:
        labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
        cmap = plt.get_cmap("tab10")
        for k in np.unique(labels):
            name = class_names[k] if class_names is not None else str(k)
            sel = labels == k
            ax.scatter(points[sel, 0], points[sel, 1], s=s, alpha=alpha, color=cmap(k % 10),
                       label=name)
        ax.legend(markerscale=4, fontsize=7, loc="best")
    if title:
        ax.set_title(title)
    return ax
