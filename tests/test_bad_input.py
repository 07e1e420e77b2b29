"""The public API audited with bad input (issue 19, section 6): each probe must end in a clear
error that names what was expected, or in a documented correct result; never a raw error from
deep inside torch, a silently wrong answer or a hang."""
from __future__ import annotations

import warnings

import pytest
import torch

from course_lib import autoencoder, diffusion, gan, imagen, metrics, normalization, unet, vae
from course_lib.data import load_fashion_mnist, make_shapes, toy
from course_lib.data.vision import find_celeba
from course_lib.experiments import vae as vae_experiment
from course_lib.experiments.config import ConfigError, override
from course_lib.experiments.ddpm import DDPMRecipe


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {"unet": unet.UNet(base=8, channel_mults=(1, 2), depth=1, attention_resolutions=(14,),
                              image_size=28, num_steps=50),
            "G": gan.DCGANGenerator(16, 1, 32, 8), "D": gan.DCGANDiscriminator(1, 32, 8),
            "ae": autoencoder.Autoencoder(2), "vae": vae.VAE(2), "schedule":
                diffusion.linear_schedule(50), "features": metrics.ClassifierFeatures()}


x28, t2 = torch.zeros(2, 1, 28, 28), torch.tensor([1, 2])
x32 = torch.zeros(2, 1, 32, 32)
nan = float("nan")

# (name, call on the fixture's networks, the error, a phrase the message must contain)
ERRORS = [
    # the U-Net
    ("unet float64", lambda n: n["unet"](x28.double(), t2), ValueError, "x.to(torch.float32)"),
    ("unet uint8", lambda n: n["unet"](x28.to(torch.uint8), t2), ValueError, "x.float()"),
    ("unet empty batch", lambda n: n["unet"](x28[:0], t2[:0]), ValueError, "empty batch"),
    ("unet NaN images", lambda n: n["unet"](torch.full_like(x28, nan), t2), ValueError, "NaN"),
    ("unet wrong size", lambda n: n["unet"](x32, t2), ValueError, "[N, 1, 28, 28]"),
    ("unet float t", lambda n: n["unet"](x28, t2.float()), ValueError, "integer steps"),
    ("unet t = T", lambda n: n["unet"](x28, torch.tensor([50, 1])), ValueError, "0..49"),
    ("unet t of another batch", lambda n: n["unet"](x28, torch.tensor([1, 2, 3])), ValueError,
     "[B] = [2]"),
    ("unet size too large", lambda n: unet.UNet(base=10**6), ValueError, "base"),
    ("unet image size not divisible", lambda n: unet.UNet(image_size=27), ValueError,
     "divisible"),
    # schedules, the forward process and the loss
    ("linear schedule T = 0", lambda n: diffusion.linear_schedule(0), ValueError, "positive int"),
    ("cosine schedule T = 0", lambda n: diffusion.cosine_schedule(0), ValueError, "positive int"),
    ("offset cosine T = 0", lambda n: diffusion.offset_cosine_schedule(0), ValueError,
     "positive int"),
    ("make_schedule T = -5", lambda n: diffusion.make_schedule("linear", -5), ValueError,
     "positive int"),
    ("unknown schedule", lambda n: diffusion.make_schedule("quadratic"), ValueError,
     "choose one of"),
    ("empty betas", lambda n: diffusion.NoiseSchedule(torch.zeros(0)), ValueError, "T >= 1"),
    ("betas above 1", lambda n: diffusion.NoiseSchedule(torch.tensor([0.5, 1.5])), ValueError,
     "(0, 1]"),
    ("q_sample float t", lambda n: diffusion.q_sample(n["schedule"], x28, 1.5), ValueError,
     "integer"),
    ("q_sample t = T", lambda n: diffusion.q_sample(n["schedule"], x28, 50), ValueError, "0..49"),
    ("q_sample NaN image", lambda n: diffusion.q_sample(n["schedule"], torch.full_like(x28, nan),
                                                        1), ValueError, "NaN"),
    ("q_sample noise of another shape", lambda n: diffusion.q_sample(
        n["schedule"], x28, 1, torch.zeros(1, 1, 28, 28)), ValueError, "shape"),
    ("unknown prediction", lambda n: diffusion.diffusion_loss(n["unet"], n["schedule"], x28,
                                                              prediction="score"), ValueError,
     "prediction"),
    # the samplers
    ("DDIM 600 of 1000 steps", lambda n: diffusion.ddim_timesteps(1000, 600), ValueError,
     "would start at t = 599"),
    ("DDIM 0 steps", lambda n: diffusion.ddim_timesteps(1000, 0), ValueError, "1..1000"),
    ("DDPM with fewer steps", lambda n: diffusion.sample(n["unet"], n["schedule"], (1, 1, 28, 28),
                                                         "ddpm", 10, progress=False),
     ValueError, "runs all T = 50 steps"),
    ("unknown sampler", lambda n: diffusion.sample(n["unet"], n["schedule"], (1, 1, 28, 28),
                                                   "euler", progress=False), ValueError,
     "sampler must be one of"),
    ("sampler option of another sampler", lambda n: diffusion.sample(
        n["unet"], n["schedule"], (1, 1, 28, 28), "ddim", 2, variance="beta", progress=False),
     ValueError, "takes the options"),
    ("sample zero images", lambda n: diffusion.sample(n["unet"], n["schedule"], (0, 1, 28, 28),
                                                      "ddim", 2, progress=False), ValueError,
     "positive int"),
    ("sample the wrong image size", lambda n: diffusion.sample(
        n["unet"], n["schedule"], (1, 1, 32, 32), "ddim", 2, progress=False), ValueError,
     "[N, 1, 28, 28]"),
    ("sample with another T", lambda n: diffusion.sample(n["unet"], diffusion.linear_schedule(10),
                                                         (1, 1, 28, 28), progress=False),
     ValueError, "T = 50"),
    ("generate 0 images", lambda n: diffusion.generate(n["unet"], n["schedule"], 0, "ddim", 2),
     ValueError, "positive int"),
    ("generate batch size 0", lambda n: diffusion.generate(n["unet"], n["schedule"], 3, "ddim", 2,
                                                           batch_size=0), ValueError,
     "batch_size"),
    ("dynamic threshold percentile 2", lambda n: diffusion.dynamic_threshold(x28, 2.0),
     ValueError, "(0, 1]"),
    # GANs
    ("generator float64 latents", lambda n: n["G"](torch.zeros(2, 16, dtype=torch.float64)),
     ValueError, "torch.float32"),
    ("generator wrong latent size", lambda n: n["G"](torch.zeros(2, 10)), ValueError,
     "latents [N, 16]"),
    ("discriminator uint8", lambda n: n["D"](x32.to(torch.uint8)), ValueError, "x.float()"),
    ("discriminator 0..255", lambda n: n["D"](torch.full_like(x32, 255.0)), ValueError,
     "x * 2 - 1"),
    ("discriminator empty batch", lambda n: n["D"](x32[:0]), ValueError, "empty batch"),
    ("slerp latents of two sizes", lambda n: gan.interpolate_latents(torch.zeros(3),
                                                                     torch.zeros(4), 5),
     ValueError, "same size"),
    ("slerp with 0 steps", lambda n: gan.interpolate_latents(torch.ones(3), torch.ones(3), 0),
     ValueError, ">= 2"),
    ("negative density for D*", lambda n: gan.optimal_discriminator(torch.tensor([-1.0]),
                                                                    torch.tensor([1.0])),
     ValueError, "non-negative"),
    # FID
    ("FID of 0..255 images", lambda n: metrics.fid(torch.rand(50, 1, 28, 28) * 255,
                                                   torch.rand(50, 1, 28, 28), n["features"]),
     ValueError, "(x + 1) / 2"),
    ("FID of uint8 images", lambda n: metrics.fid(torch.zeros(50, 1, 28, 28, dtype=torch.uint8),
                                                  torch.rand(50, 1, 28, 28), n["features"]),
     ValueError, "float images"),
    ("FID of no images", lambda n: metrics.fid(torch.rand(0, 1, 28, 28),
                                               torch.rand(50, 1, 28, 28), n["features"]),
     ValueError, "at least one image"),
    ("FID of RGB images in a grey feature space", lambda n: metrics.fid(
        torch.rand(50, 3, 28, 28), torch.rand(50, 1, 28, 28), n["features"]), ValueError,
     "C in (1,)"),
    ("FID of NaN images", lambda n: metrics.fid(torch.full((50, 1, 28, 28), nan),
                                                torch.rand(50, 1, 28, 28), n["features"]),
     ValueError, "NaN"),
    ("FID of one image", lambda n: metrics.fid_from_features(torch.zeros(1, 4), torch.zeros(9, 4)),
     ValueError, "N >= 2"),
    ("Frechet distance of two sizes", lambda n: metrics.frechet_distance(
        torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4)), ValueError, "same size"),
    ("Frechet distance, non-square covariance", lambda n: metrics.frechet_distance(
        torch.zeros(3), torch.zeros(3, 2), torch.zeros(3), torch.eye(3)), ValueError, "3x3"),
    # autoencoder and VAE
    ("autoencoder NaN images", lambda n: n["ae"](torch.full_like(x32, nan)), ValueError, "NaN"),
    ("autoencoder 0..255 images", lambda n: n["ae"](torch.full_like(x32, 255.0)), ValueError,
     "[0, 1]"),
    ("autoencoder 28x28 images", lambda n: n["ae"](x28), ValueError, "size=32"),
    ("autoencoder latent of another size", lambda n: n["ae"].decode(torch.zeros(2, 3)),
     ValueError, "latents [N, 2]"),
    ("unknown reconstruction loss", lambda n: autoencoder.reconstruction_loss(x32, x32, "l1"),
     ValueError, "'bce'"),
    ("VAE NaN images", lambda n: n["vae"](torch.full_like(x32, nan)), ValueError, "NaN"),
    ("VAE 0 prior samples", lambda n: n["vae"].sample(0), ValueError, "positive int"),
    ("reparameterize of two shapes", lambda n: vae.reparameterize(torch.zeros(2, 3),
                                                                  torch.zeros(2, 4)),
     ValueError, "same shape"),
    ("KL of two shapes", lambda n: vae.kl_divergence(torch.zeros(2, 3), torch.zeros(3, 3)),
     ValueError, "[N, latent_dim]"),
    ("load an unknown VAE", lambda n: vae_experiment.load_vae("celeba"), ValueError,
     "one of ['faces', 'fashion']"),
    ("attribute vector without a negative", lambda n: vae.attribute_vector(torch.zeros(4, 2),
                                                                           torch.ones(4)),
     ValueError, "both sides"),
    # text-to-image
    ("guidance w = NaN", lambda n: imagen.guided_eps(torch.zeros(2), torch.zeros(2), nan),
     ValueError, "finite scale"),
    ("guidance of two shapes", lambda n: imagen.guided_eps(torch.zeros(2), torch.zeros(3), 2.0),
     ValueError, "one shape"),
    ("conditioning dropout p = 2", lambda n: imagen.conditioning_dropout(4, 2.0), ValueError,
     "[0, 1)"),
    # normalization
    ("GroupNorm groups that do not divide", lambda n: normalization.group_norm(
        torch.zeros(2, 6, 4, 4), 4), ValueError, "divides the 6 channels"),
    ("GroupNorm with 0 groups", lambda n: normalization.group_norm(torch.zeros(2, 6, 4, 4), 0),
     ValueError, "positive int"),
    ("BatchNorm of a vector", lambda n: normalization.batch_norm(torch.zeros(2, 6)), ValueError,
     "[N, C, H, W]"),
    ("unknown norm layer", lambda n: normalization.norm_layer("weird", 8), ValueError, "'batch'"),
    # data
    ("toy distribution, 0 samples", lambda n: toy.Ring2D().sample(0), ValueError,
     "positive int"),
    ("toy distribution, negative noise", lambda n: toy.TwoMoons(noise=-1), ValueError, ">= 0"),
    ("Fashion-MNIST unknown split", lambda n: load_fashion_mnist("validation"), ValueError,
     "'train' or 'test'"),
    ("Fashion-MNIST size 20", lambda n: load_fashion_mnist("test", size=20), ValueError,
     "28 (original) or 32"),
    ("Fashion-MNIST range 0..255", lambda n: load_fashion_mnist("test", value_range=(0, 255)),
     ValueError, "(0, 1) or (-1, 1)"),
    ("shapes, 0 images", lambda n: make_shapes(0, seed=0), ValueError, "positive"),
    # recipes
    ("misspelled recipe setting", lambda n: override(DDPMRecipe(), stpes=10), ConfigError,
     "did you mean 'steps'"),
    ("misspelled model setting", lambda n: override(DDPMRecipe(), model={"bsae": 64}),
     ConfigError, "did you mean 'base'"),
]


@pytest.mark.parametrize("call, error, phrase", [p[1:] for p in ERRORS],
                         ids=[p[0] for p in ERRORS])
def test_bad_input_gets_a_clear_error(nets, call, error, phrase):
    with pytest.raises(error) as caught:
        call(nets)
    assert phrase in str(caught.value)
    raised_in = str(caught.traceback[-1].path)  # by course_lib, not from deep inside torch
    assert "course_lib" in raised_in and "site-packages" not in raised_in, raised_in


def test_documented_results_for_edge_cases(nets, tmp_path, monkeypatch):
    """Probes whose correct answer is a result, documented in the docstrings."""
    model, schedule = nets["unet"], nets["schedule"]
    torch.testing.assert_close(model(x28, 3), model(x28, torch.tensor([3, 3])))  # an int t
    noisy = diffusion.q_sample(schedule, torch.full_like(x28, 3.0), 1)  # any real data
    assert torch.isfinite(noisy).all()
    losses = gan.discriminator_loss(torch.zeros(3), torch.zeros(5))  # batches of two sizes
    assert losses.shape == ()
    with pytest.warns(UserWarning, match="singular"):  # FID of 2 images: a warning, a number
        assert metrics.fid(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28),
                           nets["features"]) >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 images are embedded as float32, no warning
        images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        assert metrics.fid(images.double(), images, nets["features"]) == pytest.approx(0,
                                                                                    abs=1e-3)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "not-a-folder.txt"))
    (tmp_path / "not-a-folder.txt").write_text("")
    with pytest.raises(NotADirectoryError, match="COURSE_DATA_DIR"):
        find_celeba()
    assert len(ERRORS) + 8 >= 60  # the audit's size: errors above, results here


def test_a_long_prompt_is_cut_with_a_warning():
    from course_lib.text import FrozenTextEncoder

    encoder = FrozenTextEncoder(max_length=8)
    with pytest.warns(UserWarning, match="reads its first 8"):
        encoder(["a very long prompt " * 50])
    with pytest.raises(ValueError, match="exceeds the 512 positions"):
        FrozenTextEncoder(max_length=100_000)
