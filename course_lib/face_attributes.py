"""An attribute detector for 32x32 faces: reads CelebA's attributes back from the pixels.

A small CNN with one logit per attribute (multi-label, a sigmoid each), trained on the cartoon
faces of :mod:`course_lib.data.faces` (or on CelebA: the same recipe, ``--dataset CelebA``). It
checks generated faces attribute by attribute, as :func:`~course_lib.data.shapes.detect_objects`
checks generated shapes, and its pooled features are the course's feature space for FID on
faces: a network trained to tell these faces' attributes apart, as Inception-v3's features are
an ImageNet classifier's (Heusel et al. 2017 use any good feature space; Inception weights
cannot be had here and would see cartoons as out of distribution).

The recipe and trainer of the shipped checkpoint are in :mod:`course_lib.experiments.faces`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from course_lib.checkpoint import load_checkpoint, load_state
from course_lib.classifier import conv_block
from course_lib.metrics import FeatureExtractor
from course_lib.runtime import CHECKPOINT_DIR

ARCH = "face_attributes"
CHECKPOINT = CHECKPOINT_DIR / "face_attributes.pt"


class FaceAttributeNet(nn.Module):
    """32x32x3 images in [0, 1] -> one logit per attribute; ``features`` are the pooled
    activations [N, 4 * width]."""

    def __init__(self, attr_names: list[str], width: int = 32):
        super().__init__()
        self.attr_names = list(attr_names)
        self.body = nn.Sequential(
            *conv_block(3, width), *conv_block(width, width), nn.MaxPool2d(2),              # 16x16
            *conv_block(width, 2 * width), *conv_block(2 * width, 2 * width), nn.MaxPool2d(2),  # 8
            *conv_block(2 * width, 4 * width), *conv_block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                                          # [N, 4w]
        )
        self.head = nn.Linear(4 * width, len(self.attr_names))
        self.feature_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(f"the face detector takes images [N, 3, 32, 32] in [0, 1], got "
                             f"{tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_face_detector(path: str | Path = CHECKPOINT, device: str | torch.device = "cpu"
                       ) -> FaceAttributeNet:
    """The trained detector from a verified checkpoint, in eval mode."""
    payload = load_checkpoint(path, arch=ARCH)
    model = FaceAttributeNet(payload["state"]["attr_names"], payload["config"]["model"]["width"])
    load_state(model, payload["state"]["model"])
    return model.to(device).eval()


@torch.inference_mode()
def detect_attributes(detector: FaceAttributeNet, images: torch.Tensor,
                      batch_size: int = 500) -> torch.Tensor:
    """{0, 1} attributes [N, A] read from images [N, 3, 32, 32] in [0, 1] (logit > 0)."""
    detector.eval()
    device = next(detector.parameters()).device
    return torch.cat([(detector(images[i:i + batch_size].to(device)) > 0).long().cpu()
                      for i in range(0, len(images), batch_size)])


def attribute_accuracy(detected: torch.Tensor, attributes: torch.Tensor,
                       attr_names: list[str]) -> dict[str, float]:
    """The share of images whose detected attribute equals the label, per attribute name."""
    if detected.shape != attributes.shape or detected.shape[1] != len(attr_names):
        raise ValueError(f"detected {tuple(detected.shape)} and attributes "
                         f"{tuple(attributes.shape)} must both be [N, {len(attr_names)}]")
    agree = (detected == attributes).float().mean(0)
    return {name: agree[j].item() for j, name in enumerate(attr_names)}


class FaceFeatures(FeatureExtractor):
    """The face detector's pooled features, for FID on 32x32 RGB faces."""

    channels = (3,)

    def __init__(self, detector: FaceAttributeNet | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 500):
        detector = detector if detector is not None else load_face_detector()
        super().__init__(detector, device, batch_size)
        self.name = "face-detector features"
        self.dim = detector.feature_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.features(x)
