"""Flow matching against independent computations: the loss written out, the marginal velocity
of a Gaussian in closed form, and scipy's adaptive ODE solver on that vector field."""
import json

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from course_lib.flow_matching import (StepTimeModel, euler_step, flow_matching_loss, flow_sample,
                                      heun_step, interpolate, time_grid, velocity_target,
                                      x0_estimate)

MU, S = 1.5, 0.5  # data x_0 ~ N(MU, S^2) per coordinate


def gaussian_velocity(x, t):
    """E[eps - x_0 | x_t = x] for x_0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1 - t) x_0 + t eps: the
    regression of a jointly Gaussian pair, Cov(eps - x_0, x_t) / Var(x_t)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x)
    variance = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / variance * (x - (1 - t) * MU)


def test_the_path_its_velocity_and_the_x0_estimate():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], noise[3])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    # the velocity is the finite difference along the path
    dt = 1e-3
    numeric = (interpolate(x0.double(), noise.double(), 0.3 + dt)
               - interpolate(x0.double(), noise.double(), 0.3 - dt)) / (2 * dt)
    assert torch.allclose(numeric, velocity_target(x0, noise).double(), atol=1e-9)
    assert torch.allclose(x0_estimate(x_t, t, velocity_target(x0, noise)), x0, atol=1e-6)


def test_the_loss_is_the_mean_squared_velocity_error_on_the_drawn_t_and_noise():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 1, 4, 4, generator=g)

    def model(x_t, t):
        return 0.5 * x_t + t.reshape(-1, 1, 1, 1)

    loss = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    expected = ((0.5 * x_t + t[:, None, None, None] - (noise - x0)) ** 2).mean()
    assert torch.allclose(loss, expected)


def test_the_gaussian_velocity_minimises_the_loss():
    """The marginal velocity scores lower than a slightly wrong one (Lipman et al.'s Theorem 2)."""
    x0 = MU + S * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(2))
    draw = dict(generator=torch.Generator().manual_seed(3))
    best = flow_matching_loss(gaussian_velocity, x0, **draw)
    for wrong in (lambda x, t: 1.1 * gaussian_velocity(x, t),
                  lambda x, t: gaussian_velocity(x, t) + 0.1):
        assert flow_matching_loss(wrong, x0, generator=torch.Generator().manual_seed(3)) > best


def scipy_solution(x1: np.ndarray) -> np.ndarray:
    def field(t, x):
        return gaussian_velocity(torch.from_numpy(x)[None], torch.tensor([t]))[0].numpy()

    return solve_ivp(field, (1.0, 0.0), x1, rtol=1e-10, atol=1e-10).y[:, -1]


@pytest.mark.parametrize("sampler, steps, atol", [("euler", 400, 5e-3), ("heun", 40, 1e-3)])
def test_the_samplers_agree_with_an_adaptive_ode_solver(sampler, steps, atol):
    noise = torch.randn(1, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0, trajectory = flow_sample(gaussian_velocity, (1, 6), steps=steps, sampler=sampler,
                                 noise=noise, return_trajectory=True)
    assert np.allclose(x0[0].numpy(), scipy_solution(noise[0].numpy()), atol=atol)
    assert trajectory["evaluations"] == steps * (2 if sampler == "heun" else 1)
    assert trajectory["x"].shape == (steps + 1, 1, 6) and torch.equal(trajectory["x"][0], noise)


def test_heun_is_second_order_and_euler_first_order():
    noise = torch.randn(1, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = scipy_solution(noise[0].numpy())

    def error(sampler, steps):
        x0 = flow_sample(gaussian_velocity, (1, 6), steps=steps, sampler=sampler, noise=noise)
        return np.abs(x0[0].numpy() - exact).max()

    assert 1.8 < error("euler", 20) / error("euler", 40) < 2.2  # halving h halves the error
    assert 3.5 < error("heun", 20) / error("heun", 40) < 4.5  # ... and quarters Heun's


def test_the_ode_carries_noise_to_the_data_distribution():
    x0 = flow_sample(gaussian_velocity, (20_000, 1), steps=30, sampler="heun",
                     generator=torch.Generator().manual_seed(6))
    assert abs(x0.mean().item() - MU) < 0.02 and abs(x0.std().item() - S) < 0.02


def test_one_euler_step_from_pure_noise_lands_on_the_x0_estimate():
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(8))
    x_next, x0_hat, used = euler_step(gaussian_velocity, x, 1.0, 0.0)
    assert used == 1 and torch.allclose(x_next, x0_hat)
    _, _, used = heun_step(gaussian_velocity, x, 1.0, 0.5)
    assert used == 2


def test_step_time_model_rounds_t_to_the_networks_steps():
    seen = []

    class Network(torch.nn.Module):
        num_steps = 1000

        def forward(self, x, t):
            seen.append(t)
            return x

    model = StepTimeModel(Network())
    model(torch.zeros(3, 1), torch.tensor([0.0, 0.5, 1.0]))
    assert seen[0].tolist() == [0, 500, 999] and seen[0].dtype == torch.long
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        model(torch.zeros(1, 1), torch.tensor([1.5]))


def test_bad_arguments_are_refused():
    assert time_grid(2) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        flow_sample(gaussian_velocity, (1, 2), sampler="rk4")
    with pytest.raises(ValueError, match="noise must have the shape"):
        flow_sample(gaussian_velocity, (1, 2), noise=torch.zeros(2, 2))


def test_the_recipe_trains_saves_and_loads_a_velocity_model(tmp_path):
    from course_lib.experiments.config import override
    from course_lib.experiments.flow import FlowRecipe, load_flow, train_flow

    tiny = override(FlowRecipe(), steps=3, warmup=1, batch_size=8,
                    model={"base": 8, "channel_mults": [1, 2], "attention_resolutions": [14],
                           "num_steps": 50})
    trained = train_flow(tiny, tmp_path / "flow.pt", run=tmp_path / "run.pt")
    model = load_flow(tmp_path / "flow.pt")
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images = flow_sample(model, (2, 1, 28, 28), steps=3, noise=noise)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    torch.testing.assert_close(images, flow_sample(trained, (2, 1, 28, 28), steps=3, noise=noise))


def test_reflow_straightens_the_paths_of_a_toy_flow():
    """Train a velocity MLP on a two-mode 1-D mixture, reflow once: the paths of the reflowed
    model are straighter (one Euler step lands nearer its many-step ODE solution)."""
    from course_lib.flow_matching import VelocityMLP, reflow_pairs

    def train(pairs=None, steps=600, seed=0):
        torch.manual_seed(seed)
        model = VelocityMLP(dim=1, hidden=64)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            if pairs is None:
                x0 = (torch.randint(0, 2, (256, 1), generator=g) * 4 - 2.0
                      + 0.2 * torch.randn(256, 1, generator=g))
                loss = flow_matching_loss(model, x0, generator=g)
            else:
                i = torch.randint(0, len(pairs[0]), (256,), generator=g)
                loss = flow_matching_loss(model, pairs[0][i], noise=pairs[1][i], generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    def one_step_error(model):
        noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(9))
        exact = flow_sample(model, noise.shape, steps=100, sampler="heun", noise=noise)
        return (flow_sample(model, noise.shape, steps=1, noise=noise) - exact).abs().mean()

    first = train()
    pairs = reflow_pairs(first, torch.randn(4000, 1, generator=torch.Generator().manual_seed(1)))
    second = train(pairs)
    assert one_step_error(second) < 0.5 * one_step_error(first)
    with pytest.raises(ValueError, match="even number"):
        VelocityMLP(time_features=3)


def test_the_trailing_ddim_grid_starts_from_pure_noise_for_any_number_of_steps():
    from course_lib.diffusion import ddim_timesteps, ddim_trailing_timesteps

    assert ddim_trailing_timesteps(1000, 1) == [999]
    assert ddim_trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddim_trailing_timesteps(1000) == list(range(999, -1, -1))
    # the leading grid shifted up by stride - 1 where both exist
    assert ddim_trailing_timesteps(1000, 10) == [t + 99 for t in ddim_timesteps(1000, 10)]
    with pytest.raises(ValueError, match="1..50"):
        ddim_trailing_timesteps(50, 51)


TINY_UNET = {"base": 8, "channel_mults": [1, 2], "attention_resolutions": [14], "num_steps": 50}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """An untrained-in-effect flow model and DDPM (3 steps each) on a tiny U-Net, T = 50."""
    from course_lib.experiments.config import override
    from course_lib.experiments.ddpm import DDPMRecipe, train_ddpm
    from course_lib.experiments.flow import FlowRecipe, train_flow

    folder = tmp_path_factory.mktemp("checkpoints")
    train_flow(override(FlowRecipe(), steps=3, warmup=1, batch_size=8, model=TINY_UNET),
               folder / "flow.pt", run=folder / "flow_run.pt")
    train_ddpm(override(DDPMRecipe(), steps=3, warmup=1, batch_size=8, model=TINY_UNET),
               folder / "ddpm.pt", run=folder / "ddpm_run.pt")
    return folder


def test_the_nfe_table_merges_a_row_per_sampler_and_reachable_nfe(tiny_checkpoints, tmp_path):
    from course_lib.experiments.flow import NFETable, main, nfe_table

    out = tmp_path / "nfe.json"
    out.write_text('{"rows": {"earlier@20": {"fid": 1.0}}}')
    table = nfe_table(NFETable(str(tiny_checkpoints / "flow.pt"), str(tiny_checkpoints / "ddpm.pt"),
                               nfes=[1, 2, 4], samples=20, batch_size=8), out)
    rows = table["rows"]
    assert set(rows) == {"earlier@20", "flow_euler_1@20", "flow_euler_2@20", "flow_euler_4@20",
                         "flow_heun_2@20", "flow_heun_4@20", "ddpm_ddim_1@20", "ddpm_ddim_2@20",
                         "ddpm_ddim_4@20"}  # Heun takes 2 evaluations a step: no NFE 1
    assert rows["flow_heun_4@20"]["steps"] == 2 and rows["ddpm_ddim_4@20"]["steps"] == 4
    assert rows["ddpm_ddim_1@20"]["timesteps"] == "trailing" and rows["ddpm_ddim_1@20"]["eta"] == 0
    floor = table["floor_train_vs_test"]["20"]
    assert all(floor < row["fid"] for key, row in rows.items() if key != "earlier@20")
    # a row's command rebuilds it alone
    command = rows["flow_euler_2@20"]["command"].split()
    assert command[:4] == ["python", "-m", "course_lib.experiments.flow", "nfe"]
    assert command[command.index("--nfes") + 1] == "2" and "--threads" in command
    again = tmp_path / "again.json"
    main(command[3:] + ["--out", str(again)])
    assert json.loads(again.read_text())["rows"]["flow_euler_2@20"]["fid"] == \
        rows["flow_euler_2@20"]["fid"]  # same seed, same result
    with pytest.raises(ValueError, match="samplers must be among"):
        NFETable(samplers=["rk4"])
    with pytest.raises(ValueError, match="positive integers"):
        NFETable(nfes=[0])


def test_reflow_trains_on_the_base_models_pairs_and_resumes(tiny_checkpoints, tmp_path):
    from course_lib.checkpoint import load_checkpoint
    from course_lib.experiments.flow import (ReflowRecipe, load_flow, parse_args, reflow_data,
                                             train_reflow)

    from course_lib.experiments.config import override

    recipe = override(ReflowRecipe(), base=str(tiny_checkpoints / "flow.pt"), model=TINY_UNET,
                      pairs=12, pair_steps=2, pair_batch_size=5, steps=4, batch_size=4, warmup=1)
    with pytest.raises(ValueError, match="is not the network of"):
        train_reflow(override(recipe, model={"base": 16}), tmp_path / "x.pt", tmp_path / "x.pt")
    run = tmp_path / "reflow" / "train.pt"
    trained = train_reflow(recipe, tmp_path / "reflow.pt", run, device="cpu", checkpoint_every=2)
    x0, noise = reflow_data(recipe, run.parent / "pairs.pt")
    # the pairs are the base model's ODE from that noise, drawn away from the evaluation seed
    base = load_flow(tiny_checkpoints / "flow.pt")
    torch.testing.assert_close(x0[:5], flow_sample(base, (5, 1, 28, 28), 2, "heun",
                                                   noise=noise[:5]))
    assert len(x0) == 12 and not torch.equal(
        noise[:1], torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    model = load_flow(tmp_path / "reflow.pt")
    images = flow_sample(model, (2, 1, 28, 28), 2, noise=noise[:2])
    torch.testing.assert_close(images, flow_sample(trained, (2, 1, 28, 28), 2, noise=noise[:2]))
    assert not torch.equal(images, flow_sample(base, (2, 1, 28, 28), 2, noise=noise[:2]))
    assert load_checkpoint(tmp_path / "reflow.pt")["config"]["pairs"] == 12
    # the recorded command rebuilds the recipe (as for every shipped checkpoint)
    from course_lib.checkpoint import read_manifest
    from course_lib.experiments.config import from_dict

    entry = read_manifest(tmp_path)["reflow.pt"]
    config, args = parse_args(entry["command"].split()[3:])
    assert config == from_dict(ReflowRecipe, entry["config"]) == recipe and args.device == "cpu"
    # a finished run resumes to the same weights; a killed one from its last state
    again = train_reflow(recipe, tmp_path / "again.pt", run, device="cpu")
    torch.testing.assert_close(flow_sample(again, (2, 1, 28, 28), 2, noise=noise[:2]), images)
    config, args = parse_args(["reflow", "--pairs", "12", "--steps", "4", "--device", "cpu"])
    assert config.pairs == 12 and config.steps == 4 and args.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reflow_and_the_nfe_table_run_on_cuda(tiny_checkpoints, tmp_path):
    from course_lib.experiments.flow import NFETable, ReflowRecipe, nfe_table, train_reflow

    from course_lib.experiments.config import override

    recipe = override(ReflowRecipe(), base=str(tiny_checkpoints / "flow.pt"), model=TINY_UNET,
                      pairs=12, pair_steps=2, pair_batch_size=5, steps=4, batch_size=4, warmup=1)
    train_reflow(recipe, tmp_path / "reflow.pt", tmp_path / "run" / "train.pt", device="cuda")
    table = nfe_table(NFETable(str(tmp_path / "reflow.pt"), nfes=[2], samplers=["euler", "heun"],
                               samples=20, batch_size=8), tmp_path / "nfe.json", device="cuda")
    assert {row["device"] for row in table["rows"].values()} == {"cuda"}


def test_ddim_is_euler_on_the_probability_flow_ode():
    """Notebook 10's claim: with x_bar = x / sqrt(alpha_bar) and sigma = sqrt((1 - alpha_bar) /
    alpha_bar), one unclipped DDIM step (eta = 0) is x_bar + (sigma_prev - sigma) eps."""
    from course_lib.diffusion import cosine_schedule, ddim_step

    schedule = cosine_schedule(1000)
    g = torch.Generator().manual_seed(10)
    x_t, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    for t, t_prev in ((999, 749), (500, 20), (40, -1)):
        abar = schedule.alphas_cumprod[t]
        abar_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        sigma, sigma_prev = ((1 - abar) / abar).sqrt(), ((1 - abar_prev) / abar_prev).sqrt()
        euler = (x_t / abar.sqrt() + (sigma_prev - sigma) * eps) * abar_prev.sqrt()
        ddim = ddim_step(schedule, x_t, t, t_prev, eps, eta=0.0, clip=False)[0]
        torch.testing.assert_close(ddim, euler.float(), rtol=1e-4, atol=1e-4)
