"""Latent diffusion (notebook 11): the autoencoder's shapes and checks, its loss against
torch.distributions, the scale factor, and the recipes end to end on a few images."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from course_lib.latent import (LatentAutoencoder, autoencoder_loss, decode_latents,
                               scale_factor)


def test_the_autoencoder_maps_32x32_images_to_4x8x8_latents_and_back():
    model = LatentAutoencoder(width=8)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, 4, 8, 8)
    x_hat, mean_again, _ = model(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and x_hat.abs().max() <= 1
    torch.testing.assert_close(mean_again, mean)
    assert model.decode(mean).shape == (3, 1, 32, 32)


def test_bad_images_and_latents_are_refused_with_what_to_do():
    model = LatentAutoencoder(width=8)
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 32, 32\], got \(2, 1, 28, 28\)"):
        model.encode(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"in \[-1, 1\].*x \* 2 - 1"):
        model.encode(torch.full((2, 1, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"expected latents \[B, 4, 8, 8\]"):
        model.decode(torch.zeros(2, 256))
    with pytest.raises(ValueError, match="positive"):
        LatentAutoencoder(width=0)


def test_the_loss_is_the_pixel_mse_plus_the_weighted_kl_per_latent_number():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.rand(4, 1, 32, 32, generator=g), torch.rand(4, 1, 32, 32, generator=g)
    mean, logvar = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    terms = autoencoder_loss(x_hat, x, mean, logvar, kl_weight=0.01)
    kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(terms["reconstruction"], F.mse_loss(x_hat, x))
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["loss"], F.mse_loss(x_hat, x) + 0.01 * kl)


def test_the_scale_factor_gives_the_latents_unit_variance():
    z = 3.0 * torch.randn(500, 4, 8, 8, generator=torch.Generator().manual_seed(2)) + 0.5
    s = scale_factor(z)
    assert abs(s - 1 / 3) < 0.01
    assert abs((s * z).std().item() - 1) < 1e-6
    with pytest.raises(ValueError, match="batch of latents"):
        scale_factor(torch.zeros(1))


def test_decoding_undoes_the_scale_before_the_decoder():
    model = LatentAutoencoder(width=8).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(decode_latents(model, 0.2 * z, 0.2), model.decode(z))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny autoencoder and two latent flow models (scaled and not) on 256 images, a few
    steps each."""
    from course_lib.experiments.config import override
    from course_lib.experiments.flow import FlowRecipe, train_flow
    from course_lib.experiments.latent import (AutoencoderRecipe, LatentFlowRecipe,
                                               train_autoencoder, train_latent_flow)

    folder = tmp_path_factory.mktemp("latent")
    train_autoencoder(override(AutoencoderRecipe(), width=4, epochs=1.0, batch_size=64,
                               images=256, warmup=1), folder / "ae.pt")
    unet = {"base": 8, "channel_mults": [1, 2], "attention_resolutions": [4], "num_steps": 50}
    for name, scale in (("latent.pt", True), ("unscaled.pt", False)):
        train_latent_flow(override(LatentFlowRecipe(), autoencoder=str(folder / "ae.pt"),
                                   scale=scale, model=unet, images=256, steps=3, warmup=1,
                                   batch_size=16), folder / name)
    train_flow(override(FlowRecipe(), steps=3, warmup=1, batch_size=8,
                        model={**unet, "attention_resolutions": [14]}), folder / "pixel.pt",
               run=folder / "pixel_run.pt")
    return folder


def test_the_recipes_train_save_and_load_a_latent_model(tiny_models):
    from course_lib.experiments.latent import load_autoencoder, load_latent_flow

    autoencoder, s = load_autoencoder(tiny_models / "ae.pt")
    assert s > 0 and not autoencoder.training
    scaled, unscaled = (load_latent_flow(tiny_models / n) for n in ("latent.pt", "unscaled.pt"))
    assert scaled.s == s and unscaled.s == 1.0
    images = scaled.sample(5, steps=2, seed=0, batch_size=2)
    assert images.shape == (5, 1, 32, 32) and images.abs().max() <= 1
    torch.testing.assert_close(images, scaled.sample(5, steps=2, seed=0, batch_size=5))


@pytest.mark.filterwarnings("ignore:20 samples of 128-D features")
def test_the_table_measures_every_model_and_the_reconstruction(tiny_models, tmp_path):
    from course_lib.experiments.latent import LatentTable, evaluate

    table = evaluate(LatentTable([str(tiny_models / "latent.pt"), str(tiny_models / "unscaled.pt")],
                                 [str(tiny_models / "pixel.pt")], steps=[1, 2], samples=20,
                                 timing_steps=1), tmp_path / "table.json")
    rows = table["rows"]
    assert [(r["model"], r["space"], r["steps"]) for r in rows] == [
        ("latent.pt", "latent", 1), ("latent.pt", "latent", 2), ("unscaled.pt", "latent", 1),
        ("unscaled.pt", "latent", 2), ("pixel.pt", "pixel", 1), ("pixel.pt", "pixel", 2)]
    assert rows[2]["scale_factor"] == 1.0 and rows[-1]["scale_factor"] is None
    assert all(r["train_steps"] == 3 and r["train_cpu_seconds"] >= 0 and r["ms_per_image"] > 0
               for r in rows)
    assert table["floor"] < table["reconstruction_fid"]  # an untrained autoencoder loses detail
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == rows
    assert table["command"].split()[3] == "evaluate"
