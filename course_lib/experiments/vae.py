"""The shipped VAEs (notebook 04): Foster's Fashion-MNIST and faces recipes.

``python -m course_lib.experiments.vae fashion`` trains ``data/checkpoints/vae_fashion.pt``,
``python -m course_lib.experiments.vae faces`` ``data/checkpoints/vae_faces.pt`` (on CelebA when
:func:`~course_lib.data.find_celeba` finds it, else on the cartoon faces of
:mod:`course_lib.data.faces`; ``--dataset`` chooses).
``python -m course_lib.experiments.vae compare`` measures the 2-D VAE beside the 2-D autoencoder
trained with the same recipe (``data/checkpoints/autoencoder_vae_recipe.pt``, and two more seeds
of each trained into ``runs/``) and writes ``data/results/vae_vs_autoencoder.json``.
The networks and the loss are in :mod:`course_lib.vae`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course_lib.autoencoder import (Autoencoder, far_from_data, latent_area_shares,
                                    reconstruction_loss, sample_latent_box)
from course_lib.checks import check_count
from course_lib.checkpoint import (load_checkpoint, load_state, read_manifest, save_checkpoint,
                                   update_json)
from course_lib.data import load_fashion_mnist
from course_lib.data.faces import load_faces, resolve_source
from course_lib.experiments.autoencoder import (AutoencoderModel, AutoencoderRecipe,
                                                load_autoencoder, train_autoencoder)
from course_lib.experiments.command_line import add_recipe_options
from course_lib.experiments.config import (command, from_dict, override, overrides_from_args,
                                           relative_path, to_dict)
from course_lib.metrics import ClassifierFeatures, fid_floor, fid_from_features
from course_lib.runtime import CHECKPOINT_DIR, DATA_DIR, RUNS_DIR, get_device, seed_everything
from course_lib.train import History, Minibatches, fit
from course_lib.vae import VAE, FacesVAE, reparameterize, vae_loss

MODULE = "course_lib.experiments.vae"
CHECKPOINTS = {"fashion": CHECKPOINT_DIR / "vae_fashion.pt",
               "faces": CHECKPOINT_DIR / "vae_faces.pt"}
MODELS = {"fashion": VAE, "faces": FacesVAE}


@dataclass
class _VAERecipe:
    """The settings both recipes have, with the Fashion-MNIST values; the model settings are
    the autoencoder's (the latent dimension)."""
    model: AutoencoderModel = field(default_factory=AutoencoderModel)
    epochs: float = 5
    batch_size: int = 100
    lr: float = 5e-4
    recon: str = "bce"
    recon_weight: float = 500.0
    beta: float = 1.0


@dataclass
class FashionVAERecipe(_VAERecipe):
    """Foster's Fashion-MNIST VAE: 2-D latent, BCE weighted 500 against the KL, 5 epochs."""
    seed: int = 0
    dataset: str = "Fashion-MNIST"


@dataclass
class FacesVAERecipe(_VAERecipe):
    """Foster's faces VAE (200-D latent, MSE, batch 128, Adam 5e-4), on ``images`` training faces
    for 5 epochs instead of CelebA's 162,770 for 10 (a CPU's hour is ~330,000 images through this
    network), with the reconstruction weighted 20,000 instead of Foster's 2,000: a cartoon's
    attributes cover a few pixels each (a mouth about 6 of 1,024), and at 2,000 the KL term
    outweighs them, so the latent does not encode them (notebook 04 gives the figures).
    ``dataset`` "auto": CelebA when present, else cartoon faces."""
    model: AutoencoderModel = field(default_factory=lambda: AutoencoderModel(latent_dim=200))
    epochs: float = 5
    batch_size: int = 128
    recon: str = "mse"
    recon_weight: float = 20_000.0
    images: int = 30_000
    seed: int = 0
    dataset: str = "auto"


RECIPES = {"fashion": FashionVAERecipe(), "faces": FacesVAERecipe()}


def training_images(config: FashionVAERecipe | FacesVAERecipe, device: torch.device
                    ) -> tuple[torch.Tensor, str]:
    """The recipe's training images and the name of their dataset: Fashion-MNIST 32x32, CelebA
    or the cartoon faces."""
    if isinstance(config, FashionVAERecipe):
        if config.dataset != "Fashion-MNIST":
            raise ValueError(f"the Fashion-MNIST VAE trains on 'Fashion-MNIST', got "
                             f"{config.dataset!r}")
        return load_fashion_mnist("train", size=32, device=device)[0], "Fashion-MNIST"
    source = resolve_source(config.dataset)
    return load_faces("train", config.images, source).images.to(device), source


def vae_step(model: VAE, opt: torch.optim.Optimizer, x: torch.Tensor, recon_weight: float,
             beta: float = 1.0, recon: str = "bce",
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One training step: encode, sample z = mu + sigma * eps, decode, the weighted loss of
    :func:`course_lib.vae.vae_loss` backpropagated, one optimizer step. Returns the batch's
    loss and its two terms (before the step)."""
    model.train()
    x_hat, mu, logvar = model(x, generator)
    losses = vae_loss(x_hat, x, mu, logvar, recon_weight, beta, recon)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    return losses


def _recipe(name: str, config: FashionVAERecipe | FacesVAERecipe | None
            ) -> FashionVAERecipe | FacesVAERecipe:
    config = config or RECIPES[name]
    if type(config) is not type(RECIPES[name]):
        raise TypeError(f"the {name!r} VAE takes a {type(RECIPES[name]).__name__}, got a "
                        f"{type(config).__name__}")
    return config


def fit_vae(name: str = "fashion", config: FashionVAERecipe | FacesVAERecipe | None = None,
            steps: int | None = None, device: str | None = None
            ) -> tuple[VAE, History, str]:
    """The ``name`` VAE trained with ``config`` (default: its recipe) for ``steps`` minibatches
    (default: the recipe's epochs); returns it, its loss history and the name of the dataset it
    was trained on."""
    config = _recipe(name, config)
    device = get_device(device)
    seed_everything(config.seed)
    images, dataset = training_images(config, device)
    model = MODELS[name](config.model.latent_dim).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = Minibatches(images, batch_size=config.batch_size, seed=config.seed)
    steps = steps if steps is not None else max(1, int(config.epochs * batches.per_epoch))
    check_count(steps, "steps")

    def train_step(batch):
        return vae_step(model, opt, batch[0].contiguous(memory_format=torch.channels_last),
                        config.recon_weight, config.beta, config.recon)

    history = fit(train_step, batches, steps, desc=f"VAE {name}", live_plot=False)
    return model.eval(), history, dataset


def train_vae(name: str = "fashion", config: FashionVAERecipe | FacesVAERecipe | None = None,
              out: str | Path | None = None, device: str | None = None) -> VAE:
    """The ``name`` VAE trained with ``config`` (default: its recipe); saved to ``out`` if given,
    with the dataset it was trained on in the stored config."""
    config = _recipe(name, config)
    start = time.perf_counter()
    model, history, dataset = fit_vae(name, config, device=device)
    config = override(config, dataset=dataset)
    if out is not None:
        save_checkpoint(out, {"model": model.cpu().state_dict(), "history": history.state_dict()},
                        arch=f"vae_{name}", config=to_dict(config), step=len(history),
                        metrics={k: round(v, 4) for k, v in history.last(100).items()},
                        train_seconds=round(time.perf_counter() - start, 1),
                        device=str(get_device(device)),
                        command=command(MODULE, config, name, out=relative_path(out)))
    return model.to(get_device(device))


def load_vae(name: str = "fashion", path: str | Path | None = None,
             device: str | torch.device = "cpu") -> VAE:
    """The trained ``name`` VAE ("fashion" or "faces") from a verified checkpoint, in eval
    mode."""
    if name not in CHECKPOINTS:
        raise ValueError(f"name must be one of {sorted(CHECKPOINTS)} (the shipped VAEs), got "
                         f"{name!r}; a VAE trained on CelebA is the 'faces' recipe")
    payload = load_checkpoint(path or CHECKPOINTS[name], arch=f"vae_{name}")
    config = from_dict(type(RECIPES[name]), payload["config"])
    model = MODELS[name](config.model.latent_dim)
    load_state(model, payload["state"]["model"])
    return model.to(device).eval()


# --- the autoencoder and the VAE with one recipe (notebook 04) ---------------------------------

@dataclass
class LatentComparison:
    """The 2-D autoencoder and the 2-D VAE trained with one recipe, the VAE's (Fashion-MNIST
    32x32, batch 100, Adam 5e-4, BCE, 5 epochs; the VAE adds the KL weighted 1 against 500 x
    BCE), once per seed, measured on the 10,000 test images: FID of ``samples`` images from each
    sampler (course classifier features, against the whole test set, beside the floor at the
    same n), the share of ``far_samples`` sampled latents far from every test encoding
    (:func:`~course_lib.autoencoder.far_from_data`), the share of samples the classifier is at
    least 90 % sure of, the test reconstruction BCE, and notebook 03's empty share of the
    latent box (``bins`` x ``bins`` cells)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 10_000
    far_samples: int = 5000
    bins: int = 50


COMPARISON = DATA_DIR / "results" / "vae_vs_autoencoder.json"
AE_VAE_RECIPE = CHECKPOINT_DIR / "autoencoder_vae_recipe.pt"
SAMPLERS = {"autoencoder": ("box", "gaussian"), "VAE": ("prior",)}
CONFIDENT = 0.9


def same_recipe_autoencoder(seed: int) -> AutoencoderRecipe:
    """The autoencoder's recipe with the Fashion-MNIST VAE's settings (5 epochs, Adam 5e-4)."""
    vae = RECIPES["fashion"]
    return AutoencoderRecipe(model=AutoencoderModel(latent_dim=vae.model.latent_dim),
                             epochs=float(vae.epochs), batch_size=vae.batch_size, lr=vae.lr,
                             loss=vae.recon, seed=seed)


def comparison_models(seed: int, folder: Path = RUNS_DIR / "vae_vs_autoencoder"
                      ) -> tuple[Autoencoder, VAE]:
    """The autoencoder and the VAE of one seed: for seed 0 the shipped checkpoints
    (``autoencoder_vae_recipe.pt``, ``vae_fashion.pt``), for the others trained into ``folder``
    (reused when already there)."""
    ae_config = same_recipe_autoencoder(seed)
    vae_config = override(RECIPES["fashion"], seed=seed)
    if seed == 0:
        ae_path, vae_path = AE_VAE_RECIPE, CHECKPOINTS["fashion"]
    else:
        ae_path, vae_path = folder / f"autoencoder_seed{seed}.pt", folder / f"vae_seed{seed}.pt"
    trainers = ((ae_path, ae_config, lambda: train_autoencoder(ae_config, out=ae_path)),
                (vae_path, vae_config, lambda: train_vae("fashion", vae_config, out=vae_path)))
    for path, config, _ in trainers:
        if path.exists():
            stored = read_manifest(path.parent)[path.name]["config"]
            if stored != to_dict(config):
                raise ValueError(f"{path} was trained with {stored}, not the comparison's "
                                 f"recipe {to_dict(config)}; delete it to retrain")
    for path, _, train in trainers:
        if not path.exists():
            train()
    return load_autoencoder(ae_path), load_vae("fashion", vae_path)


@torch.inference_mode()
def decode_all(decoder, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """``decoder`` over the latents z [N, d] in batches (bounded memory), concatenated."""
    return torch.cat([decoder(chunk) for chunk in z.split(batch_size)])


def compare_latents(config: LatentComparison = LatentComparison()) -> dict:
    """Rows {model, sampler, seed, fid, far_from_data, confident, reconstruction_bce,
    empty_share} for every seed (see :class:`LatentComparison`), their means and standard
    deviations over the seeds, and the references measured on real images (the FID floor and
    the classifier's confidence on test images). Trains the models of seeds other than 0 that
    are not in ``runs/vae_vs_autoencoder/`` yet (about 5 min each on a 2-core CPU)."""
    models = {seed: comparison_models(seed) for seed in config.seeds}
    with torch.inference_mode():
        x_test, _ = load_fashion_mnist("test", size=32)
        x_train, _ = load_fashion_mnist("train", size=32)
        features = ClassifierFeatures()
        test_features = features(x_test)
        rows = [row for seed, (ae, vae) in models.items()
                for row in _measure(ae, vae, seed, config, x_test, features, test_features)]
        table = {"samples": config.samples, "features": features.name,
                 "floor": fid_floor(features, x_train, test_features, config.samples, seed=0),
                 "confident_real": _confident(features, test_features),
                 "confident_threshold": CONFIDENT, "recipe": to_dict(RECIPES["fashion"])}
    keys = ("fid", "far_from_data", "confident", "reconstruction_bce", "empty_share")
    summary = []
    for model, samplers in SAMPLERS.items():
        for sampler in samplers:
            mine = [row for row in rows if row["model"] == model and row["sampler"] == sampler]
            values = {k: torch.tensor([row[k] for row in mine], dtype=torch.float64) for k in keys}
            summary.append({"model": model, "sampler": sampler, "seeds": len(mine)}
                           | {k: v.mean().item() for k, v in values.items()}
                           | {f"{k}_std": v.std().item() if len(v) > 1 else 0.0
                              for k, v in values.items()})
    return table | {"rows": rows, "summary": summary}


def _confident(features: ClassifierFeatures, image_features: torch.Tensor) -> float:
    """The share of images the classifier puts in one class with probability >= CONFIDENT."""
    probs = features.network.head(image_features).softmax(1)
    return (probs.max(1).values >= CONFIDENT).float().mean().item()


@torch.inference_mode()
def _measure(ae: Autoencoder, vae: VAE, seed: int, config: LatentComparison,
             x_test: torch.Tensor, features: ClassifierFeatures, test_features: torch.Tensor
             ) -> list[dict]:
    """The rows of one seed (see :func:`compare_latents`): the autoencoder sampled uniformly
    from the box of its test encodings and from the Gaussian fitted to them, the VAE from its
    prior N(0, I)."""
    generator = torch.Generator().manual_seed(seed)
    z_ae = ae.encode(x_test)
    mu, logvar = vae.encode(x_test)
    z_vae = reparameterize(mu, logvar, generator)
    gaussian = torch.distributions.MultivariateNormal(z_ae.mean(0), torch.cov(z_ae.T))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z_gaussian = gaussian.sample((config.samples,))
    latents = {("autoencoder", "box"): (z_ae, sample_latent_box(z_ae, config.samples, generator)),
               ("autoencoder", "gaussian"): (z_ae, z_gaussian),
               ("VAE", "prior"): (z_vae, torch.randn(config.samples, 2, generator=generator))}
    bce = {"autoencoder": reconstruction_loss(decode_all(ae.decode, z_ae), x_test).mean().item(),
           "VAE": reconstruction_loss(decode_all(vae.decode, mu), x_test).mean().item()}
    empty = {"autoencoder": empty_share(z_ae, config.bins), "VAE": empty_share(mu, config.bins)}
    rows = []
    for (model, sampler), (encoded, z) in latents.items():
        decoder = ae.decode if model == "autoencoder" else vae.decode
        sample_features = features(decode_all(decoder, z))
        rows.append({"model": model, "sampler": sampler, "seed": seed,
                     "fid": fid_from_features(sample_features, test_features),
                     "far_from_data": far_from_data(encoded, z[:config.far_samples]),
                     "confident": _confident(features, sample_features),
                     "reconstruction_bce": bce[model], "empty_share": empty[model]})
    print(f"seed {seed} measured", flush=True)
    return rows


def empty_share(z: torch.Tensor, bins: int) -> float:
    """Notebook 03's empty share: the share of the bins x bins cells of the latents' box that no
    latent falls in."""
    return latent_area_shares(z, torch.zeros(len(z), dtype=torch.long), 1, bins)[1]


# --- the command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None
               ) -> tuple[FashionVAERecipe | FacesVAERecipe | LatentComparison,
                          argparse.Namespace]:
    parser = argparse.ArgumentParser(description="train the lecture's VAEs; compare the 2-D VAE "
                                                 "with the autoencoder trained the same way")
    names = parser.add_subparsers(dest="name", required=True)
    for name, recipe in RECIPES.items():
        sub = names.add_parser(name, help=type(recipe).__doc__.splitlines()[0])
        add_recipe_options(sub, type(recipe), CHECKPOINTS[name])
    add_recipe_options(names.add_parser("compare", help=LatentComparison.__doc__.splitlines()[0]),
                       LatentComparison, COMPARISON)
    args = parser.parse_args(argv)
    recipe = LatentComparison() if args.name == "compare" else RECIPES[args.name]
    return override(recipe, overrides_from_args(args, type(recipe))), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.name == "compare":
        table = compare_latents(config)
        table["command"] = command(MODULE, config, "compare", out=relative_path(args.out))
        update_json(args.out, lambda t: (t.clear(), t.update(table)))
        for row in table["summary"]:
            print(f"{row['model']:<12} {row['sampler']:<9} FID {row['fid']:6.2f} "
                  f"+- {row['fid_std']:.2f}   far {row['far_from_data']:.1%}   confident "
                  f"{row['confident']:.1%}   BCE {row['reconstruction_bce']:.4f}   empty "
                  f"{row['empty_share']:.1%}")
        print(f"saved {args.out}")
        return
    train_vae(args.name, config, args.out, args.device)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
