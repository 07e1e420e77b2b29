"""The faces of notebook 04: the attribute detector, and the faces VAE measured with it.

``python -m course_lib.experiments.faces detector`` trains ``data/checkpoints/face_attributes.pt``
on the cartoon faces (CelebA with ``--dataset CelebA``); ``python -m course_lib.experiments.faces
evaluate`` measures the shipped faces VAE (:mod:`course_lib.experiments.vae`): FIDs in the
detector's features, and how often each attribute vector turns its attribute on while leaving the
others alone, written to ``data/results/vae_faces.json``. The network is in
:mod:`course_lib.face_attributes`, the data in :mod:`course_lib.data.faces`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from course_lib.checkpoint import read_manifest, save_checkpoint, update_json
from course_lib.data.faces import load_faces
from course_lib.data.vision import CelebAData
from course_lib.experiments.command_line import add_recipe_options
from course_lib.experiments.config import (command, override, overrides_from_args,
                                           relative_path, to_dict)
from course_lib.face_attributes import (ARCH, CHECKPOINT, FaceAttributeNet, FaceFeatures,
                                        attribute_accuracy, detect_attributes)
from course_lib.metrics import fid
from course_lib.runtime import CHECKPOINT_DIR, DATA_DIR, get_device, seed_everything
from course_lib.train import Minibatches, fit
from course_lib.vae import VAE, attribute_vector

MODULE = "course_lib.experiments.faces"
RESULTS = DATA_DIR / "results" / "vae_faces.json"
EDITED = ("Eyeglasses", "Wearing_Hat", "Smiling", "Blond_Hair")  # the four vectors


@dataclass
class DetectorModel:
    width: int = 16


@dataclass
class DetectorRecipe:
    """Adam with a one-cycle schedule, batch 128; half the batches blurred (sigma 0.3..1.2 px) so
    that the detector also reads the softer faces a VAE decodes."""
    model: DetectorModel = field(default_factory=DetectorModel)
    images: int = 50_000
    test_images: int = 10_000
    epochs: float = 4
    batch_size: int = 128
    lr: float = 3e-3
    blur: float = 0.5
    seed: int = 0
    dataset: str = "cartoon"


def blur_some(x: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """The batch, blurred with one random sigma in [0.3, 1.2] pixels with probability ``share``."""
    if torch.rand((), generator=generator) >= share:
        return x
    sigma = 0.3 + 0.9 * torch.rand((), generator=generator).item()
    return gaussian_blur(x, kernel_size=5, sigma=sigma)


def train_face_detector(config: DetectorRecipe = DetectorRecipe(), out: str | Path = CHECKPOINT,
                        device: str | torch.device | None = None
                        ) -> tuple[FaceAttributeNet, dict[str, float]]:
    """The detector trained and saved to ``out``; returns it and its per-attribute accuracy on
    held-out faces."""
    device = get_device(device)
    seed_everything(config.seed)
    train = load_faces("train", config.images, config.dataset)
    test = load_faces("test", config.test_images, config.dataset)
    model = FaceAttributeNet(train.attr_names, config.model.width).to(device)
    model = model.to(memory_format=torch.channels_last)
    batches = Minibatches(train.images, train.attributes.float(), batch_size=config.batch_size,
                          seed=config.seed)
    steps = max(1, int(config.epochs * batches.per_epoch))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)

    def train_step(batch):
        x, y = (t.to(device) for t in batch)
        x = blur_some(x, config.blur, generator).contiguous(memory_format=torch.channels_last)
        model.train()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        return {"loss": loss}

    start = time.perf_counter()
    fit(train_step, batches, steps, desc="face detector", live_plot=False)
    seconds = time.perf_counter() - start
    accuracy = attribute_accuracy(detect_attributes(model, test.images), test.attributes,
                                  test.attr_names)
    save_checkpoint(out, {"model": model.cpu().state_dict(), "attr_names": train.attr_names},
                    arch=ARCH, config=to_dict(config), step=steps,
                    metrics={"test_accuracy_min": round(min(accuracy.values()), 4)} |
                            {f"test_accuracy/{k}": round(v, 4) for k, v in accuracy.items()},
                    train_seconds=round(seconds, 1), device=str(device),
                    command=command(MODULE, config, "detector", out=relative_path(out)))
    return model.to(device), accuracy


# attributes that cannot change alone: a face has one hair colour and one kind of beard
EXCLUSIVE = ({"Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"}, {"No_Beard", "Goatee"})


@dataclass
class FacesEvaluation:
    """FIDs on ``samples`` images against as many held-out faces; each attribute vector (from
    ``vector_images`` training faces) added at each of ``scales`` to ``edit_faces`` held-out faces
    without the attribute."""
    samples: int = 2000
    vector_images: int = 10_000
    edit_faces: int = 500
    scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    attributes: tuple[str, ...] = EDITED
    seed: int = 0


@torch.inference_mode()
def encode_means(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The encoder's means mu [N, latent_dim] (the latents the lecture's arithmetic uses)."""
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch_size])[0]
                      for i in range(0, len(images), batch_size)])


@torch.inference_mode()
def decode(vae: VAE, z: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    vae.eval()
    return torch.cat([vae.decode(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])


def edit_attribute(vae: VAE, detector: FaceAttributeNet, z_train: torch.Tensor,
                   train_attributes: torch.Tensor, faces: torch.Tensor, name: str,
                   scales: tuple[float, ...]) -> list[dict[str, float]]:
    """Add ``name``'s attribute vector at each scale to the latents of ``faces`` (none of which
    has the attribute) and read the decoded faces back: per scale, the share in which the
    detector sees the attribute ("on"), and among the other attributes, those that can change
    alone, the share of (face, attribute) readings equal to the plain reconstruction's ("kept")
    and the share of faces with every one of them equal ("all_kept")."""
    j = detector.attr_names.index(name)
    tied = next((group for group in EXCLUSIVE if name in group), {name})
    others = [k for k, other in enumerate(detector.attr_names) if other not in tied]
    vector = attribute_vector(z_train, train_attributes[:, j])
    z = encode_means(vae, faces)
    base = detect_attributes(detector, decode(vae, z))
    rows = []
    for scale in scales:
        seen = detect_attributes(detector, decode(vae, z + scale * vector))
        same = seen[:, others] == base[:, others]
        rows.append({"scale": scale, "on": seen[:, j].float().mean().item(),
                     "kept": same.float().mean().item(),
                     "all_kept": same.all(1).float().mean().item()})
    return rows


def evaluate_faces(vae: VAE, detector: FaceAttributeNet,
                   config: FacesEvaluation = FacesEvaluation(),
                   train: CelebAData | None = None, train_latents: torch.Tensor | None = None
                   ) -> dict:
    """FIDs (prior samples, reconstructions, the real-vs-real floor) in the detector's features
    and the attribute-vector table, as a JSON-ready dict. The vectors come from ``train`` (by
    default the first ``config.vector_images`` training faces), whose encoder means
    ``train_latents`` are computed here unless given."""
    train = train if train is not None else load_faces("train", config.vector_images)
    if train_latents is not None and len(train_latents) != len(train.images):
        raise ValueError(f"train_latents has {len(train_latents)} rows for {len(train.images)} "
                         f"training faces: pass encode_means(vae, train.images)")
    n = config.samples
    test = load_faces("test", 2 * n + 4 * config.edit_faces)  # a pool of faces to edit after 2n
    real, reference = test.images[:n], test.images[n:2 * n]
    features = FaceFeatures(detector)
    prior = vae.sample(n, generator=torch.Generator().manual_seed(config.seed))
    reconstructions = decode(vae, encode_means(vae, real))
    table = {"samples": n, "features": features.name,
             "fid": {"prior": fid(prior, reference, features),
                     "reconstruction": fid(reconstructions, reference, features),
                     "real": fid(real, reference, features)},
             "detector_on_reconstructions": attribute_accuracy(
                 detect_attributes(detector, reconstructions), test.attributes[:n],
                 test.attr_names)}
    z_train = train_latents if train_latents is not None else encode_means(vae, train.images)
    pool_images, pool_attributes = test.images[2 * n:], test.attributes[2 * n:]
    table["edits"] = {}
    for name in config.attributes:
        j = test.attr_names.index(name)
        faces = pool_images[pool_attributes[:, j] == 0][:config.edit_faces]
        table["edits"][name] = edit_attribute(vae, detector, z_train, train.attributes,
                                              faces, name, config.scales)
    return table


def parse_args(argv: list[str] | None = None
               ) -> tuple[DetectorRecipe | FacesEvaluation, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    jobs = parser.add_subparsers(dest="job", required=True)
    add_recipe_options(jobs.add_parser("detector", help=DetectorRecipe.__doc__.splitlines()[0]),
                       DetectorRecipe, CHECKPOINT)
    add_recipe_options(jobs.add_parser("evaluate", help=FacesEvaluation.__doc__.splitlines()[0]),
                       FacesEvaluation, RESULTS)
    args = parser.parse_args(argv)
    recipe = DetectorRecipe() if args.job == "detector" else FacesEvaluation()
    return override(recipe, overrides_from_args(args, type(recipe))), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.job == "detector":
        _, accuracy = train_face_detector(config, args.out, args.device)
        print("held-out accuracy per attribute:",
              ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
        print(f"saved {args.out}")
        return
    from course_lib.experiments.vae import load_vae
    from course_lib.face_attributes import load_face_detector
    table = evaluate_faces(load_vae("faces"), load_face_detector(), config)
    table["command"] = command(MODULE, config, "evaluate", out=relative_path(args.out))
    table["vae_command"] = read_manifest(CHECKPOINT_DIR)["vae_faces.pt"]["command"]
    update_json(args.out, lambda t: (t.clear(), t.update(table)))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
