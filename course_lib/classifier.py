"""The course's Fashion-MNIST classifier: a small CNN whose pooled features stand in for
Inception-v3's in FID when the Inception weights cannot be had (Heusel et al. 2017 use any
good feature space; Inception's is the convention for natural images).

:func:`load_classifier` stays beside the network because :mod:`course_lib.metrics` builds its
FID features from it (paper modules never import the experiments layer); the recipe and trainer of
the shipped checkpoint are in :mod:`course_lib.experiments.classifier`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state
from course_lib.runtime import CHECKPOINT_DIR

ARCH = "fashion_classifier"
CHECKPOINT = CHECKPOINT_DIR / "fashion_classifier.pt"


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class FashionClassifier(nn.Module):
    """28x28x1 images in [0, 1] -> 10 logits; ``features`` are the 128-D pooled activations."""

    def __init__(self, width: int = 32, dropout: float = 0.3):
        super().__init__()
        self.body = nn.Sequential(
            *conv_block(1, width), *conv_block(width, width), nn.MaxPool2d(2),             # 14x14
            *conv_block(width, 2 * width), *conv_block(2 * width, 2 * width), nn.MaxPool2d(2),  # 7x7
            *conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                                         # [N, 4w]
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, 10))
        self.feature_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"the classifier takes images [N, 1, 28, 28] in [0, 1], got "
                             f"{tuple(x.shape)}; crop 32x32 images with "
                             f"course_lib.classifier.to_classifier_input")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_classifier_input(images: torch.Tensor, value_range: tuple[int, int] = (0, 1)
                        ) -> torch.Tensor:
    """Bring course images (28x28 or the padded 32x32, in [0, 1] or [-1, 1]) to 28x28 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] not in (28, 32):
        raise ValueError(f"expected Fashion-MNIST-like images [N, 1, 28|32, 28|32], got "
                         f"{tuple(images.shape)}")
    if tuple(value_range) == (-1, 1):
        images = (images + 1) / 2
    if images.shape[-1] == 32:
        images = images[..., 2:30, 2:30]
    return images.clamp(0, 1)


def load_classifier(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
                    ) -> FashionClassifier:
    """The trained classifier from a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    model = FashionClassifier(**payload["config"]["model"])
    load_state(model, payload["state"]["model"])
    return model.to(device).eval()


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                  .sum().item() for i in range(0, len(images), batch_size))
    return correct / len(images)
