import copy
import math

import pytest
import torch
from d2l import torch as d2l
from torch import nn

from course_lib.gan import (DCGANDiscriminator, DCGANGenerator, dcgan_init, discriminator_loss,
                            generator_loss, toy_networks, update_D, update_G)


def test_losses_against_their_formulas_in_float64():
    logits = torch.tensor([-12.0, -2.0, 0.0, 1.5, 12.0], dtype=torch.float64)  # exact in f64
    d = torch.sigmoid(logits)
    real, fake = logits, logits.flip(0)
    expected_d = (-torch.log(torch.sigmoid(real)) - torch.log(1 - torch.sigmoid(fake))).mean() / 2
    torch.testing.assert_close(discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(generator_loss(logits), (-torch.log(d)).mean())
    torch.testing.assert_close(generator_loss(logits, saturating=True), torch.log(1 - d).mean())


def test_losses_stay_finite_when_d_is_certain():
    logits = torch.tensor([-200.0, 200.0], requires_grad=True)
    for loss in (discriminator_loss(logits, logits), generator_loss(logits),
                 generator_loss(logits, saturating=True)):
        grad, = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_generator_gradients_saturate_or_not():
    """d/dl of -log D = -(1 - D): stays near -1 when D rejects fakes (l << 0);
    d/dl of log(1 - D) = -D: vanishes there (Goodfellow's argument)."""
    logit = torch.tensor([-6.0], requires_grad=True)
    ns, = torch.autograd.grad(generator_loss(logit), logit)
    sat, = torch.autograd.grad(generator_loss(logit, saturating=True), logit)
    d = 1 / (1 + math.exp(6))
    assert ns.item() == pytest.approx(-(1 - d))
    assert sat.item() == pytest.approx(-d)
    assert abs(sat.item()) < 0.01 * abs(ns.item())


@pytest.mark.parametrize("make", ["toy", "dcgan"])
def test_updates_match_d2l(make):
    torch.manual_seed(0)
    if make == "toy":
        net_G, net_D = toy_networks()
        x, z = torch.randn(8, 2), torch.randn(8, 2)
    else:
        net_G = DCGANGenerator(latent_dim=16, image_size=32, base=8)
        net_D = DCGANDiscriminator(image_size=32, base=8)
        x, z = torch.rand(4, 1, 32, 32) * 2 - 1, torch.randn(4, 16)
    ours_G, ours_D = copy.deepcopy(net_G), copy.deepcopy(net_D)
    loss = nn.BCEWithLogitsLoss(reduction="sum")
    trainers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (net_D, net_G, ours_D, ours_G)]
    for _ in range(2):
        theirs_d = d2l.update_D(x, z, net_D, net_G, loss, trainers[0])
        ours_d = update_D(x, z, ours_D, ours_G, trainers[2], reduction="sum")
        torch.testing.assert_close(ours_d, theirs_d.detach())
        theirs_g = d2l.update_G(z, net_D, net_G, loss, trainers[1])
        ours_g = update_G(z, ours_D, ours_G, trainers[3], reduction="sum")
        torch.testing.assert_close(ours_g, theirs_g.detach())
    for a, b in zip(list(net_G.parameters()) + list(net_D.parameters()),
                    list(ours_G.parameters()) + list(ours_D.parameters())):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (64, 3)])
def test_dcgan_shapes(size, channels, device):
    G = DCGANGenerator(latent_dim=10, channels=channels, image_size=size, base=8).to(device)
    D = DCGANDiscriminator(channels=channels, image_size=size, base=8).to(device)
    images = G(torch.randn(3, 10, device=device))
    assert images.shape == (3, channels, size, size)
    assert images.abs().max() <= 1 and D(images).shape == (3,)


def test_d2l_64x64_configuration_has_d2ls_parameter_count():
    G, D = DCGANGenerator(latent_dim=100, channels=3, image_size=64), DCGANDiscriminator(3, 64)
    # d2l's dcgan, layer by layer (4x4 kernels, no conv bias, BatchNorm 2C):
    # G: 100*512*16 + 2*512 + 512*256*16 + 2*256 + 256*128*16 + 2*128 + 128*64*16 + 2*64 + 64*3*16
    # D: 3*64*16 + 2*64 + 64*128*16 + 2*128 + 128*256*16 + 2*256 + 256*512*16 + 2*512 + 512*16
    assert sum(p.numel() for p in G.parameters()) == 3_576_704
    assert sum(p.numel() for p in D.parameters()) == 2_765_696


def test_init_and_bad_input():
    G = DCGANGenerator(latent_dim=100, image_size=32)
    G.apply(dcgan_init)
    conv = G.net[0].weight
    assert abs(conv.std().item() - 0.02) < 0.002 and abs(conv.mean().item()) < 0.002
    with pytest.raises(ValueError, match=r"latents \[N, 100\], got \(2, 64\)"):
        G(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"images \[N, 1, 32, 32\], got \(2, 1, 28, 28\)"):
        DCGANDiscriminator(image_size=32)(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="power of two"):
        DCGANGenerator(image_size=30)
    with pytest.raises(ValueError, match="reduction"):
        generator_loss(torch.zeros(2), reduction="none")


def test_training_command_runs_and_loads(tmp_path):
    from course_lib.checkpoint import read_manifest
    from course_lib.gan import load_generator, train_dcgan

    out = tmp_path / "dcgan.pt"
    train_dcgan(out=out, epochs=0.005, base=8)  # two steps of the recipe with a narrow net
    entry = read_manifest(tmp_path)["dcgan.pt"]
    assert entry["step"] == 2
    assert set(entry["metrics"]) >= {"loss_D", "loss_G", "D(x)", "D(G(z))", "fid_10k"}
    G = load_generator(out)
    assert G(torch.randn(2, 100)).shape == (2, 1, 32, 32)
