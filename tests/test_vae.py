import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from course_lib.summary import summary
from course_lib.vae import FacesVAE, VAE, kl_divergence, reparameterize, vae_loss


def test_reparameterize_has_mean_mu_and_std_exp_half_logvar(device):
    mu = torch.tensor([[1.0, -2.0, 0.0]], device=device).expand(200_000, 3)
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.25)]], device=device).expand(200_000, 3)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0) if device.type == "cpu"
                       else None)
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0, 0.5], device=device),
                               atol=0.01, rtol=0)


def test_reparameterize_gradients_reach_mu_and_logvar():
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    logvar = torch.tensor([0.2, -0.4], requires_grad=True)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    eps = torch.randn(2, generator=torch.Generator().manual_seed(1))
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(2))                     # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_kl_matches_torch_distributions_and_known_values():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    expected = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)
    # mu = 0, sigma = 2: 0.5 * (sigma^2 - 1 - ln sigma^2) = 0.8069 (positive, as a KL must be)
    value = kl_divergence(torch.zeros(1, 1), torch.full((1, 1), math.log(4.0)))
    assert value.item() == pytest.approx(0.5 * (4 - 1 - math.log(4)))
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0
    with pytest.raises(ValueError, match="latent_dim"):
        kl_divergence(torch.zeros(3), torch.zeros(3))


def test_vae_loss_weights_its_terms():
    x = torch.full((2, 1, 32, 32), 0.5)
    mu, logvar = torch.ones(2, 2), torch.zeros(2, 2)
    losses = vae_loss(x, x, mu, logvar, recon_weight=500, beta=0.5, recon="mse")
    assert losses["reconstruction"] == 0 and losses["kl"].item() == pytest.approx(1.0)
    assert losses["loss"].item() == pytest.approx(0.5)


# COURSE_SPEC.md section 3, Keras counting (BatchNorm = 4C); activations folded in.
FACES_ENCODER = [("Input", "32x32x3", 0)] + [
    row for shape, conv in [("16x16x128", 3_584), ("8x8x128", 147_584), ("4x4x128", 147_584),
                            ("2x2x128", 147_584)]
    for row in (("Conv2d", shape, conv), ("BatchNorm2d", shape, 512))] + [("Flatten", "512", 0)]
FACES_DECODER = [("Input", "200", 0), ("Linear", "512", 102_912), ("BatchNorm1d", "512", 2_048),
                 ("Unflatten", "2x2x128", 0)] + [
    row for shape in ("4x4x128", "8x8x128", "16x16x128", "32x32x128")
    for row in (("ConvTranspose2d", shape, 147_584), ("BatchNorm2d", shape, 512))] + [
    ("ConvTranspose2d", "32x32x3", 3_459)]


def test_faces_network_matches_the_lecture_table():
    model = FacesVAE()
    drop = ("LeakyReLU", "Sigmoid")
    enc = [r for r in summary(model.body, (3, 32, 32), keras_batchnorm=True).table()
           if r[0] not in drop]
    dec = [r for r in summary(model.decoder, (200,), keras_batchnorm=True).table()
           if r[0] not in drop]
    assert enc == FACES_ENCODER and dec == FACES_DECODER
    heads = [sum(p.numel() for p in m.parameters()) for m in (model.mu, model.logvar)]
    assert heads == [102_600, 102_600]


def test_vae_forward_sample_and_bad_input(device):
    model = VAE(latent_dim=3).to(device)
    x_hat, mu, logvar = model(torch.rand(4, 1, 32, 32, device=device))
    assert x_hat.shape == (4, 1, 32, 32) and mu.shape == logvar.shape == (4, 3)
    assert model.sample(5).shape == (5, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        FacesVAE().to(device).encode(torch.rand(2, 1, 32, 32, device=device))


def test_recipes_are_the_shipped_checkpoints_configs():
    from course_lib.checkpoint import read_manifest
    from course_lib.experiments.config import override, to_dict
    from course_lib.experiments.vae import CHECKPOINTS, RECIPES

    for name, path in CHECKPOINTS.items():
        stored = read_manifest(path.parent)[path.name]["config"]
        config = to_dict(override(RECIPES[name], dataset=stored["dataset"]))
        assert config == stored and list(config) == list(stored)


def test_training_command_records_its_recipe_and_command(tmp_path):
    import shlex

    from course_lib.checkpoint import read_manifest
    from course_lib.experiments.config import ConfigError, override
    from course_lib.experiments.vae import RECIPES, load_vae, parse_args, train_vae

    out = tmp_path / "vae.pt"
    config = override(RECIPES["fashion"], epochs=0.004)  # 2 steps of the real recipe
    train_vae("fashion", config, out=out)
    entry = read_manifest(tmp_path)["vae.pt"]
    assert entry["config"]["recon_weight"] == 500 and entry["config"]["dataset"] == "Fashion-MNIST"
    words = shlex.split(entry["command"])
    assert words[:4] == ["python", "-m", "course_lib.experiments.vae", "fashion"]
    assert parse_args(words[3:])[0] == config
    assert isinstance(load_vae("fashion", out), VAE)
    assert parse_args(["faces", "--images", "64"])[0].images == 64
    with pytest.raises(ConfigError, match="no setting 'images'"):  # the Fashion recipe has none
        override(RECIPES["fashion"], images=64)
    with pytest.raises(TypeError, match="FacesVAERecipe"):
        train_vae("faces", config)


def test_attribute_vector_is_a_difference_of_means():
    from course_lib.vae import attribute_vector

    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [0.0, 3.0]])
    has = torch.tensor([True, True, False, False])
    torch.testing.assert_close(attribute_vector(z, has), torch.tensor([2.0, -1.0]))
    with pytest.raises(ValueError, match="both"):
        attribute_vector(z, torch.ones(4, dtype=torch.bool))


def test_the_training_step_is_encode_sample_decode_and_one_adam_step():
    from course_lib.autoencoder import reconstruction_loss
    from course_lib.experiments.vae import vae_step

    torch.manual_seed(0)
    a, b = VAE(latent_dim=2), VAE(latent_dim=2)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=5e-4) for m in (a, b))
    x = torch.rand(4, 1, 32, 32)
    losses = vae_step(a, opt_a, x, recon_weight=500, generator=torch.Generator().manual_seed(1))
    mu, logvar = b.encode(x)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    reconstruction = reconstruction_loss(b.decode(z), x).mean()
    kl = kl_divergence(mu, logvar).mean()
    expected = 500 * reconstruction + kl
    opt_b.zero_grad(); expected.backward(); opt_b.step()
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_fit_vae_runs_the_steps_asked_for():
    from course_lib.experiments.vae import fit_vae

    model, history, dataset = fit_vae("fashion", steps=2)
    assert len(history) == 2 and set(history.values) == {"loss", "reconstruction", "kl"}
    assert dataset == "Fashion-MNIST" and not model.training
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fit_vae("fashion", steps=0)


def test_the_comparison_table_agrees_with_its_command_and_rows():
    import json
    import shlex

    from course_lib.experiments.vae import COMPARISON, LatentComparison, parse_args

    table = json.loads(COMPARISON.read_text())
    config, _ = parse_args(shlex.split(table["command"])[3:])
    assert config == LatentComparison()
    assert {row["seed"] for row in table["rows"]} == set(config.seeds)
    for summary in table["summary"]:
        mine = [row for row in table["rows"]
                if (row["model"], row["sampler"]) == (summary["model"], summary["sampler"])]
        assert summary["seeds"] == len(mine) == len(config.seeds)
        assert summary["fid"] == pytest.approx(sum(row["fid"] for row in mine) / len(mine))
        assert summary["fid"] > table["floor"]


def test_the_comparison_refuses_a_model_of_another_recipe(tmp_path):
    from course_lib.experiments.autoencoder import train_autoencoder
    from course_lib.experiments.vae import comparison_models, same_recipe_autoencoder
    from course_lib.experiments.config import override

    wrong = override(same_recipe_autoencoder(1), lr=1e-3, epochs=0.002)  # one step
    train_autoencoder(wrong, out=tmp_path / "autoencoder_seed1.pt")
    with pytest.raises(ValueError, match="not the comparison's recipe"):
        comparison_models(1, folder=tmp_path)
    assert not (tmp_path / "vae_seed1.pt").exists()


def test_empty_share_is_notebook_03s():
    from course_lib.experiments.vae import empty_share

    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert empty_share(z, 2) == 0.0
    assert empty_share(z, 4) == pytest.approx(12 / 16)
