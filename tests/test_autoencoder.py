import math

import pytest
import torch

from course_lib.autoencoder import Autoencoder, reconstruction_loss
from course_lib.summary import summary

# COURSE_SPEC.md section 2: (layer, output shape, params), activations folded into their layer.
ENCODER = [("Input", "32x32x1", 0), ("Conv2d", "16x16x32", 320), ("Conv2d", "8x8x64", 18_496),
           ("Conv2d", "4x4x128", 73_856), ("Flatten", "2048", 0), ("Linear", "2", 4_098)]
DECODER = [("Input", "2", 0), ("Linear", "2048", 6_144), ("Unflatten", "4x4x128", 0),
           ("ConvTranspose2d", "8x8x128", 147_584), ("ConvTranspose2d", "16x16x64", 73_792),
           ("ConvTranspose2d", "32x32x32", 18_464), ("Conv2d", "32x32x1", 289)]


def without_activations(table):
    return [row for row in table if row[0] not in ("ReLU", "Sigmoid", "LeakyReLU")]


def test_layer_tables_match_the_lecture():
    model = Autoencoder(latent_dim=2)
    assert without_activations(summary(model.encoder, (1, 32, 32)).table()) == ENCODER
    assert without_activations(summary(model.decoder, (2,)).table()) == DECODER


def test_round_trip_shapes_and_range(device):
    model = Autoencoder(latent_dim=5).to(device)
    x = torch.rand(3, 1, 32, 32, device=device)
    z = model.encode(x)
    assert z.shape == (3, 5)
    out = model.decode(z)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_bad_input_is_named():
    model = Autoencoder()
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\].*got \(2, 1, 28, 28\)"):
        model.encode(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.encode(torch.rand(2, 1, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match=r"latents \[N, 2\], got \(4, 3\)"):
        model.decode(torch.zeros(4, 3))


def test_reconstruction_losses_against_their_formulas():
    p = torch.tensor([[0.9, 0.2], [0.5, 0.5]]).view(2, 1, 1, 2)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    bce = reconstruction_loss(p, x, "bce")
    expected = [-(math.log(0.9) + math.log(0.8)) / 2, -math.log(0.5)]
    torch.testing.assert_close(bce, torch.tensor(expected))
    rmse = reconstruction_loss(p, x, "rmse")
    torch.testing.assert_close(rmse, torch.tensor([math.sqrt((0.01 + 0.04) / 2), 0.5]))
    torch.testing.assert_close(reconstruction_loss(p, x, "mse"), rmse ** 2)
    with pytest.raises(ValueError, match="kind must be"):
        reconstruction_loss(p, x, "l1")
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(p, x[:1], "bce")


def test_latent_area_shares_count_cells():
    from course_lib.autoencoder import latent_area_shares, sample_latent_box

    # Points on a 4x4 lattice: class 0 on the left half, class 1 on the right; one cell empty.
    xs, ys = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    z, labels = torch.stack([xs.flatten(), ys.flatten()], 1), (xs.flatten() >= 2).long()
    keep = torch.arange(16) != 5
    shares, empty = latent_area_shares(z[keep], labels[keep], num_classes=2, bins=4)
    assert empty == pytest.approx(1 / 16)
    torch.testing.assert_close(shares, torch.tensor([7 / 16, 8 / 16]))
    samples = sample_latent_box(z, 1000, torch.Generator().manual_seed(0))
    assert samples.min() >= 0 and samples.max() <= 3 and samples.shape == (1000, 2)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        latent_area_shares(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_far_from_data_counts_samples_outside_the_data():
    from course_lib.autoencoder import far_from_data

    z = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"),
                    -1).reshape(-1, 2)                       # spacing 1: every NN distance is 1
    near = z[:50] + 0.3
    far = torch.full((50, 2), 20.0)
    assert far_from_data(z, torch.cat([near, far])) == 0.5


def test_recipe_is_the_shipped_checkpoints_config_and_its_command_rebuilds_it(tmp_path):
    import shlex

    from course_lib.checkpoint import read_manifest
    from course_lib.experiments.autoencoder import (CHECKPOINT, AutoencoderRecipe,
                                                    load_autoencoder, parse_args,
                                                    train_autoencoder)
    from course_lib.experiments.config import override, to_dict

    manifest = read_manifest(CHECKPOINT.parent)
    for name, latent_dim in (("autoencoder.pt", 2), ("autoencoder_16.pt", 16)):
        config = to_dict(override(AutoencoderRecipe(), model={"latent_dim": latent_dim}))
        assert config == manifest[name]["config"] and list(config) == list(manifest[name]["config"])
    out = tmp_path / "ae.pt"
    config = override(AutoencoderRecipe(), model={"latent_dim": 3}, epochs=0.002)  # one step
    train_autoencoder(config, out=out)
    entry = read_manifest(tmp_path)["ae.pt"]
    assert entry["step"] == 1 and entry["config"] == to_dict(config)
    words = shlex.split(entry["command"])
    assert words[:3] == ["python", "-m", "course_lib.experiments.autoencoder"]
    assert parse_args(words[3:])[0] == config
    assert load_autoencoder(out).latent_dim == 3


def test_latent_grid_tiles_the_box_as_an_image_grid_shows_it():
    from course_lib.autoencoder import latent_grid

    grid = latent_grid([0.0, 0.0], [4.0, 2.0], n=2)
    torch.testing.assert_close(grid, torch.tensor([[1.0, 1.5], [3.0, 1.5], [1.0, 0.5], [3.0, 0.5]]))
    assert latent_grid(torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]), 5).shape == (25, 2)
    with pytest.raises(ValueError, match="lo < hi"):
        latent_grid([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive int"):
        latent_grid([0.0, 0.0], [1.0, 1.0], n=0)


def test_the_training_step_is_one_adam_step_on_the_batch_loss():
    from course_lib.experiments.autoencoder import autoencoder_step

    torch.manual_seed(0)
    a, b = Autoencoder(latent_dim=2), Autoencoder(latent_dim=2)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (a, b))
    x = torch.rand(4, 1, 32, 32)
    loss = autoencoder_step(a, opt_a, x)["loss"]
    expected = reconstruction_loss(b(x), x).mean()
    opt_b.zero_grad(); expected.backward(); opt_b.step()
    assert loss.item() == expected.item()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_fit_autoencoder_runs_the_steps_asked_for():
    from course_lib.experiments.autoencoder import AutoencoderRecipe, fit_autoencoder

    model, history = fit_autoencoder(AutoencoderRecipe(), steps=2)
    assert len(history) == 2 and isinstance(model, Autoencoder) and not model.training
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fit_autoencoder(AutoencoderRecipe(), steps=0)
