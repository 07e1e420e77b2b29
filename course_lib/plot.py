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
    wrap = min(width, 16)
    lines = max(len(textwrap.wrap(label, wrap)) for label in labels)
    fig, axes = plt.subplots(nrows, ncol, squeeze=False, layout="constrained",  # room for
                             figsize=(1.3 * ncol, (1.3 + 0.19 * lines) * nrows))  # every title
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(image_grid(images[i:i + 1], 1, value_range, padding=0),
                      interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(labels[i], wrap)), fontsize=10)
    if title:
        fig.suptitle(title)
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


def latent_scatter(points: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                   class_names: Sequence[str], ax: plt.Axes | None = None,
                   title: str | None = None, s: float = 2.0) -> plt.Axes:
    """:func:`scatter_2d` of 2-D latents for a projector: axes labelled z1 and z2, the class
    legend at 10 pt beside the plot."""
    ax = scatter_2d(points, labels, class_names, ax=ax, s=s, title=title)
    ax.legend(markerscale=5, fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              frameon=False)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    return ax


def show_latent_plane(images: torch.Tensor, lo: Sequence[float], hi: Sequence[float],
                      ax: plt.Axes | None = None, title: str | None = None) -> plt.Axes:
    """Decoded points of a 2-D latent plane (``course_lib.autoencoder.latent_grid(lo, hi, n)``
    decoded, n * n images) tiled on axes in latent coordinates: each tile covers its cell of
    the box [lo, hi], so the ticks read z1 and z2 as on a scatter of the latents."""
    n = int(round(len(images) ** 0.5))
    if n * n != len(images):
        raise ValueError(f"show_latent_plane takes n * n decoded grid points, got {len(images)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 7))
    lo, hi = [float(v) for v in lo], [float(v) for v in hi]
    ax.imshow(image_grid(images, n, padding=0), interpolation="nearest",
              extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    if title:
        ax.set_title(title)
    return ax


def mark_points(ax: plt.Axes, points: torch.Tensor | np.ndarray, color: str = "black",
                numbered: bool = True, size: float = 140):
    """Mark 2-D points on a latent scatter with white-edged crosses (numbered 1, 2, ... when
    ``numbered``), to match them with their decodings shown beside it. Returns the markers
    (``.set_offsets`` moves them: a slider redraws without building the plot again)."""
    points = np.asarray(points.detach().cpu() if torch.is_tensor(points) else points)
    markers = ax.scatter(points[:, 0], points[:, 1], marker="X", s=size, c=color,
                         edgecolors="white", linewidths=1.5, zorder=5)
    if numbered:
        for i, (x, y) in enumerate(points, 1):
            ax.annotate(str(i), (x, y), xytext=(6, 6), textcoords="offset points", fontsize=11,
                        fontweight="bold", color=color, zorder=6)
    return markers


def show_tiles(images: torch.Tensor, titles: Sequence[str], axes: Sequence[plt.Axes],
               value_range: tuple[float, float] = (0, 1), fontsize: float = 11) -> None:
    """One image per axes with its title at a size that reads on a projector (the axes come
    from the caller's layout, e.g. a gridspec beside a scatter)."""
    axes = list(np.ravel(axes))
    if not len(images) == len(titles) <= len(axes):
        raise ValueError(f"show_tiles needs one title per image and at least as many axes: "
                         f"{len(images)} images, {len(titles)} titles, {len(axes)} axes")
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(image_grid(images[i:i + 1], 1, value_range, padding=0),
                      interpolation="nearest")
            ax.set_title(titles[i], fontsize=fontsize)


def plot_loss_terms(history, names: Sequence[str], labels: Sequence[str] | None = None,
                    smooth: int = 0, title: str | None = None) -> np.ndarray:
    """Each quantity of a :class:`course_lib.train.History` on its own axes, side by side: the
    terms of a loss of very different sizes (a weighted reconstruction and a KL) each keep a
    readable scale. ``labels`` name the y axes (default: the names); ``smooth`` > 1 draws the
    moving average over that many logged steps."""
    labels = list(labels) if labels is not None else list(names)
    if len(labels) != len(names):
        raise ValueError(f"one label per quantity: {len(names)} names, {len(labels)} labels")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, name, label in zip(axes[0], names, labels):
        plot_losses(history, [name], ax=ax, smooth=smooth)
        ax.get_legend().remove()
        ax.set_ylabel(label)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return axes[0]
