"""Flow matching against independent computations: the loss written out, the marginal velocity
of a Gaussian in closed form, and scipy's adaptive ODE solver on that vector field."""
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
