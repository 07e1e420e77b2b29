"""Batch, layer, instance and group normalization from scratch (Wu & He 2018, Sec. 3), and the
paper's batch-size experiment (Fig. 5) in miniature on Fashion-MNIST.

All four compute ``y = (x - mean) / sqrt(var + eps)`` over a set S of axes of an [N, C, H, W]
tensor, then a per-channel scale and shift; they differ only in S (Wu & He, eq. 1-2 and Fig. 2):

- batch norm:    S = (N, H, W)            one mean per channel, shared by the batch
- layer norm:    S = (C, H, W)            one mean per sample
- instance norm: S = (H, W)               one mean per sample and channel
- group norm:    S = (C/G, H, W)          one mean per sample and group of C/G channels

``python -m course_lib.normalization`` reruns the batch-size experiment and writes
``data/results/normalization_batch_size.json``, which notebook 09 plots.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from course_lib.classifier import accuracy
from course_lib.data import load_fashion_mnist
from course_lib.runtime import DATA_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit

RESULTS = DATA_DIR / "results" / "normalization_batch_size.json"
BATCH_SIZES = (32, 16, 8, 4, 2)
# Wu & He 2018, Fig. 5: ResNet-50 ImageNet top-1 error (%) at 32/16/8/4/2 images per GPU.
PAPER_ERROR = {"batch": [23.6, 23.7, 24.8, 27.3, 34.7], "group": [24.1, 24.2, 24.0, 24.2, 24.1]}


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
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {c} channels")
    grouped = x.reshape(n, num_groups, c // num_groups, h, w)  # [N, G, C/G, H, W]
    return normalize(grouped, (2, 3, 4), eps).reshape(n, c, h, w)


def norm_layer(kind: str, channels: int, groups: int = 8) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"kind must be 'batch' or 'group', got {kind!r}")


class SmallCNN(nn.Module):
    """Three conv-norm-ReLU stages, global average pooling and a linear classifier."""

    def __init__(self, norm: str, width: int = 32):
        super().__init__()
        layers, c_in = [], 1
        for c_out in (width, 2 * width, 2 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                       norm_layer(norm, c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(c_in, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_at_batch_size(norm: str, batch_size: int, images: int, epochs: float,
                        x_train: torch.Tensor, y_train: torch.Tensor, seed: int = 0,
                        base_lr: float = 0.05) -> SmallCNN:
    """SGD with momentum 0.9 and Goyal et al.'s linear scaling rule, lr = base_lr * N / 32, as
    Wu & He do for their batch-size sweep; the same number of epochs at every batch size."""
    seed_everything(seed)
    model = SmallCNN(norm).to(x_train.device)
    lr = base_lr * batch_size / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    batches = Minibatches(x_train[:images], y_train[:images], batch_size=batch_size, seed=seed)
    steps = max(1, int(epochs * batches.per_epoch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def train_step(batch):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        return {"loss": loss}

    model.train()
    fit(train_step, batches, steps, desc=f"{norm} norm, batch {batch_size}", live_plot=False,
        log_every=100)
    return model


def batch_size_experiment(images: int = 12_000, epochs: float = 4, seed: int = 0,
                          batch_sizes: tuple[int, ...] = BATCH_SIZES,
                          device: str | torch.device | None = None) -> dict:
    """Test error (%) of BN and GN networks trained at each batch size (Wu & He Fig. 5)."""
    device = get_device(device)
    x_train, y_train = load_fashion_mnist("train", device=device)
    x_test, y_test = load_fashion_mnist("test", device=device)
    results = {"batch_sizes": list(batch_sizes), "images": images, "epochs": epochs,
               "seed": seed, "test_error": {}, "seconds": {}}
    for norm in ("batch", "group"):
        errors, seconds = [], []
        for batch_size in batch_sizes:
            start = time.perf_counter()
            model = train_at_batch_size(norm, batch_size, images, epochs, x_train, y_train, seed)
            errors.append(round(100 * (1 - accuracy(model, x_test, y_test)), 2))
            seconds.append(round(time.perf_counter() - start, 1))
        results["test_error"][norm], results["seconds"][norm] = errors, seconds
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Wu & He Fig. 5 in miniature")
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    results = batch_size_experiment(args.images, args.epochs, args.seed)
    results["command"] = ("python -m course_lib.normalization "
                          f"--images {args.images} --epochs {args.epochs} --seed {args.seed}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for norm in ("batch", "group"):
        print(f"{norm:>5} norm, test error % at batch {results['batch_sizes']}: "
              f"{results['test_error'][norm]}")


if __name__ == "__main__":
    main()


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
    import numpy as np

    shared = shared_cells(kind).numpy()
    colours = np.where(shared[..., None], np.array([0.2, 0.45, 0.85, 0.9]),
                       np.array([0.85, 0.85, 0.85, 0.25]))
    ax.voxels(np.ones_like(shared), facecolors=colours, edgecolor=(0.3, 0.3, 0.3, 0.3))
    ax.set(xlabel="N", ylabel="C", xticks=[], yticks=[], zticks=[], title=f"{kind} norm")
    ax.set_zlabel("H, W", labelpad=-12)
