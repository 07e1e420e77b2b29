"""The notebook checkers: correct answers (written here, independently of course_lib) pass;
typical wrong answers fail with their hint; answers that call the reference fail and leave it
working; errors and wrong types in the student's code are reported."""
import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import autoencoder, diffusion, gan, grading, imagen, metrics, normalization, vae
from course_lib.grading import GradingError, diagnose, forbid
from course_lib.vae import kl_divergence as aliased_kl


# --- correct answers, as a student would write them -------------------------------------------

def discriminator_loss(real_logits, fake_logits):
    return (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()) / 2


def generator_loss(fake_logits, saturating=False):
    if saturating:
        return -F.softplus(fake_logits).mean()
    return F.softplus(-fake_logits).mean()


def generator_block(c_in, c_out, bias=False, activation=nn.ReLU, conv=nn.ConvTranspose2d):
    return nn.Sequential(conv(c_in, c_out, 4, 2, 1, bias=bias), nn.BatchNorm2d(c_out),
                         activation())


def reparameterize(mu, logvar, generator=None):
    return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)


def kl(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1)


def cosine_betas(T, s=0.008, max_beta=0.999, power=2, clip=True):
    t = np.linspace(0, 1, T + 1)
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** power
    betas = 1 - f[1:] / f[:-1]
    return torch.from_numpy(np.minimum(betas, max_beta) if clip else betas)


def q_sample(x0, t, noise, alphas_cumprod, root=0.5, shift=0):
    abar = alphas_cumprod[t - shift].to(x0.dtype).view(-1, 1, 1, 1)
    return abar ** root * x0 + (1 - abar).sqrt() * noise


def ddpm_step(x_t, t, eps, betas, alphas_cumprod, z, noise_at_0=False, root=0.5, shift=0):
    beta, abar = betas[t - shift], alphas_cumprod[t - shift]
    mean = (x_t - beta / torch.sqrt(1 - abar) * eps) / torch.sqrt(1 - beta)
    return mean if t == 0 and not noise_at_0 else mean + beta ** root * z


def ddim_step(x_t, t, t_prev, eps, alphas_cumprod, wrap=False):
    a_t = alphas_cumprod[t].item()
    a_prev = alphas_cumprod[t_prev].item() if t_prev >= 0 or wrap else 1.0
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def guided_eps(eps_cond, eps_uncond, w):
    return w * eps_cond + (1 - w) * eps_uncond


def guided_prediction(network, x_t, t, text, w, conditional=True, unconditional=None):
    return guided_eps(network(x_t, t, text if conditional else None),
                      network(x_t, t, unconditional), w)


def frechet_distance(mu1, sigma1, mu2, sigma2, factor=2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - factor * covmean))


def group_norm(x, num_groups, eps=1e-5, dims=(2, 3, 4)):
    n, c, h, w = x.shape
    g = x.reshape(n, num_groups, c // num_groups, h, w)
    mean, var = g.mean(dims, keepdim=True), g.var(dims, unbiased=False, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)


CORRECT = {
    grading.check_discriminator_loss: discriminator_loss,
    grading.check_generator_loss: generator_loss,
    grading.check_generator_block: generator_block,
    grading.check_reparameterize: reparameterize,
    grading.check_kl_divergence: kl,
    grading.check_cosine_betas: cosine_betas,
    grading.check_q_sample: q_sample,
    grading.check_ddpm_step: ddpm_step,
    grading.check_ddim_step: ddim_step,
    grading.check_guided_eps: guided_eps,
    grading.check_guided_prediction: guided_prediction,
    grading.check_frechet_distance: frechet_distance,
    grading.check_group_norm: group_norm,
}


@pytest.mark.parametrize("checker", CORRECT, ids=lambda checker: checker.__name__)
def test_correct_answers_pass(checker):
    assert checker(CORRECT[checker]) is None


def test_the_notebook_solutions_with_their_float64_schedules_pass():
    """The notebooks' solutions convert alpha_bar with .float() (05) and keep the float64
    schedule tensors in the arithmetic (06)."""
    def q_sample_float(x0, t, noise, alphas_cumprod):
        abar = alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def ddim_tensors(x_t, t, t_prev, eps, alphas_cumprod):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=a_t.dtype)
        x0 = (x_t - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
        return torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * eps

    grading.check_q_sample(q_sample_float)
    grading.check_ddim_step(ddim_tensors)


# --- typical mistakes and their hints ----------------------------------------------------------

sp = F.softplus
MISTAKES = [
    pytest.param(grading.check_discriminator_loss,
                 lambda r, f: (sp(-r).sum() + sp(f).sum()) / 2,
                 ".mean(), not .sum()", id="D-loss sum"),
    pytest.param(grading.check_discriminator_loss, lambda r, f: (sp(-r) + sp(f)) / 2,
                 "expected [] (a scalar), got [16]; it misses the mean over dimension 0",
                 id="D-loss no batch mean"),
    pytest.param(grading.check_discriminator_loss, lambda r, f: sp(-r).mean() + sp(f).mean(),
                 "divide their sum by 2", id="D-loss not halved"),
    pytest.param(grading.check_discriminator_loss,
                 lambda r, f: (sp(r).mean() + sp(-f).mean()) / 2, "swapped the labels",
                 id="D-loss labels swapped"),
    pytest.param(grading.check_discriminator_loss,
                 lambda r, f: -(torch.log(torch.sigmoid(r)).mean()
                                + torch.log(1 - torch.sigmoid(f)).mean()) / 2,
                 "is not finite (nan/inf) for logits of -200", id="D-loss from probabilities"),
    pytest.param(grading.check_discriminator_loss,
                 lambda r, f: (F.binary_cross_entropy(torch.sigmoid(r), torch.ones_like(r))
                               + F.binary_cross_entropy(torch.sigmoid(f), torch.zeros_like(f))) / 2,
                 "with softplus", id="D-loss clamped BCE"),
    pytest.param(grading.check_generator_loss,
                 lambda l, saturating=False: -generator_loss(l, saturating),
                 "has the wrong sign", id="G-loss sign"),
    pytest.param(grading.check_generator_loss,
                 lambda l, saturating=False: generator_loss(l, not saturating),
                 "You swapped the two losses", id="G-loss modes swapped"),
    pytest.param(grading.check_generator_loss,
                 lambda l, saturating=False: generator_loss(l, False),
                 "saturating=True", id="G-loss ignores the flag"),
    pytest.param(grading.check_generator_block, lambda c_in, c_out: generator_block(
        c_in, c_out, bias=True), "bias=False", id="block with bias"),
    pytest.param(grading.check_generator_block, lambda c_in, c_out: generator_block(
        c_in, c_out, conv=nn.Conv2d), "did you use nn.Conv2d?", id="block Conv2d"),
    pytest.param(grading.check_generator_block, lambda c_in, c_out: generator_block(
        c_in, c_out, activation=lambda: nn.LeakyReLU(0.2)), "not a leaky one",
        id="block LeakyReLU"),
    pytest.param(grading.check_generator_block, lambda c_in, c_out: nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.ReLU()),
        "missing 1.bias, 1.num_batches_tracked", id="block without BatchNorm"),
    pytest.param(grading.check_generator_block, lambda c_in, c_out: nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()),
        "expected [2, 6, 10, 10], got [2, 6, 8, 8]", id="block padding 2"),
    pytest.param(grading.check_generator_block, lambda c_in, c_out: [c_in, c_out],
                 "returned a list for c_in = 4, c_out = 6, expected an nn.Module",
                 id="block not a module"),
    pytest.param(grading.check_reparameterize,
                 lambda mu, logvar, generator=None: mu + logvar.exp() * torch.randn(
                     mu.shape, generator=generator),
                 "exp(logvar) is the variance", id="sigma = exp(logvar)"),
    pytest.param(grading.check_reparameterize,
                 lambda mu, logvar, generator=None: mu + torch.exp(logvar / 2) * torch.randn_like(
                     mu), "two different samples for the same generator seed",
                 id="generator ignored"),
    pytest.param(grading.check_reparameterize,
                 lambda mu, logvar, generator=None: reparameterize(mu, logvar, generator).detach(),
                 "carries no gradient", id="detached"),
    pytest.param(grading.check_reparameterize,
                 lambda mu, logvar, generator=None: reparameterize(mu, logvar.detach(), generator),
                 "no gradient of my_reparameterize's sample reaches logvar",
                 id="no gradient to logvar"),
    pytest.param(grading.check_reparameterize,
                 lambda mu, logvar, generator: reparameterize(mu, logvar, generator),
                 "raised TypeError", id="generator required"),
    pytest.param(grading.check_kl_divergence, lambda mu, logvar: -kl(mu, logvar),
                 "has the wrong sign for mu = 0, sigma = 2 (logvar = log 4), shape [1, 2]: "
                 "expected 1.614, got -1.614", id="KL sign"),
    pytest.param(grading.check_kl_divergence, lambda mu, logvar: kl(mu, logvar).sum(),
                 "expected [1], got [] (a scalar)", id="KL summed over the batch"),
    pytest.param(grading.check_kl_divergence, lambda mu, logvar: kl(mu, logvar).mean(),
                 "expected [1], got [] (a scalar); it has the right values in the wrong shape",
                 id="KL batch mean"),
    pytest.param(grading.check_kl_divergence, lambda mu, logvar: kl(mu, 2 * logvar),
                 "logvar is log sigma^2, not log sigma", id="KL with log sigma"),
    pytest.param(grading.check_kl_divergence,
                 lambda mu, logvar: -0.5 * (1 + logvar - mu ** 2 - logvar.exp()),
                 "it misses the sum over dimension 1", id="KL not summed"),
    pytest.param(grading.check_kl_divergence,
                 lambda mu, logvar: -0.5 * torch.sum(logvar - mu ** 2 - logvar.exp(), dim=1),
                 "Keep the 1", id="KL without the 1"),
    pytest.param(grading.check_cosine_betas,
                 lambda T, s=0.008, max_beta=0.999: cosine_betas(T, s, max_beta, power=1),
                 "the squared cosine", id="cosine not squared"),
    pytest.param(grading.check_cosine_betas,
                 lambda T, s=0.008, max_beta=0.999: cosine_betas(T, s, max_beta, clip=False),
                 "Clip each beta at max_beta", id="cosine betas not clipped"),
    pytest.param(grading.check_cosine_betas,
                 lambda T, s=0.008, max_beta=0.999: (1 - torch.cumprod(
                     1 - cosine_betas(T, s, max_beta), 0)).clamp(max=max_beta),
                 "the ratio of neighbours", id="cosine 1 - alpha_bar"),
    pytest.param(grading.check_cosine_betas,
                 lambda T, s=0.008, max_beta=0.999: cosine_betas(T, s, max_beta)[1:],
                 "expected [1000], got [999]", id="cosine T - 1 betas"),
    pytest.param(grading.check_cosine_betas,
                 lambda T, s=0.008, max_beta=0.999: cosine_betas(T, s, max_beta).float(),
                 "returns torch.float32", id="cosine float32"),
    pytest.param(grading.check_q_sample,
                 lambda x0, t, noise, ac: ac[t].float().view(-1, 1, 1, 1) * x0
                 + (1 - ac[t].float().view(-1, 1, 1, 1)) * noise,
                 "standard deviations, sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t)",
                 id="q_sample without square roots"),
    pytest.param(grading.check_q_sample,
                 lambda x0, t, noise, ac: q_sample(x0, t, noise, ac, shift=1),
                 "Off by one in t", id="q_sample off by one"),
    pytest.param(grading.check_q_sample,
                 lambda x0, t, noise, ac: q_sample(x0, t, noise, ac.float()).double(),
                 "returns torch.float64", id="q_sample float64"),
    pytest.param(grading.check_q_sample,
                 lambda x0, t, noise, ac: ac[t].sqrt().float() * x0 + (1 - ac[t]).sqrt().float()
                 * noise, "raised RuntimeError", id="q_sample broadcasting"),
    pytest.param(grading.check_ddpm_step,
                 lambda *args: ddpm_step(*args, noise_at_0=True),
                 "for t = 0, x_t, eps and z [4, 1, 8, 8] (float64)", id="DDPM noise at t = 0"),
    pytest.param(grading.check_ddpm_step, lambda *args: ddpm_step(*args, root=1),
                 "scale z by the standard deviation", id="DDPM sigma = beta"),
    pytest.param(grading.check_ddpm_step, lambda *args: ddpm_step(*args, shift=1),
                 "Off by one in t", id="DDPM off by one"),
    pytest.param(grading.check_ddim_step,
                 lambda *args: ddim_step(*args, wrap=True), "t_prev = -1 is the clean image",
                 id="DDIM alphas_cumprod[-1]"),
    pytest.param(grading.check_guided_eps, lambda c, u, w: (1 + w) * c - w * u,
                 "Ho & Salimans' convention", id="guidance convention"),
    pytest.param(grading.check_guided_eps, lambda c, u, w: w * u + (1 - w) * c,
                 "you swapped them", id="guidance swapped"),
    pytest.param(grading.check_guided_prediction,
                 lambda net, x, t, text, w: guided_prediction(net, x, t, text, w,
                                                              unconditional=text),
                 "with the prompt in both passes, guidance changes nothing",
                 id="guidance prompt in both passes"),
    pytest.param(grading.check_guided_prediction,
                 lambda *args: guided_prediction(*args, conditional=False),
                 "The conditional pass gets the prompt", id="guidance no prompt"),
    pytest.param(grading.check_guided_prediction,
                 lambda net, x, t, text, w: guided_prediction(net, x, t, text, 1 + w),
                 "Ho & Salimans' convention", id="guidance pass convention"),
    pytest.param(grading.check_guided_prediction,
                 lambda net, x, t, text, w: guided_prediction(
                     net, x, t, text, w, unconditional=torch.zeros_like(text)),
                 "a prompt of zeros is a prompt the network never saw", id="guidance zeros"),
    pytest.param(grading.check_guided_prediction,
                 lambda net, x, t, text, w: guided_prediction(net, x, t, text, 2 * w),
                 "for w = 3, x_t [4, 1, 6, 6] (float32), t = [999, 500, 10, 0]",
                 id="guidance unknown slip"),
    pytest.param(grading.check_frechet_distance,
                 lambda *args: frechet_distance(*args, factor=1),
                 "the square-root term counts twice", id="Frechet factor 2"),
    pytest.param(grading.check_frechet_distance,
                 lambda m1, s1, m2, s2: float(np.sum((m1 - m2) ** 2) + np.trace(
                     s1 + s2 - 2 * scipy.linalg.sqrtm(s1).real @ scipy.linalg.sqrtm(s2).real)),
                 "not the product of the square roots", id="Frechet product of roots"),
    pytest.param(grading.check_frechet_distance,
                 lambda m1, s1, m2, s2: float(np.sum((m1 - m2) ** 2) + np.trace(
                     s1 + s2 - 2 * np.sqrt(s1 @ s2))),
                 "np.sqrt is element-wise", id="Frechet element-wise sqrt"),
    pytest.param(grading.check_frechet_distance, lambda *args: complex(frechet_distance(*args)),
                 "returned a complex for two random Gaussians in D = 1, expected a number. Take "
                 "the real part", id="Frechet complex"),
    pytest.param(grading.check_group_norm,
                 lambda x, groups, eps=1e-5: group_norm(x, x.shape[1], eps),
                 "Statistics over (H, W) alone are instance norm", id="GN as instance norm"),
    pytest.param(grading.check_group_norm, lambda x, groups, eps=1e-5: group_norm(x, 1, eps),
                 "Statistics over (C, H, W) are layer norm", id="GN as layer norm"),
    pytest.param(grading.check_group_norm,
                 lambda x, groups, eps=1e-5: group_norm(x, groups, eps, dims=(2,)),
                 "Include H and W", id="GN over channels only"),
    pytest.param(grading.check_group_norm,
                 lambda x, groups, eps=1e-5: (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
                     x.var((0, 2, 3), unbiased=False, keepdim=True) + eps),
                 "never mixes samples", id="GN as batch norm"),
    pytest.param(grading.check_group_norm, lambda x, groups, eps=1e-5: group_norm(x, groups),
                 "Use the eps argument", id="GN ignores eps"),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
@pytest.mark.parametrize("checker, answer, hint", MISTAKES)
def test_typical_mistakes_fail_with_their_hint(checker, answer, hint):
    with pytest.raises(GradingError, match=re.escape(hint)):
        checker(answer)


def test_messages_name_the_input_and_both_values():
    def shifted(x, num_groups, eps=1e-5):
        return group_norm(x, num_groups, eps) + 0.5

    with pytest.raises(GradingError) as failure:
        grading.check_group_norm(shifted)
    assert str(failure.value).startswith(
        "my_group_norm is off by a constant 0.5 for x [2, 4, 3, 3] (float32), num_groups = 2: "
        "at index [")


# --- delegation --------------------------------------------------------------------------------

DELEGATING = [
    (grading.check_discriminator_loss, gan.discriminator_loss,
     lambda r, f: gan.discriminator_loss(r, f)),
    (grading.check_generator_loss, gan.generator_loss,
     lambda l, saturating=False: gan.generator_loss(l, saturating)),
    (grading.check_generator_block, gan.generator_block,
     lambda c_in, c_out: gan.generator_block(c_in, c_out)),
    (grading.check_reparameterize, vae.reparameterize, vae.reparameterize),
    (grading.check_kl_divergence, vae.kl_divergence, lambda mu, logvar: aliased_kl(mu, logvar)),
    (grading.check_cosine_betas, diffusion.cosine_schedule,
     lambda T, s=0.008, max_beta=0.999: diffusion.cosine_schedule(T, s, max_beta).betas),
    (grading.check_q_sample, diffusion.q_sample,
     lambda x0, t, noise, ac: diffusion.q_sample(
         diffusion.NoiseSchedule.from_alphas_cumprod(ac, "mine"), x0, t, noise)),
    (grading.check_ddpm_step, diffusion.ddpm_step,
     lambda x_t, t, eps, betas, ac, z: diffusion.ddpm_step(
         diffusion.NoiseSchedule(betas), x_t, t, t - 1, eps, clip=False, noise=z)[0]),
    (grading.check_ddim_step, diffusion.ddim_step,
     lambda x_t, t, t_prev, eps, ac: diffusion.ddim_step(
         diffusion.NoiseSchedule.from_alphas_cumprod(ac, "mine"), x_t, t, t_prev, eps,
         clip=False)[0]),
    (grading.check_guided_eps, imagen.guided_eps, imagen.guided_eps),
    (grading.check_guided_prediction, imagen.guided_prediction, imagen.guided_prediction),
    (grading.check_guided_prediction, imagen.guided_eps,
     lambda net, x, t, text, w: imagen.guided_eps(net(x, t, text), net(x, t), w)),
    (grading.check_frechet_distance, metrics.frechet_distance, metrics.frechet_distance),
    (grading.check_group_norm, normalization.group_norm, normalization.group_norm),
]


@pytest.mark.parametrize("checker, reference, answer", DELEGATING,
                         ids=[checker.__name__ for checker, _, _ in DELEGATING])
def test_answers_that_call_the_reference_fail_and_leave_it_working(checker, reference, answer):
    code = reference.__code__
    with pytest.raises(GradingError, match=re.escape(
            f"your answer calls {reference.__module__}.{reference.__name__}, the reference "
            f"solution; write the computation yourself")):
        checker(answer)
    assert reference.__code__ is code
    checker(CORRECT[checker])  # the reference computes the expected values again


def _grouped_layer_norm(x, groups, eps=1e-5):
    return F.layer_norm(x.reshape(len(x), groups, -1), (x[0].numel() // groups,),
                        eps=eps).reshape(x.shape)


@pytest.mark.parametrize("answer", [
    lambda x, groups, eps=1e-5: F.group_norm(x, groups, eps=eps),
    lambda x, groups, eps=1e-5: torch.group_norm(x, groups, eps=eps),
    lambda x, groups, eps=1e-5: getattr(torch, "group" + "_norm")(x, groups, eps=eps),
    lambda x, groups, eps=1e-5: nn.GroupNorm(groups, x.shape[1], eps, affine=False)(x),
    lambda x, groups, eps=1e-5: torch.ops.aten.group_norm(x, groups, eps=eps),
    lambda x, groups, eps=1e-5: torch.ops.aten.native_group_norm(
        x, None, None, x.shape[0], x.shape[1], x[0, 0].numel(), groups, eps)[0],
    _grouped_layer_norm,
    lambda x, groups, eps=1e-5: F.instance_norm(
        x.reshape(1, len(x) * groups, -1), eps=eps).reshape(x.shape),
], ids=["F.group_norm", "torch.group_norm", "getattr", "nn.GroupNorm", "aten.group_norm",
        "aten.native_group_norm", "layer_norm of the groups", "instance_norm of the groups"])
def test_group_norm_from_torch_under_any_name_counts_as_delegation(answer):
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(answer(x, 2), normalization.group_norm(x, 2))  # a right answer
    with pytest.raises(GradingError, match="your answer calls torch's"):
        grading.check_group_norm(answer)
    torch.testing.assert_close(F.group_norm(x, 2), normalization.group_norm(x, 2))


def test_the_course_helper_counts_as_delegation():
    def answer(x, groups, eps=1e-5):
        return normalization.normalize(x.reshape(len(x), groups, -1), (2,), eps).reshape(x.shape)

    with pytest.raises(GradingError, match="your answer calls course_lib.normalization.normalize"):
        grading.check_group_norm(answer)


# --- answers that try to fool the checker ------------------------------------------------------

class AlwaysEqual(torch.Tensor):
    """A tensor that says it equals anything, however it is compared."""

    def allclose(self, *args, **kwargs):
        return True

    def equal(self, *args, **kwargs):
        return True

    def __eq__(self, other):
        return torch.ones_like(torch.Tensor(self), dtype=torch.bool)

    __hash__ = torch.Tensor.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("allclose", "equal", "isclose"):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_subclass_that_equals_everything_is_refused():
    with pytest.raises(GradingError, match="returned a AlwaysEqual, a subclass of torch.Tensor"):
        grading.check_kl_divergence(lambda mu, logvar: torch.zeros(len(mu)).as_subclass(
            AlwaysEqual))


def test_patched_comparison_functions_change_no_verdict(monkeypatch):
    """An answer cell that makes every comparison say yes, globally, before the checker runs."""
    import numpy.testing

    yes = lambda *args, **kwargs: True  # noqa: E731
    nothing = lambda *args, **kwargs: None  # noqa: E731
    for owner, name, fake in [(torch, "allclose", yes), (torch, "equal", yes),
                              (torch, "isclose", yes), (torch.Tensor, "allclose", yes),
                              (torch.Tensor, "equal", yes), (torch.Tensor, "__eq__", yes),
                              (torch.Tensor, "numpy", lambda self: np.zeros(1)),
                              (torch.Tensor, "detach", lambda self: torch.zeros(1)),
                              (np, "allclose", yes), (np, "isclose", yes),
                              (np, "array_equal", yes), (numpy.testing, "assert_allclose", nothing),
                              (torch.testing, "assert_close", nothing)]:
        monkeypatch.setattr(owner, name, fake)
    with pytest.raises(GradingError, match="my_kl_divergence"):
        grading.check_kl_divergence(lambda mu, logvar: torch.zeros(len(mu)))
    with pytest.raises(GradingError, match="my_frechet_distance"):
        grading.check_frechet_distance(lambda *args: 0.0)
    monkeypatch.undo()
    grading.check_kl_divergence(kl)


def test_a_replaced_torch_tensor_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "Tensor", AlwaysEqual)  # the reference's results are not it
    with pytest.raises(GradingError):
        grading.check_kl_divergence(lambda mu, logvar: torch.zeros(len(mu)))


def test_a_copy_of_the_reference_counts_as_delegation():
    """The reference's code, taken before forbid() swaps it, or from a second import of its
    file, still counts."""
    import importlib.util
    import types

    copied = types.FunctionType(vae.kl_divergence.__code__, vae.kl_divergence.__globals__)
    with pytest.raises(GradingError, match="your answer calls course_lib.vae.kl_divergence"):
        grading.check_kl_divergence(lambda mu, logvar: copied(mu, logvar))
    spec = importlib.util.spec_from_file_location("vae_copy", vae.__file__)
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)
    with pytest.raises(GradingError, match="your answer calls course_lib.vae.kl_divergence"):
        grading.check_kl_divergence(second.kl_divergence)
    grading.check_kl_divergence(kl)  # the profile hook is gone again


def test_an_answer_that_looks_for_the_expected_value_finds_none():
    """The student's function runs before the reference: no frame holds the expected value."""
    import sys

    def snoop(mu, logvar):
        frame = sys._getframe(1)
        while frame is not None:
            if "expected" in frame.f_locals:
                return frame.f_locals["expected"]
            frame = frame.f_back
        return torch.zeros(len(mu))

    with pytest.raises(GradingError, match="returns only zeros"):
        grading.check_kl_divergence(snoop)


def test_system_exit_in_the_answer_is_not_swallowed():
    def leaves(mu, logvar):
        raise SystemExit(0)

    with pytest.raises(SystemExit):  # the test cell fails with it, and scores 0
        grading.check_kl_divergence(leaves)


def test_forbid_restores_the_code_even_when_the_block_raises():
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ZeroDivisionError), forbid(vae.kl_divergence, gan.generator_loss):
        with pytest.raises(GradingError, match="course_lib.vae.kl_divergence"):
            aliased_kl(mu, logvar)  # the same function object, imported under another name
        with pytest.raises(GradingError, match="course_lib.vae.kl_divergence"):
            vae.vae_loss(mu[:, :1], mu[:, :1], mu, logvar, 1.0, recon="mse")  # called inside
        1 / 0
    torch.testing.assert_close(aliased_kl(mu, logvar), torch.zeros(2))
    assert gan.generator_loss(torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_forbid_takes_only_functions_without_closures():
    def outer():
        y = 1
        return lambda: y

    with pytest.raises(TypeError, match="no closures"), forbid(outer()):
        pass
    with pytest.raises(TypeError, match="no closures"), forbid(torch.exp):
        pass
    with pytest.raises(TypeError, match="aten operator names"), forbid(3):
        pass


# --- errors and wrong types in the student's code ----------------------------------------------

def test_exceptions_in_the_answer_are_reported_with_the_input():
    def broken(x_t, t, eps, betas, alphas_cumprod, z):
        raise KeyError("alpha")

    with pytest.raises(GradingError, match=re.escape(
            "my_ddpm_step raised KeyError: 'alpha' for t = 999, x_t, eps and z [4, 1, 8, 8] "
            "(float64) (linear schedule, T = 1000).")):
        grading.check_ddpm_step(broken)
    with pytest.raises(GradingError, match=re.escape(
            "my_ddpm_step raised ZeroDivisionError: division by zero for t = 0")):
        grading.check_ddpm_step(lambda x_t, t, *args: ddpm_step(x_t, t, *args) if t else 1 / t)


def test_an_unanswered_exercise_says_so():
    def stub(mu, logvar):
        raise NotImplementedError()

    with pytest.raises(GradingError, match=re.escape(
            "my_kl_divergence raised NotImplementedError for mu = 0, sigma = 2")):
        grading.check_kl_divergence(stub)


@pytest.mark.parametrize("checker, answer, message", [
    (grading.check_kl_divergence, lambda mu, logvar: kl(mu, logvar).numpy(),
     "returned a numpy array for mu = 0, sigma = 2 (logvar = log 4), shape [1, 2], expected a "
     "torch.Tensor"),
    (grading.check_discriminator_loss, lambda r, f: discriminator_loss(r, f).item(),
     "returned a float for random real and fake logits [16] (float32), expected a torch.Tensor. "
     "Keep the result a tensor"),
    (grading.check_guided_eps, lambda c, u, w: None, "returned None"),
    (grading.check_ddim_step, lambda *args: (ddim_step(*args), None), "returned a tuple of 2"),
    (grading.check_frechet_distance, lambda *args: str(frechet_distance(*args)), "returned a str"),
    (grading.check_frechet_distance, lambda *args: torch.tensor(frechet_distance(*args)), None),
    (grading.check_frechet_distance, lambda *args: np.float64(frechet_distance(*args)), None),
], ids=["numpy", "float", "None", "tuple", "str", "0-d tensor accepted", "np.float64 accepted"])
def test_result_types(checker, answer, message):
    if message is None:
        checker(answer)
    else:
        with pytest.raises(GradingError, match=re.escape(message)):
            checker(answer)


# --- diagnose ------------------------------------------------------------------------------------

@pytest.mark.parametrize("got, phrase", [
    (lambda e: -e, "has the wrong sign"),
    (lambda e: 2 * e, "is off by a factor of 2 (a sum where a mean belongs?)"),
    (lambda e: e / 4, "is off by a factor of 0.25 (a mean where a sum belongs?)"),
    (lambda e: 1.5 * e, "is off by a factor of 1.5"),
    (lambda e: e + 0.5, "is off by a constant 0.5"),
    (lambda e: e.T, "is transposed"),
    (lambda e: e.reshape(3, 4), "has the right values in the wrong shape"),
    (lambda e: e[:, :, None].expand(4, 3, 5), "misses the mean over dimension 2"),
    (lambda e: e[:, :, None].expand(4, 3, 5) / 5, "misses the sum over dimension 2"),
    (lambda e: e.sum(0), "reduces over dimension 0, which the result should keep"),
    (lambda e: torch.zeros_like(e), "returns only zeros"),
    (lambda e: e * (1 + 1e-6), "is slightly off"),
    (lambda e: e.log(), "is not finite"),
    (lambda e: e[:1, :1] * 16, "is off by a factor of 16 (a sum where a mean belongs?)"),
    (lambda e: e[:1, :1] * 1.5, ""),
    (lambda e: e[:1, :1] + 0.5, ""),
    (lambda e: e ** 2, ""),
])
def test_diagnose_names_common_slips(got, phrase):
    expected = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    slip = diagnose(expected[:1, :1] if got(expected).numel() == 1 else expected, got(expected))
    assert slip.startswith(phrase) if phrase else slip == ""


# --- 05's one forward step and 06's Algorithm 1 loss ---------------------------------------------

def q_step(x_prev, t, noise, betas, signal_root=0.5, noise_root=0.5, shift=0):
    b = betas[t - shift].to(x_prev.dtype).view(-1, 1, 1, 1)
    return (1 - b) ** signal_root * x_prev + b ** noise_root * noise


def ddpm_loss(eps_model, x0, t, noise, alphas_cumprod, noise_root=0.5, target=None):
    abar = alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar) ** noise_root * noise
    return F.mse_loss(eps_model(x_t, t), noise if target is None else x0)


def test_the_new_diffusion_checkers_pass_correct_answers():
    assert grading.check_q_step(q_step) is None
    assert grading.check_ddpm_loss(ddpm_loss) is None


@pytest.mark.parametrize("checker, answer, hint", [
    (grading.check_q_step, lambda *args: q_step(*args, noise_root=1),
     "standard deviation sqrt(beta_t), not by the variance beta_t"),
    (grading.check_q_step, lambda *args: q_step(*args, signal_root=1),
     "scaled by sqrt(1 - beta_t), with a square root"),
    (grading.check_q_step, lambda x, t, noise, betas: diffusion.q_sample(
        diffusion.NoiseSchedule(betas), x, t, noise) * 1.0, "calls course_lib.diffusion.q_sample"),
    (grading.check_q_step, lambda x, t, noise, betas: (
        lambda abar: abar.sqrt() * x + (1 - abar).sqrt() * noise)(
        torch.cumprod(1 - betas, 0)[t].to(x.dtype).view(-1, 1, 1, 1)),
     "alpha_bar_t (the cumulative product) belongs to the shortcut"),
    (grading.check_q_step, lambda *args: q_step(*args, shift=1), "Off by one in t"),
    (grading.check_q_step, lambda x, t, noise, betas: q_step(x, t, noise, betas.float()).double()
     if x.dtype == torch.float32 else q_step(x, t, noise, betas), "returns torch.float64"),
    (grading.check_ddpm_loss, lambda *args: ddpm_loss(*args, noise_root=1),
     "slide drops its square root"),
    (grading.check_ddpm_loss, lambda m, x0, t, noise, ac: ddpm_loss(m, x0, t, noise, ac,
                                                                     target=True),
     "compare its output with noise, not with x0"),
    (grading.check_ddpm_loss, lambda m, x0, t, noise, ac: ddpm_loss(
        lambda x, s: m(x, s + 1), x0, t, noise, ac), "t + 1 is the paper's numbering"),
    (grading.check_ddpm_loss, lambda m, x0, t, noise, ac: ddpm_loss(m, x0, t, noise, ac) *
     x0.numel(), "not the sum"),
    (grading.check_ddpm_loss, lambda *args: ddpm_loss(*args).detach(),
     "carries no gradient to the network's parameters"),
    (grading.check_ddpm_loss, lambda m, x0, t, noise, ac: diffusion.diffusion_loss(
        m, diffusion.NoiseSchedule.from_alphas_cumprod(ac, "mine"), x0, t=t, noise=noise),
     "calls course_lib.diffusion.diffusion_loss"),
    (grading.check_ddpm_loss, lambda m, x0, t, noise, ac: diffusion.simple_loss(m, x0, t, noise,
                                                                                 ac),
     "calls course_lib.diffusion.simple_loss"),
], ids=["q_step beta", "q_step 1-beta", "q_step via q_sample", "q_step alpha_bar",
        "q_step off by one", "q_step float64", "loss slide", "loss x0 target", "loss paper t",
        "loss sum", "loss detached", "loss via diffusion_loss", "loss via simple_loss"])
def test_the_new_diffusion_checkers_name_the_known_mistakes(checker, answer, hint):
    with pytest.raises(GradingError, match=re.escape(hint)):
        checker(answer)
    checker({grading.check_q_step: q_step, grading.check_ddpm_loss: ddpm_loss}[checker])


def test_the_new_diffusion_checkers_cover_the_edge_steps_and_leave_the_references_working():
    with pytest.raises(GradingError, match=re.escape("t = [0, 1, 499, 999]")):
        grading.check_q_step(lambda x, t, noise, betas: q_step(x, t, noise, betas) + (t == 999)
                             .view(-1, 1, 1, 1))
    with pytest.raises(GradingError, match=re.escape("t = [99, 0, 42]")):
        grading.check_ddpm_loss(lambda m, x0, t, noise, ac: ddpm_loss(m, x0, t, noise, ac)
                                * (1.5 if x0.dtype == torch.float64 else 1.0))
    code = diffusion.q_step.__code__
    with pytest.raises(GradingError):
        grading.check_q_step(lambda x, t, noise, betas: diffusion.forward_step(x, t, noise, betas))
    assert diffusion.q_step.__code__ is code
    x = torch.randn(2, 1, 3, 3)
    torch.testing.assert_close(diffusion.forward_step(x, torch.tensor([0, 5]), x,
                                                      diffusion.linear_schedule(10).betas),
                               q_step(x, torch.tensor([0, 5]), x,
                                      diffusion.linear_schedule(10).betas))


def test_an_unwritten_q_step_or_loss_says_so():
    def stub(*args):
        raise NotImplementedError()

    for checker, name in ((grading.check_q_step, "my_q_step"),
                          (grading.check_ddpm_loss, "my_ddpm_loss")):
        with pytest.raises(GradingError, match=f"{name} raised NotImplementedError.*Replace the "
                                               f"NotImplementedError placeholder"):
            checker(stub)


# --- 03_autoencoder: the reconstruction loss ---------------------------------------------------

def reconstruction(x_hat, x, kind="bce", per="image", swap=False, clamp=True, root=True):
    if swap:
        x_hat, x = x, x_hat
    if kind == "bce":
        log = (lambda v: v.log().clamp(min=-100)) if clamp else torch.log
        pixels = -(x * log(x_hat) + (1 - x) * log(1 - x_hat))
    else:
        pixels = (x_hat - x).pow(2)
    values = pixels.mean() if per == "batch" else pixels.reshape(len(x), -1).mean(1)
    if per == "sum":
        values = pixels.reshape(len(x), -1).sum(1)
    return values.sqrt() if kind == "rmse" and root else values


def test_reconstruction_loss_checker_passes_a_correct_answer():
    grading.check_reconstruction_loss(reconstruction)


@pytest.mark.parametrize("answer, hint", [
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, kind, per="batch"),
     "Return one loss per image, shape [N]"),
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, kind, per="sum"), "a mean, not a sum"),
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, kind, swap=True), "you swapped them"),
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, kind, clamp=False),
     "Clamp each log at -100"),
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, kind, root=False),
     "RMSE is the square root of the mean squared error"),
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, "bce"), "Use the kind argument"),
    (lambda x_hat, x, kind="bce": reconstruction(x_hat, x, kind).detach(),
     "carries no gradient to x_hat"),
], ids=["batch mean", "pixel sum", "swapped", "no clamp", "MSE for RMSE", "kind ignored",
        "detached"])
def test_reconstruction_loss_mistakes_get_their_hint(answer, hint):
    with pytest.raises(GradingError, match=re.escape(hint)):
        grading.check_reconstruction_loss(answer)


@pytest.mark.parametrize("answer, message", [
    (lambda x_hat, x, kind="bce": autoencoder.reconstruction_loss(x_hat, x, kind),
     "calls course_lib.autoencoder.reconstruction_loss, the reference solution"),
    (lambda x_hat, x, kind="bce": F.binary_cross_entropy(x_hat, x, reduction="none").flatten(1)
     .mean(1) if kind == "bce" else reconstruction(x_hat, x, kind),
     "calls torch's binary_cross_entropy"),
], ids=["reference", "torch's BCE"])
def test_reconstruction_loss_answers_that_call_a_library_loss_fail(answer, message):
    code = autoencoder.reconstruction_loss.__code__
    with pytest.raises(GradingError, match=re.escape(message)):
        grading.check_reconstruction_loss(answer)
    assert autoencoder.reconstruction_loss.__code__ is code
    grading.check_reconstruction_loss(reconstruction)


# --- 10_flow_matching ---------------------------------------------------------------------------

def flow_loss(model, x0, t, noise, swap=False, sign=1, detach=False):
    s = t.view(-1, *[1] * (x0.ndim - 1))
    x_t = s * x0 + (1 - s) * noise if swap else (1 - s) * x0 + s * noise
    loss = F.mse_loss(model(x_t, t), sign * (noise - x0))
    return loss.detach() if detach else loss


def euler(model, x_t, t, t_next, sign=1, late=False):
    v = model(x_t, torch.full((len(x_t),), t_next if late else t, dtype=x_t.dtype))
    return x_t + sign * (t_next - t) * v


def test_the_flow_matching_solutions_pass():
    from course_lib import flow_matching

    assert grading.check_flow_matching_loss(flow_loss) is None
    assert grading.check_euler_step(euler) is None
    # the notebook's loops run on the student's function or this reference: the same results
    model = grading._GradingVelocity((2,), torch.float64, seed=0)
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(flow_matching.euler_update(model, x, 0.5, 0.25),
                               euler(model, x, 0.5, 0.25))


@pytest.mark.parametrize("checker, answer, hint", [
    (grading.check_flow_matching_loss, lambda *a: flow_loss(*a, swap=True, sign=-1),
     "the other convention (noise at t = 0"),
    (grading.check_flow_matching_loss, lambda *a: flow_loss(*a, swap=True),
     "the data at t = 0 and the noise at t = 1"),
    (grading.check_flow_matching_loss, lambda *a: flow_loss(*a, sign=-1),
     "the velocity d x_t / dt = noise - x0"),
    (grading.check_flow_matching_loss, lambda m, x0, t, n: F.mse_loss(m((1 - t.view(
        -1, *[1] * (x0.ndim - 1))) * x0 + t.view(-1, *[1] * (x0.ndim - 1)) * n, t), n),
     "not the noise (that is DDPM's target)"),
    (grading.check_flow_matching_loss, lambda m, x0, t, n: F.mse_loss(m(x0, t), n - x0),
     "not the clean x0"),
    (grading.check_flow_matching_loss, lambda *a: flow_loss(*a) * a[1].numel(),
     "not the sum"),
    (grading.check_flow_matching_loss, lambda *a: flow_loss(*a, detach=True),
     "carries no gradient"),
    (grading.check_flow_matching_loss, lambda m, x0, t, n: F.mse_loss(m(x0 + n, t), n - x0),
     "is wrong"),
    (grading.check_euler_step, lambda *a: euler(*a, sign=-1), "the step size is negative"),
    (grading.check_euler_step, lambda *a: euler(*a, late=True), "not at t_next"),
    (grading.check_euler_step, lambda m, x, t, tn: x - m(x, torch.full((len(x),), t,
                                                                          dtype=x.dtype)),
     "not a whole unit of time"),
    (grading.check_euler_step, lambda m, x, t, tn: x - t * m(x, torch.full((len(x),), t,
                                                                              dtype=x.dtype)),
     "the jump to t = 0"),
    (grading.check_euler_step, lambda m, x, t, tn: x + (tn - t) * m(x, t),
     "one time per sample, shape [3], got float"),
], ids=["other convention", "swapped ends", "reversed velocity", "noise target", "x0 input",
        "sum", "detached", "unknown", "euler sign", "euler late", "euler unit", "euler jump",
        "euler float t"])
def test_flow_matching_mistakes_get_their_hint(checker, answer, hint):
    with pytest.raises(GradingError, match=re.escape(hint)):
        checker(answer)


def test_flow_matching_answers_that_call_the_reference_fail():
    from course_lib import flow_matching

    with pytest.raises(GradingError, match="reference"):
        grading.check_flow_matching_loss(flow_matching.flow_matching_loss)
    with pytest.raises(GradingError, match="reference"):
        grading.check_euler_step(lambda m, x, t, tn: flow_matching.euler_step(m, x, t, tn)[0])
    grading.check_euler_step(euler)  # the references are restored


# --- 11_latent_diffusion ---------------------------------------------------------------------

def test_latent_answers_pass():
    assert grading.check_latent_scale(lambda z: 1 / z.std()) is None
    assert grading.check_latent_scale(lambda z: float(1 / np.std(z.numpy()))) is None  # ddof 0
    assert grading.check_latent_decode(lambda m, z0, s: m.decode(z0 / s)) is None


@pytest.mark.parametrize("checker, answer, hint", [
    (grading.check_latent_scale, lambda z: z.std(), "not the standard deviation itself"),
    (grading.check_latent_scale, lambda z: 1 / z.var(), "not 1 / variance"),
    (grading.check_latent_scale, lambda z: (1 / z.std(dim=(0, 2, 3))).mean(),
     "not a mean of per-channel"),
    (grading.check_latent_scale, lambda z: 1 / z.pow(2).mean().sqrt(), "not the root mean square"),
    (grading.check_latent_scale, lambda z: 1 / z.std(dim=0), "expected a number"),
    (grading.check_latent_decode, lambda m, z0, s: m.decode(z0 * s), "not z0 * s"),
    (grading.check_latent_decode, lambda m, z0, s: m.decode(z0), "not the generative model's z0"),
], ids=["std", "variance", "per channel", "rms", "per number", "times s", "unscaled"])
def test_latent_mistakes_get_their_hint(checker, answer, hint):
    with pytest.raises(GradingError, match=re.escape(hint)):
        checker(answer)


def test_latent_answers_that_call_the_reference_fail():
    from course_lib import latent

    with pytest.raises(GradingError, match="reference"):
        grading.check_latent_scale(latent.scale_factor)
    with pytest.raises(GradingError, match="reference"):
        grading.check_latent_decode(latent.decode_latents)
    grading.check_latent_scale(lambda z: 1 / z.std())  # the references are restored


# --- 10_flow_matching: the model graded by its FID (the round trip grades real checkpoints) ---

def test_fid_bands_give_their_points():
    assert [grading.band_points(fid) for fid in (3.0, 10.0, 10.01, 20.0, 34.9, 60.0, 61.0)] == \
        [4.0, 4.0, 3.0, 3.0, 2.0, 1.0, 0.0]


def test_a_missing_or_changed_checkpoint_earns_nothing_and_says_why(tmp_path):
    from course_lib.checkpoint import save_checkpoint

    missing = grading.grade_flow_checkpoint(tmp_path / "none.pt")
    assert (missing.points, missing.fid) == (0.0, None) and "no checkpoint at" in missing.message
    path = tmp_path / "flow.pt"
    save_checkpoint(path, {"ema": {}}, arch="flow_unet", config={}, step=1)
    path.write_bytes(path.read_bytes() + b"x")
    changed = grading.grade_flow_checkpoint(path)
    assert changed.points == 0.0 and "is corrupt or was modified" in changed.message
