import copy
import json
import math
import shlex

import pytest
import torch
from d2l import torch as d2l
from torch import nn

from course_lib.gan import (DCGANDiscriminator, DCGANGenerator, Packed, dcgan_init, dirac_gan,
                            discriminator_block, discriminator_loss, gan_step, generator_block,
                            generator_gradient_norm, generator_loss, interpolate_latents,
                            mlp_networks, nearest_images, optimal_discriminator, r1_penalty,
                            toy_networks, train_discriminator, update_D, update_G)
from course_lib.train import Minibatches


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
        theirs_d = d2l.update_D(x, z, net_D, net_G, loss, trainers[0])  # d2l's order: D, G
        ours_d = update_D(x, z, ours_G, ours_D, trainers[2], reduction="sum")
        torch.testing.assert_close(ours_d, theirs_d.detach())
        theirs_g = d2l.update_G(z, net_D, net_G, loss, trainers[1])
        ours_g = update_G(z, ours_G, ours_D, trainers[3], reduction="sum")
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
    with pytest.raises(ValueError, match=r"in \[-1, 1\].*values in \[0, 255\]"):
        DCGANDiscriminator(image_size=32)(torch.tensor([0.0, 255.0]).repeat(1024).view(2, 1, 32, 32))
    with pytest.raises(ValueError, match="power of two"):
        DCGANGenerator(image_size=30)
    with pytest.raises(ValueError, match="reduction"):
        generator_loss(torch.zeros(2), reduction="none")


def test_blocks_double_and_halve_the_size():
    x = torch.randn(2, 8, 7, 7)
    assert generator_block(8, 4)(x).shape == (2, 4, 14, 14)
    assert discriminator_block(8, 16)(x[..., :6, :6]).shape == (2, 16, 3, 3)
    # ConvT 8*4*16 weights (no bias) + BatchNorm scale and shift
    assert sum(p.numel() for p in generator_block(8, 4).parameters()) == 8 * 4 * 16 + 2 * 4


def test_optimal_discriminator_is_proposition_1():
    p_data, p_g = torch.tensor([0.3, 0.1, 0.0, 0.2]), torch.tensor([0.1, 0.1, 0.4, 0.0])
    torch.testing.assert_close(optimal_discriminator(p_data, p_g),
                               torch.tensor([0.75, 0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        optimal_discriminator(p_data, -p_g)


def test_a_confident_discriminator_starves_only_the_saturating_loss():
    torch.manual_seed(0)
    net_G, net_D = mlp_networks(2, 2, hidden=16)
    z = torch.randn(64, 2)
    with torch.no_grad():  # make D reject every fake: logits -10 + a small input-dependent part
        net_D[-1].weight.mul_(0.01)
        net_D[-1].bias.fill_(-10.0)
    saturating = generator_gradient_norm(net_G, net_D, z, saturating=True)
    non_saturating = generator_gradient_norm(net_G, net_D, z, saturating=False)
    # d loss / d logit is -D = -4.5e-5 against -(1 - D): the ratio is D / (1 - D) = e^-10
    assert saturating / non_saturating == pytest.approx(math.exp(-10), rel=0.05)
    assert all(p.grad is None for p in net_G.parameters())


def test_packed_discriminator_judges_groups():
    net = nn.Linear(6, 1)
    packed = Packed(net, pack=3)
    x = torch.randn(6, 2)
    torch.testing.assert_close(packed(x), net(x.reshape(2, 6)).flatten())
    with pytest.raises(ValueError, match="divisible by 3"):
        packed(torch.randn(4, 2))
    assert mlp_networks(2, 2, pack=2)[1](torch.randn(8, 2)).shape == (4,)


def test_r1_penalty_is_half_gamma_times_the_squared_gradient_on_real_data():
    """Mescheder et al. (2018), Eq. 9, against gradients worked out by hand: a linear logit
    w.x + b has gradient w everywhere; l(x) = |x|^2 has gradient 2x."""
    linear = nn.Linear(3, 1)
    x = torch.randn(16, 3)
    penalty = r1_penalty(linear, x, gamma=10.0)
    assert penalty.item() == pytest.approx(5.0 * linear.weight.square().sum().item(), rel=1e-5)
    penalty.backward()  # differentiable in D's weights: d/dw 5 |w|^2 = 10 w
    torch.testing.assert_close(linear.weight.grad, 10.0 * linear.weight.detach())
    square = lambda v: v.square().sum(1)
    assert r1_penalty(square, x, gamma=1.0).item() == pytest.approx(
        0.5 * (2 * x).square().sum(1).mean().item(), rel=1e-5)
    assert not x.requires_grad  # the caller's batch is left alone


def test_dirac_gan_spirals_out_simultaneously_and_cycles_alternately():
    """Mescheder et al. 2018: the Jacobian of simultaneous gradient descent has eigenvalues
    of modulus > 1 at the equilibrium, alternating updates stay on a closed orbit."""
    radius = lambda path: path.norm(dim=1)
    simultaneous = dirac_gan(300, lr=0.5, simultaneous=True)
    alternating = dirac_gan(300, lr=0.5, simultaneous=False)
    assert radius(simultaneous)[-1] > 2 * radius(simultaneous)[0]
    assert 0.7 < radius(alternating)[-1] / radius(alternating)[0] < 1.3
    # the first step from (theta, psi) = (1, 1), s = sigmoid(1): D descends softplus(psi theta) / 2
    # (gradient theta s / 2), G descends -softplus(psi theta) (gradient -psi s)
    s = torch.sigmoid(torch.tensor(1.0)).item()
    assert simultaneous[1, 1].item() == pytest.approx(1 - 0.5 * s / 2)
    assert simultaneous[1, 0].item() == pytest.approx(1 + 0.5 * s)


def test_spherical_interpolation_keeps_the_ends_and_the_norm():
    z0, z1 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    path = interpolate_latents(z0, z1, 5)
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    torch.testing.assert_close(path.norm(dim=1), torch.full((5,), 3.0))
    torch.testing.assert_close(path[2], torch.tensor([3.0, 3.0]) / math.sqrt(2))
    with pytest.raises(ValueError, match="same size"):
        interpolate_latents(z0, torch.zeros(3), 4)


def test_gan_step_logs_what_it_trained():
    torch.manual_seed(0)
    net_G, net_D = toy_networks()
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (net_G, net_D)]
    out = gan_step(torch.randn(8, 2), net_G, net_D, *opts, latent_dim=2)
    assert set(out) == {"loss_D", "loss_G", "D(x)", "D(G(z))"}
    assert 0 < out["D(x)"] < 1 and 0 < out["D(G(z))"] < 1


def test_train_discriminator_is_the_d_steps_alone_and_leaves_g_as_it_was():
    """The notebooks' "D against a frozen G" loop, written out, gives the same D and losses."""
    torch.manual_seed(0)
    net_G, net_D = mlp_networks(1, 1, hidden=8)
    data = torch.randn(64, 1)
    ref_D, g_before = copy.deepcopy(net_D), copy.deepcopy(net_G.state_dict())
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (net_D, ref_D))
    torch.manual_seed(1)
    losses = train_discriminator(net_G, net_D, Minibatches(data, batch_size=16), 6, opt, 1)
    torch.manual_seed(1)
    batches, expected = Minibatches(data, batch_size=16), []
    for _ in range(6):
        (x,) = next(batches)
        with torch.no_grad():
            fake = net_G(torch.randn(len(x), 1))
        loss = discriminator_loss(ref_D(x), ref_D(fake))
        ref_opt.zero_grad(); loss.backward(); ref_opt.step()
        expected.append(loss.detach())
    assert torch.equal(losses, torch.stack(expected))
    assert all(torch.equal(a, b) for a, b in zip(net_D.parameters(), ref_D.parameters()))
    assert all(torch.equal(v, g_before[k]) for k, v in net_G.state_dict().items())
    assert all(p.grad is None for p in net_G.parameters())


def test_recipe_is_the_shipped_checkpoints_config():
    from course_lib.checkpoint import read_manifest
    from course_lib.experiments.config import to_dict
    from course_lib.experiments.dcgan import CHECKPOINT, DCGANRecipe

    stored = read_manifest(CHECKPOINT.parent)[CHECKPOINT.name]["config"]
    config = to_dict(DCGANRecipe())
    assert list(config) == list(stored) and json.loads(json.dumps(config)) == stored
    assert isinstance(config["betas"], tuple)


def test_training_command_runs_loads_and_records_its_command(tmp_path):
    from course_lib.checkpoint import load_checkpoint, read_manifest
    from course_lib.experiments.config import override
    from course_lib.experiments.dcgan import DCGANRecipe, load_generator, parse_args, train_dcgan

    out = tmp_path / "dcgan.pt"
    config = override(DCGANRecipe(), epochs=0.005, base=8)  # two steps with a narrow net
    train_dcgan(config, out=out)
    entry = read_manifest(tmp_path)["dcgan.pt"]
    assert entry["step"] == 2
    assert set(entry["metrics"]) >= {"loss_D", "loss_G", "D(x)", "D(G(z))", "fid_10k"}
    words = shlex.split(entry["command"])
    assert words[:3] == ["python", "-m", "course_lib.experiments.dcgan"]
    parsed, args = parse_args(words[3:])
    assert parsed == config and args.out == str(out)
    G = load_generator(out)
    assert G(torch.randn(2, 100)).shape == (2, 1, 32, 32)
    snapshots = load_checkpoint(out)["state"]["snapshots"]
    assert snapshots["steps"] == [0, 2]
    assert snapshots["images"].shape == (2, 64, 1, 32, 32)
    assert snapshots["images"].dtype == torch.uint8


def test_mode_collapse_results_are_what_notebook_02_says():
    """The shipped table notebook 02 plots and describes: the collapsing run sits on one mode
    with nearly all samples of high quality; the hopping run's busiest mode keeps changing
    while it covers at most one; the healthy run covers all 8 at half the late checks; R1 at
    the collapsing rates covers all 8 at the end on every seed and far more modes on average
    than the collapsing run on any seed, at a lower high-quality share; PacGAN breaks the
    collapse too."""
    from course_lib.data.toy import Ring2D
    from course_lib.experiments.mode_collapse import RESULTS, ModeCollapseRecipe

    table = json.loads(RESULTS.read_text())
    runs, seeds = table["runs"], table["seeds"]
    late = lambda run, key: [v for s, v in zip(run["step"], run[key]) if s > run["step"][-1] / 2]
    mean = lambda values: sum(values) / len(values)
    modes = Ring2D().modes

    def busiest(run):  # the mode nearest to most kept samples, per late check
        return [torch.bincount(torch.cdist(torch.tensor(samples), modes).argmin(1),
                               minlength=8).argmax().item()
                for s, samples in zip(run["step"], run["samples"]) if s > run["step"][-1] / 2]

    collapsing, hopping, healthy, r1, pacgan = (runs[k] for k in ("collapsing", "hopping",
                                                                   "healthy", "r1", "pacgan"))
    assert set(late(collapsing, "modes")) == {1} and mean(late(collapsing, "quality")) > 0.95
    assert len(set(busiest(collapsing))) == 1
    hops = busiest(hopping)
    assert max(late(hopping, "modes")) <= 1 and sum(a != b for a, b in zip(hops, hops[1:])) >= 8
    assert late(healthy, "modes").count(8) >= len(late(healthy, "modes")) / 2
    assert set(seeds["r1"]) == set(seeds["collapsing"]) == {"0", "1", "2"}
    assert all(summary["final_modes"] == 8 for summary in seeds["r1"].values())
    assert min(s["late_modes"] for s in seeds["r1"].values()) > 3 * max(
        s["late_modes"] for s in seeds["collapsing"].values())
    assert mean(late(r1, "quality")) < mean(late(collapsing, "quality")) / 3
    assert min(late(pacgan, "modes")) >= 3 and pacgan["modes"][-1] == 8
    config = ModeCollapseRecipe()
    assert (r1["lr_G"], r1["lr_D"]) == (pacgan["lr_G"], pacgan["lr_D"]) == (
        config.collapsing.lr_G, config.collapsing.lr_D) == (collapsing["lr_G"], collapsing["lr_D"])
    assert r1["r1_gamma"] > 0 and collapsing["r1_gamma"] == 0 and pacgan["pack"] == 4


def test_mode_collapse_runs_record_modes_and_samples_and_its_command(tmp_path):
    from course_lib.data.toy import Ring2D, mode_coverage
    from course_lib.experiments import mode_collapse as mc

    config, args = mc.parse_args(["--steps", "40", "--every", "20", "--samples", "200",
                                  "--kept-samples", "10", "--batch-size", "64",
                                  "--out", str(tmp_path / "mc.json")])
    ring = Ring2D()
    data = ring.sample(1000, torch.Generator().manual_seed(0))
    record = mc.train_ring_gan(config.pacgan, config, data, ring)
    assert record["step"] == [20, 40] and len(record["samples"][0]) == 10
    samples = torch.tensor(record["samples"][1])
    assert len(mc.modes_hit(samples, ring, 1)) == mode_coverage(samples, ring.modes, ring.std)[0]
    again = mc.train_ring_gan(config.pacgan, config, data, ring)
    assert again == record  # same seed, same run
    assert shlex.split(mc.command(mc.MODULE, config))[3:5] == ["--collapsing.lr-G", "0.0003"]
    assert mc.late_summary({"step": [10, 20, 30, 40], "modes": [0, 1, 8, 6],
                            "quality": [0.0, 0.1, 0.5, 0.3]}) == {
        "late_modes": 7.0, "late_all_modes": 0.5, "late_quality": 0.4, "final_modes": 6}


def test_nearest_images_finds_copies_in_order_and_rejects_bad_input():
    """Foster's memorisation check: a copy of a reference image is found at distance 0, the
    next ones in increasing Euclidean pixel distance."""
    references = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    queries = torch.stack([references[7], references[31] + 0.01])
    distances, indices = nearest_images(queries, references, k=3)
    assert distances.shape == indices.shape == (2, 3)
    assert indices[:, 0].tolist() == [7, 31]
    assert distances[0, 0].item() == pytest.approx(0, abs=1e-3)
    assert distances[1, 0].item() == pytest.approx(0.01 * 8, abs=1e-3)  # 0.01 on each of 64 pixels
    brute = (queries[:, None] - references[None]).flatten(2).norm(dim=2)   # [2, 50]
    assert torch.allclose(distances, brute.sort(dim=1).values[:, :3], atol=1e-4)
    assert (distances[:, 1:] >= distances[:, :-1]).all()
    with pytest.raises(ValueError, match="same image size"):
        nearest_images(torch.rand(2, 1, 8, 7), references)
    with pytest.raises(ValueError, match="k must be"):
        nearest_images(queries, references, k=51)


def test_vanishing_gradients_command_reruns_to_the_same_table(tmp_path, monkeypatch):
    """The recorded command of the D-alone measurement reruns to the same rows (same seed)."""
    from pathlib import Path

    from course_lib.experiments import dcgan

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the command's paths are relative
    out = tmp_path / "vanishing.json"
    dcgan.main(["vanishing-gradients", "--checks", "1", "2", "--batch-size", "8", "--probes", "8",
                "--out", str(out)])
    table = json.loads(out.read_text())
    assert [row["D steps"] for row in table["rows"]] == [0, 1, 2]
    assert set(table["rows"][0]) == {"D steps", "D(x)", "D(G(z))", "|grad G| saturating",
                                     "|grad G| non-saturating"}
    words = shlex.split(table["command"])
    assert words[:4] == ["python", "-m", dcgan.MODULE, "vanishing-gradients"]
    assert words[-2:] == ["--out", str(out)]
    dcgan.main(words[3:-2] + ["--out", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == table["rows"]
    with pytest.raises(ValueError, match="increasing"):
        dcgan.vanishing_gradients(dcgan.VanishingRecipe(checks=(2, 1)))


def test_vanishing_gradient_table_is_what_notebook_02_says():
    """The shipped table: D ends up near-perfect; the non-saturating gradient grows, the
    saturating one shrinks, and their ratio follows 1 / D(G(z)) once D rejects the fakes."""
    from course_lib.experiments.dcgan import VANISHING, VanishingRecipe

    table = json.loads(VANISHING.read_text())
    rows = table["rows"]
    assert [row["D steps"] for row in rows] == [0, *VanishingRecipe().checks]
    first, last = rows[0], rows[-1]
    assert last["D(x)"] > 0.99 and last["D(G(z))"] < 0.01
    assert last["|grad G| non-saturating"] > 10 * first["|grad G| non-saturating"]
    assert last["|grad G| saturating"] < first["|grad G| saturating"]
    for row in rows:
        ratio = row["|grad G| non-saturating"] / row["|grad G| saturating"]
        if row["D(G(z))"] < 0.1:
            assert 0.5 < ratio * row["D(G(z))"] < 2
