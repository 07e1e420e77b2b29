import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from course_lib.diffusion import (SAMPLERS, NoiseSchedule, Trajectory, algorithm_2_step,
                                  cosine_schedule, ddim_step, ddim_timesteps, ddpm_step,
                                  diffusion_loss, dynamic_threshold, forward_shortcut,
                                  forward_step, generate, linear_schedule, make_schedule,
                                  offset_cosine_schedule, predict_x0_and_eps, q_sample, q_step,
                                  sample, simple_loss, training_target)

DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


def ddpm_scheduler(schedule: str, T: int = 1000, **config) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAMES[schedule],
                         **config)


def in_float64(scheduler, schedule: NoiseSchedule):
    """The diffusers scheduler running on our float64 tables. Out of the box it works in float32
    and loses digits at small t, where it recomputes beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    (a difference of two numbers near 1: relative error ~1e-3 at t = 1); in float64 both
    implementations agree to ~1e-12, so the comparison tests the formulas, not the rounding."""
    scheduler.betas, scheduler.alphas = schedule.betas, schedule.alphas
    scheduler.alphas_cumprod = schedule.alphas_cumprod
    return scheduler


# --- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50])
def test_schedules_match_diffusers(name, T):
    ours, theirs = make_schedule(name, T), ddpm_scheduler(name, T)
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.alphas.float(), theirs.alphas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=0,
                               atol=1e-6)


def test_linear_schedule_is_ho_et_al_and_indexed_from_paper_t_1():
    s = linear_schedule()
    assert s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4)   # paper beta_1 is code index 0
    assert s.betas[-1].item() == pytest.approx(0.02)  # paper beta_T
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)  # alpha_bar_1 = alpha_1
    assert s.alphas_cumprod[2].item() == pytest.approx((1 - 1e-4) * (1 - s.betas[1].item())
                                                       * (1 - s.betas[2].item()))


def test_cosine_schedule_is_nichol_dhariwal_eq_17():
    T, s = 1000, 0.008
    sched = cosine_schedule(T)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    for t in (1, 10, 500, 900, 990):  # paper t; unclipped there
        assert sched.alphas_cumprod[t - 1].item() == pytest.approx(f[t] / f[0], rel=1e-12)
    assert sched.betas.max().item() == pytest.approx(0.999)  # clipped at the end
    assert sched.betas[-1].item() == pytest.approx(0.999)


def test_offset_cosine_is_fosters_angles():
    T, lo, hi = 1000, 0.02, 0.95
    sched = offset_cosine_schedule(T, lo, hi)
    start, end = math.acos(hi), math.acos(lo)
    for t in (1, 250, 1000):  # paper t, diffusion time t / T
        angle = start + t / T * (end - start)
        assert sched.signal_rate[t - 1].item() == pytest.approx(math.cos(angle), rel=1e-12)
        assert sched.noise_rate[t - 1].item() == pytest.approx(math.sin(angle), rel=1e-12)
    assert sched.signal_rate[-1].item() == pytest.approx(lo)
    assert sched.betas[0].item() == pytest.approx(1 - math.cos(start + (end - start) / T) ** 2)


@pytest.mark.parametrize("name", ["linear", "cosine", "offset_cosine"])
def test_rates_are_consistent(name):
    s = make_schedule(name, 300)
    torch.testing.assert_close(s.signal_rate ** 2 + s.noise_rate ** 2, torch.ones(300,
                               dtype=torch.float64))
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    torch.testing.assert_close(s.snr, s.signal_rate ** 2 / s.noise_rate ** 2)
    assert (s.signal_rate[1:] < s.signal_rate[:-1]).all()  # noise only grows


def test_linear_adds_noise_fastest_cosine_slowest_offset_cosine_between():
    lin, cos, off = linear_schedule(), cosine_schedule(), offset_cosine_schedule()
    assert (lin.noise_rate[:990] > cos.noise_rate[:990]).all()  # both ~1 at the very end
    assert (off.noise_rate[164:938] > cos.noise_rate[164:938]).all()  # in between for most t
    assert (off.noise_rate[164:938] < lin.noise_rate[164:938]).all()
    assert off.noise_rate[0].item() > 0.3 > lin.noise_rate[0].item()  # large initial noise
    assert lin.signal_rate[749].item() < 0.08  # the last quarter is nearly pure noise
    assert cos.signal_rate[749].item() > 0.35


def test_schedule_errors():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")


# --- forward process ---------------------------------------------------------------------------

def test_q_sample_is_eq_4_with_the_square_root():
    s = linear_schedule()
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 499, 999])
    expected = torch.stack([s.alphas_cumprod[i].sqrt() * x0[k] + (1 - s.alphas_cumprod[i]).sqrt()
                            * noise[k] for k, i in enumerate(t)]).float()
    torch.testing.assert_close(q_sample(s, x0, t, noise), expected)


def test_q_sample_matches_diffusers_add_noise():
    s, theirs = cosine_schedule(), ddpm_scheduler("cosine")
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(q_sample(s, x0, t, noise), theirs.add_noise(x0, noise, t),
                               rtol=0, atol=1e-5)
    x0, noise = x0.double(), noise.double()
    torch.testing.assert_close(q_sample(s, x0, t, noise),
                               in_float64(theirs, s).add_noise(x0, noise, t), rtol=0, atol=1e-12)


def test_q_step_is_eq_2():
    s = linear_schedule()
    x, noise = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    beta = s.betas[9].item()
    torch.testing.assert_close(q_step(s, x, 9, noise),
                               math.sqrt(1 - beta) * x + math.sqrt(beta) * noise)


def test_code_t_0_is_one_step_of_noise():
    """Paper t = 1 (code 0): x_1 ~ N(sqrt(1 - beta_1) x_0, beta_1 I) by both routes."""
    s = linear_schedule()
    x0, noise = torch.full((1, 1, 2, 2), 0.5), torch.randn(1, 1, 2, 2)
    torch.testing.assert_close(q_sample(s, x0, 0, noise), q_step(s, x0, 0, noise))
    assert (q_sample(s, x0, 0, noise) - math.sqrt(1 - 1e-4) * x0).div(noise).mean().item() \
        == pytest.approx(0.01, rel=1e-4)  # sqrt(beta_1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_step_by_step_and_shortcut_agree_in_distribution(name):
    """Chaining q(x_t | x_{t-1}) gives q(x_t | x_0): mean sqrt(alpha_bar_t) x_0 and variance
    1 - alpha_bar_t, checked over 20,000 chains of a fixed x_0."""
    s = make_schedule(name, 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0]).view(1, 4, 1, 1).expand(20_000, 4, 1, 1)
    x = x0.clone()
    for t in range(600):
        x = q_step(s, x, t, torch.randn(x.shape, generator=gen))
        if t in (0, 99, 599):
            abar = s.alphas_cumprod[t].item()
            torch.testing.assert_close(x.mean(0), math.sqrt(abar) * x0[0], atol=0.025, rtol=0)
            torch.testing.assert_close(x.var(0), torch.full_like(x0[0], 1 - abar),
                                       atol=0.03 * (1 - abar) + 1e-6, rtol=0)


@pytest.mark.parametrize("name", ["linear", "cosine", "offset_cosine"])
def test_unit_variance_is_kept(name):
    s = make_schedule(name)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(50_000, 1, 1, 1, generator=gen)
    for t in (0, 100, 500, 999):
        x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen))
        assert x_t.var().item() == pytest.approx(1.0, abs=0.03)


def test_forward_process_errors():
    s = linear_schedule(100)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"0\.\.99"):
        q_sample(s, x, 100)
    with pytest.raises(ValueError, match=r"0\.\.99"):
        q_sample(s, x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer"):
        q_sample(s, x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[2\]"):
        q_step(s, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        q_sample(s, torch.full((2, 1, 4, 4), float("nan")), 3)
    with pytest.raises(ValueError, match="shape"):
        q_sample(s, x, 3, noise=torch.zeros(2, 1, 4, 5))


# --- training objective ------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Predicts zero noise and remembers what it was given."""

    num_steps = 1000

    def forward(self, x_t, t):
        self.x_t, self.t = x_t, t
        return torch.zeros_like(x_t)


def test_algorithm_1_draws_t_then_eps_and_regresses_eps():
    s, model = cosine_schedule(), Recorder()
    x0 = torch.rand(8, 1, 5, 5) * 2 - 1
    torch.manual_seed(3)
    loss = diffusion_loss(model, s, x0)
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (8,))
    eps = torch.randn_like(x0)
    torch.testing.assert_close(model.t, t)
    torch.testing.assert_close(model.x_t, q_sample(s, x0, t, eps))
    torch.testing.assert_close(loss, eps.pow(2).mean())


def test_algorithm_1_draws_every_step_uniformly():
    model = Recorder()
    torch.manual_seed(0)
    diffusion_loss(model, linear_schedule(10), torch.zeros(20_000, 1, 1, 1))
    counts = torch.bincount(model.t, minlength=10)
    assert len(counts) == 10 and counts.min() > 1800 and counts.max() < 2200


def test_diffusion_loss_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        diffusion_loss(Recorder(), cosine_schedule(), torch.full((2, 1, 3, 3), float("nan")))


def test_v_target_matches_diffusers_velocity():
    s, theirs = cosine_schedule(), ddpm_scheduler("cosine")
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([1, 400, 900])
    torch.testing.assert_close(training_target(s, x0, noise, t, "v"),
                               theirs.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)
    assert training_target(s, x0, noise, t, "x0") is x0
    assert training_target(s, x0, noise, t, "epsilon") is noise


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_predictions_invert_to_x0_and_eps(prediction):
    s = cosine_schedule()
    x0, noise = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4,
                                                                           dtype=torch.float64)
    t = 300
    x_t = q_sample(s, x0, t, noise)
    target = training_target(s, x0, noise, torch.tensor([t, t]), prediction)
    x0_hat, eps_hat = predict_x0_and_eps(s, x_t, t, target, prediction)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


# --- one sampler step against diffusers --------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("variance, variance_type", [("beta", "fixed_large"),
                                                     ("posterior", "fixed_small")])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddpm_step_matches_diffusers(name, variance, variance_type, clip, prediction):
    s = make_schedule(name)
    config = dict(variance_type=variance_type, clip_sample=clip,
                  prediction_type=PREDICTIONS[prediction])
    theirs, theirs64 = ddpm_scheduler(name, **config), in_float64(ddpm_scheduler(name, **config), s)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 6, 6, generator=gen) * 2.4 - 1.2  # some pixels outside [-1, 1]
    for t in (999, 700, 250, 1, 0):  # diffusers' timestep = our code t = paper t - 1
        x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen))
        output = torch.randn(x0.shape, generator=gen)  # stands in for the network
        for scheduler, dtype, tol in ((theirs, torch.float32, 1e-3),
                                      (theirs64, torch.float64, 1e-9)):
            ours = ddpm_step(s, x_t.to(dtype), t, t - 1, output.to(dtype), variance=variance,
                             clip=clip, prediction=prediction,
                             generator=torch.Generator().manual_seed(t))
            ref = scheduler.step(output.to(dtype), t, x_t.to(dtype),
                                 generator=torch.Generator().manual_seed(t))
            scale = ref.pred_original_sample.abs().max().item()  # 1/sqrt(alpha_bar) at large t
            torch.testing.assert_close(ours[1], ref.pred_original_sample, rtol=0,
                                       atol=tol * max(1.0, scale))
            torch.testing.assert_close(ours[0], ref.prev_sample, rtol=0, atol=tol)


def test_dynamic_threshold_against_numpy():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    x0 = x0 * torch.tensor([0.2, 2.0, 5.0], dtype=torch.float64).view(3, 1, 1, 1)
    out = dynamic_threshold(x0, 0.995)
    for i in range(3):
        a = x0[i].numpy()
        s = max(1.0, np.percentile(np.abs(a), 99.5))  # numpy's default is linear interpolation
        np.testing.assert_allclose(out[i].numpy(), np.clip(a, -s, s) / s, rtol=1e-12)
    torch.testing.assert_close(out[0], x0[0])  # |x0| < 1: s = 1, nothing to do
    assert out.abs().max() <= 1 and out[2].abs().max() == 1


@pytest.mark.parametrize("t", [999, 500, 10])
def test_dynamic_thresholding_step_matches_diffusers(t):
    s = make_schedule("linear")
    theirs = in_float64(ddpm_scheduler("linear", clip_sample=False, thresholding=True,
                                       dynamic_thresholding_ratio=0.995,
                                       sample_max_value=1e6), s)
    gen = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64) * 3
    output = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    ours = ddpm_step(s, x_t, t, t - 1, output, variance="posterior", clip="dynamic",
                     generator=torch.Generator().manual_seed(1))
    ref = theirs.step(output, t, x_t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours[1], ref.pred_original_sample, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours[0], ref.prev_sample, rtol=0, atol=1e-9)
    static = predict_x0_and_eps(s, x_t, t, output)[0].clamp(-1, 1)
    assert not torch.allclose(ours[1], static)  # not static clipping in disguise


def test_clip_must_be_a_known_option():
    with pytest.raises(ValueError, match="'dynamic'"):
        sample(Shrink(10), linear_schedule(10), (1, 1, 2, 2), "ddim", clip="static",
               progress=False)


def test_ddpm_step_is_algorithm_2_and_adds_no_noise_at_paper_t_1():
    s = linear_schedule()
    x_t, eps, z = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    for t in (0, 1, 500):  # code t = paper t - 1
        alpha, abar, beta = (s.alphas[t].item(), s.alphas_cumprod[t].item(), s.betas[t].item())
        mean = (x_t - (1 - alpha) / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        expected = mean if t == 0 else mean + math.sqrt(beta) * z
        torch.testing.assert_close(ddpm_step(s, x_t, t, t - 1, eps, variance="beta", clip=False,
                                             noise=z)[0], expected)
        abar_prev = s.alphas_cumprod[t - 1].item() if t > 0 else 1.0
        posterior = (1 - abar_prev) / (1 - abar) * beta
        expected = mean if t == 0 else mean + math.sqrt(posterior) * z
        torch.testing.assert_close(ddpm_step(s, x_t, t, t - 1, eps, variance="posterior",
                                             clip=False, noise=z)[0], expected)


@pytest.mark.parametrize("steps", [10, 25, 50, 100, 30, 7, 1000])
def test_ddim_timesteps_match_diffusers(steps):
    theirs = DDIMScheduler(num_train_timesteps=1000)
    theirs.set_timesteps(steps)
    assert ddim_timesteps(1000, steps) == theirs.timesteps.tolist()


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_step_matches_diffusers(name, eta, clip, prediction):
    s = make_schedule(name)
    schedulers = [DDIMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[name],
                                clip_sample=clip, prediction_type=PREDICTIONS[prediction])
                  for _ in range(2)]
    in_float64(schedulers[1], s)
    for scheduler in schedulers:
        scheduler.set_timesteps(25)
    timesteps = ddim_timesteps(1000, 25)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 5, 5, generator=gen) * 2.4 - 1.2
    for i in (0, 12, 23, 24):
        t, t_prev = timesteps[i], (timesteps[i + 1] if i + 1 < 25 else -1)
        x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen))
        output, z = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
        for scheduler, dtype, tol in zip(schedulers, (torch.float32, torch.float64), (1e-4, 1e-9)):
            x_t, output, z = x_t.to(dtype), output.to(dtype), z.to(dtype)
            ours = ddim_step(s, x_t, t, t_prev, output, eta=eta, clip=clip,
                             prediction=prediction, noise=z)
            ref = scheduler.step(output, t, x_t, eta=eta, use_clipped_model_output=clip,
                                 variance_noise=z)
            torch.testing.assert_close(ours[1], ref.pred_original_sample, rtol=0, atol=tol)
            torch.testing.assert_close(ours[0], ref.prev_sample, rtol=0, atol=tol)


def test_ddim_with_eta_1_on_every_step_is_ddpm_with_posterior_variance():
    s = cosine_schedule()
    x_t, eps, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in (999, 400, 1, 0):
        torch.testing.assert_close(ddim_step(s, x_t, t, t - 1, eps, eta=1.0, noise=z)[0],
                                   ddpm_step(s, x_t, t, t - 1, eps, variance="posterior",
                                             noise=z)[0],
                                   rtol=1e-5, atol=1e-5)


class Broken(torch.nn.Module):
    """A stand-in network whose output has the wrong shape or is not finite."""

    def __init__(self, output):
        super().__init__()
        self.num_steps, self.output = 100, output

    def forward(self, x, t):
        return self.output


def test_sample_checks_its_arguments_once_before_the_loop():
    s = linear_schedule(100)
    shape = (2, 1, 4, 4)
    draw = lambda model, *args, **kw: sample(model, s, shape, *args, progress=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="shape of x_t"):
        draw(Broken(torch.zeros(2, 1, 4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        draw(Broken(torch.full(shape, float("nan"))))
    with pytest.raises(ValueError, match="variance"):
        draw(Shrink(100), variance="learned")
    with pytest.raises(ValueError, match="prediction"):
        draw(Shrink(100), "ddim", prediction="score")
    with pytest.raises(ValueError, match=r"takes the options \['clip', 'eta', 'prediction'\]"):
        draw(Shrink(100), "ddim", variance="beta")  # DDIM has no variance option
    with pytest.raises(ValueError, match="eta"):
        draw(Shrink(100), "ddim", eta=2.0)
    with pytest.raises(ValueError, match="all T = 100 steps"):
        draw(Shrink(100), "ddpm", 10)
    with pytest.raises(ValueError, match="1..100"):
        ddim_timesteps(100, 0)


def test_every_sampler_has_the_same_step_signature():
    for name, sampler in SAMPLERS.items():
        params = list(inspect.signature(sampler.step).parameters)
        assert params[:5] == ["schedule", "x_t", "t", "t_prev", "model_output"], name
        assert sampler.timesteps(1000, None)[0] > sampler.timesteps(1000, None)[-1] == 0, name


# --- sampling loops ----------------------------------------------------------------------------

class Shrink(torch.nn.Module):
    """A stand-in 'network': eps estimate 0.5 x_t, defined for T steps."""

    def __init__(self, num_steps: int):
        super().__init__()
        self.num_steps, self.calls = num_steps, []

    def forward(self, x, t):
        self.calls.append(t)
        return 0.5 * x


def test_ddpm_sampling_runs_algorithm_2_from_paper_T_down_to_1(device):
    s, model = cosine_schedule(50), Shrink(50)
    traj = sample(model, s, (3, 1, 4, 4), "ddpm", generator=torch.Generator().manual_seed(0),
                  device=device, return_trajectory=True, progress=False)
    assert isinstance(traj, Trajectory)
    assert traj.timesteps == list(range(49, -1, -1)) and len(traj.x) == 51 == len(traj.x0) + 1
    assert [c[0].item() for c in model.calls] == traj.timesteps
    torch.testing.assert_close(traj.x[0], torch.randn(3, 1, 4, 4,
                                                      generator=torch.Generator().manual_seed(0)))
    x = traj.x[0].to(device)  # replay Algorithm 2 with the same noise stream
    gen = torch.Generator().manual_seed(0)
    torch.randn(3, 1, 4, 4, generator=gen)
    for t in traj.timesteps:
        x = ddpm_step(s, x, t, t - 1, 0.5 * x, generator=gen)[0]
    torch.testing.assert_close(traj.x[-1], x.cpu())


def test_sampling_is_reproducible_and_ddim_eta_0_deterministic(device):
    s = linear_schedule(100)
    draw = lambda seed, **kw: sample(Shrink(100), s, (2, 1, 3, 3), generator=torch.Generator()  # noqa: E731
                                     .manual_seed(seed), device=device, progress=False, **kw)
    torch.testing.assert_close(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    traj = sample(Shrink(100), s, (2, 1, 3, 3), "ddim", steps=10, device=device,
                  generator=torch.Generator().manual_seed(0), return_trajectory=True,
                  progress=False)
    assert traj.timesteps == list(range(90, -1, -10))
    x = traj.x[0].to(device)
    for i, t in enumerate(traj.timesteps):
        x = ddim_step(s, x, t, traj.timesteps[i + 1] if i < 9 else -1, 0.5 * x)[0]
    torch.testing.assert_close(traj.x[-1], x.cpu())


def test_sampling_refuses_a_schedule_with_another_T():
    with pytest.raises(ValueError, match="T = 1000.*T = 500"):
        sample(Shrink(1000), linear_schedule(500), (1, 1, 2, 2), progress=False)
    with pytest.raises(ValueError, match="sampler"):
        sample(Shrink(10), linear_schedule(10), (1, 1, 2, 2), "euler", progress=False)


def test_training_command_checkpoint_and_fid_table(tmp_path):
    """The shipped-checkpoint pipeline end to end on a tiny U-Net: train, verify and load,
    sample, table, and the manifest record."""
    import json

    from course_lib.checkpoint import read_manifest, sha256_of
    from course_lib.experiments.config import override
    from course_lib.experiments.ddpm import (DDPMRecipe, FIDTable, fid_table, load_ddpm, record_fid,
                                             train_ddpm)

    tiny = override(DDPMRecipe(), steps=3, warmup=1, batch_size=8,
                    model={"base": 8, "channel_mults": [1, 2], "attention_resolutions": [14],
                           "num_steps": 50})
    out = tmp_path / "ddpm.pt"
    train_ddpm(tiny, out, run=tmp_path / "run.pt")
    model, schedule = load_ddpm(out)
    assert schedule.T == 50 and schedule.name == "cosine"
    images = generate(model, schedule, 5, sampler="ddim", steps=5, batch_size=2)
    assert images.shape == (5, 1, 28, 28) and images.abs().max() <= 1
    torch.testing.assert_close(images, generate(model, schedule, 5, "ddim", 5, batch_size=2))
    table_path = tmp_path / "fid.json"
    # a table written before clipping was recorded per row: its rows keep their values
    table_path.write_text(json.dumps({"clip_x0": True, "rows": {"ddpm_1000@20": {
        "sampler": "DDPM", "steps": 50, "samples": 20, "fid": 999.5, "command": "old"}}}))
    table = fid_table(FIDTable(["ddim_10", "large"], samples=20, large_samples=30,
                               large_row="ddim_10"), path=out, out=table_path)
    assert set(table["rows"]) == {"ddpm_1000@20", "ddim_10@20", "ddim_10@30"}
    assert table["rows"]["ddpm_1000@20"] == {"sampler": "DDPM", "steps": 50, "samples": 20,
                                             "fid": 999.5, "command": "old", "clip_x0": True}
    assert set(table["floor_train_vs_test"]) == {"20", "30"}
    assert all(row["fid"] > table["floor_train_vs_test"]["20"] for row in table["rows"].values())
    table = fid_table(FIDTable(["ddim_10"], samples=20, clip=False), path=out, out=table_path)
    unclipped = table["rows"]["ddim_10_unclipped@20"]
    assert unclipped["clip_x0"] is False and "--no-clip" in unclipped["command"]
    assert table["rows"]["ddim_10@20"]["clip_x0"] is True and "clip_x0" not in table
    digest = sha256_of(out)
    record_fid(out, table_path)
    metrics = read_manifest(tmp_path)["ddpm.pt"]["metrics"]
    rows = json.loads(table_path.read_text())["rows"]
    assert metrics["fid_20_ddim10"] == rows["ddim_10@20"]["fid"]
    assert metrics["fid_20_ddim10_unclipped"] == unclipped["fid"]
    assert metrics["loss"] > 0  # the training metrics are kept
    assert sha256_of(out) == digest  # the file is not re-saved
    load_ddpm(out)


def test_the_optimizer_warms_up_linearly_then_decays_as_a_cosine():
    from course_lib.train import make_optimizer, optimize

    module = torch.nn.Linear(3, 1)
    opt, lr_schedule = make_optimizer(module, lr=1e-3, weight_decay=0.0, warmup=10, steps=100)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        optimize(module(torch.ones(1, 3)).sum(), module, opt, lr_schedule, grad_clip=1.0)
    s = np.arange(100)
    expected = 1e-3 * np.minimum((s + 1) / 10, 0.5 * (1 + np.cos(np.pi * s / 100)))
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[0] == pytest.approx(1e-4) and seen[50] == pytest.approx(0.5e-3)


# --- the exercises' signatures -------------------------------------------------------------------

def test_forward_step_is_q_step_on_the_raw_betas():
    s = cosine_schedule(100)
    x, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 50, 99])
    b = s.betas[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(forward_step(x, t, noise, s.betas),
                               (1 - b).sqrt() * x + b.sqrt() * noise)
    torch.testing.assert_close(forward_step(x, t, noise, s.betas), q_step(s, x, t, noise))


def test_forward_shortcut_is_q_sample_on_the_raw_alphas_cumprod():
    s = cosine_schedule(100)
    x, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 50, 99])
    abar = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(forward_shortcut(x, t, noise, s.alphas_cumprod),
                               abar.sqrt() * x + (1 - abar).sqrt() * noise)


def test_simple_loss_is_algorithm_1_for_given_t_and_noise():
    s, model = cosine_schedule(), Recorder()
    x0, noise, t = torch.rand(4, 1, 5, 5) * 2 - 1, torch.randn(4, 1, 5, 5), torch.tensor(
        [0, 10, 500, 999])
    loss = simple_loss(model, x0, t, noise, s.alphas_cumprod)
    torch.testing.assert_close(model.t, t)
    torch.testing.assert_close(model.x_t, q_sample(s, x0, t, noise))
    torch.testing.assert_close(loss, noise.pow(2).mean())
    torch.testing.assert_close(loss, diffusion_loss(model, s, x0, t=t, noise=noise))


def test_algorithm_2_step_is_the_printed_step_without_clipping():
    s = linear_schedule()
    x, eps, z = (torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(i)) * 3
                 for i in range(3))
    for t in (999, 500, 0):
        beta, abar = s.betas[t].item(), s.alphas_cumprod[t].item()
        mean = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
        expected = mean if t == 0 else mean + math.sqrt(beta) * z
        torch.testing.assert_close(algorithm_2_step(x, t, eps, s.betas, s.alphas_cumprod, z),
                                   expected)
    clipped = ddpm_step(s, x, 999, 998, eps, noise=z)[0]
    assert not torch.allclose(algorithm_2_step(x, 999, eps, s.betas, s.alphas_cumprod, z),
                              clipped)  # 3x the unit noise: the x_0 estimate leaves [-1, 1]


def test_sample_starts_from_a_given_x_T(device):
    s = linear_schedule(100)
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    given = sample(Shrink(100), s, (2, 1, 3, 3), "ddim", 10, x_T=x_T, device=device,
                   progress=False)
    drawn = sample(Shrink(100), s, (2, 1, 3, 3), "ddim", 10, device=device, progress=False,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(given, drawn)
    with pytest.raises(ValueError, match=r"x_T must have the shape \(2, 1, 3, 3\)"):
        sample(Shrink(100), s, (2, 1, 3, 3), x_T=torch.zeros(1, 1, 3, 3), progress=False)
    with pytest.raises(ValueError, match="x_T contains NaN"):
        sample(Shrink(100), s, (1, 1, 1, 1), x_T=torch.full((1, 1, 1, 1), math.nan),
               progress=False)
