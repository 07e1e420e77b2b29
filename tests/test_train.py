import pytest
import torch
from torch import nn

from course_lib.checkpoint import read_manifest
from course_lib.train import EMA, History, Minibatches, debiased_ema, fit


def regression_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return x, y


def make_run(device, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = regression_problem()
    batches = Minibatches(x.to(device), y.to(device), batch_size=32, seed=seed)

    def step(batch):
        xb, yb = batch
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss}

    return model, opt, batches, step


def test_fit_learns_and_records_history(device):
    model, opt, batches, step = make_run(device)
    history = fit(step, batches, 200, modules={"model": model, "opt": opt}, live_plot=False)
    assert len(history) == 200 and history.steps[0] == 1 and history.steps[-1] == 200
    assert history["loss"][-1] < 0.05 * history["loss"][0]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Weights, optimizer, data position and RNG (dropout) are all restored."""
    model, opt, batches, step = make_run("cpu")
    fit(step, batches, 60, modules={"model": model, "opt": opt}, live_plot=False)

    path = tmp_path / "run.pt"
    m1, o1, b1, s1 = make_run("cpu")
    fit(s1, b1, 25, modules={"model": m1, "opt": o1}, checkpoint=path, arch="mlp",
        live_plot=False)
    torch.manual_seed(1234)  # a fresh session: nothing carries over but the checkpoint
    m2, o2, b2, s2 = make_run("cpu", seed=0)
    history = fit(s2, b2, 60, modules={"model": m2, "opt": o2}, checkpoint=path, arch="mlp",
                  resume=True, live_plot=False)
    assert len(history) == 60
    for a, b in zip(model.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert read_manifest(tmp_path)["run.pt"]["step"] == 60


def test_checkpoint_every(tmp_path, monkeypatch):
    import course_lib.train as train_module
    saved, save = [], train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda *a, **k: saved.append(k["step"]) or save(*a, **k))
    model, opt, batches, step = make_run("cpu")
    fit(step, batches, 50, modules={"model": model}, checkpoint=tmp_path / "run.pt",
        checkpoint_every=20, live_plot=False)
    assert saved == [20, 40, 50]


def test_ema_is_the_exponential_average(device):
    model = nn.Linear(2, 1, bias=False).to(device)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    expected = w0.clone()
    for k in range(1, 4):
        with torch.no_grad():
            model.weight.fill_(float(k))
        ema.update()
        expected = 0.9 * expected + 0.1 * k
    torch.testing.assert_close(ema.model.weight, expected)
    assert not ema.model.weight.requires_grad
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_debiased_ema_is_the_weighted_mean_of_the_trained_weights():
    """theta_0 is forgotten: the result is sum_k (1 - d) d^(n-k) theta_k / (1 - d^n) over the
    trajectory theta_1..theta_n, computed here directly."""
    model = nn.Linear(3, 2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ema, decay, trajectory = EMA(model, decay=0.8), 0.8, []
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
        trajectory.append({k: v.clone() for k, v in model.state_dict().items()})
    debiased = debiased_ema(ema.state_dict(), initial, decay, 5)
    weights = [(1 - decay) * decay ** (5 - k) for k in range(1, 6)]
    for name in initial:
        expected = sum(w * theta[name] for w, theta in zip(weights, trajectory)) / sum(weights)
        torch.testing.assert_close(debiased[name], expected)
    with pytest.raises(ValueError, match="number of updates"):
        debiased_ema(ema.state_dict(), initial, decay, 0)
    with pytest.raises(ValueError, match="keys differ"):
        debiased_ema(ema.state_dict(), {"weight": initial["weight"]}, decay, 5)


def test_minibatches_cover_each_epoch_once_and_are_seeded():
    x = torch.arange(10)
    batches = Minibatches(x, batch_size=3, seed=5)
    epoch = torch.cat([next(batches)[0] for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # 3 batches of 3, the incomplete 4th dropped
    again = Minibatches(x, batch_size=3, seed=5)
    assert torch.equal(torch.cat([next(again)[0] for _ in range(3)]), epoch)
    with pytest.raises(ValueError, match="same length"):
        Minibatches(x, torch.arange(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Minibatches(x, batch_size=11)


def test_history_last_and_state():
    h = History()
    for s in range(1, 5):
        h.append(s, {"a": s})
    assert h.last(2) == {"a": 3.5}
    h2 = History()
    h2.load_state_dict(h.state_dict())
    assert h2["a"] == [1, 2, 3, 4] and h2.steps == [1, 2, 3, 4]


def test_live_plot_redraws_in_place(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import course_lib.train as train_module

    updates, update = [], train_module.LossPlot.update

    def recording_update(self, history):
        update(self, history)
        updates.append((len(history), len(self.ax.lines[0].get_xdata())))

    monkeypatch.setattr(train_module.LossPlot, "update", recording_update)
    model, opt, batches, step = make_run("cpu")
    fit(step, batches, 25, modules={"model": model}, live_plot=True, plot_every=10, log_every=5)
    assert updates == [(10, 10), (20, 20), (25, 25)]
