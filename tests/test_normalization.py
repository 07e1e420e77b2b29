import pytest
import torch
import torch.nn.functional as F

from course_lib.experiments.normalization import train_at_batch_size
from course_lib.normalization import (SmallCNN, batch_norm, group_norm, instance_norm, layer_norm,
                                      norm_layer)


@pytest.fixture
def x(device):
    g = torch.Generator().manual_seed(0)
    return (3 * torch.randn(4, 6, 5, 7, generator=g) + 2).to(device)


def test_each_norm_matches_torch(x):
    torch.testing.assert_close(batch_norm(x), F.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(layer_norm(x), F.layer_norm(x, x.shape[1:]))
    torch.testing.assert_close(instance_norm(x), F.instance_norm(x))
    for groups in (1, 2, 3, 6):
        torch.testing.assert_close(group_norm(x, groups), F.group_norm(x, groups))


def test_group_norm_spans_layer_and_instance_norm(x):
    torch.testing.assert_close(group_norm(x, 1), layer_norm(x))
    torch.testing.assert_close(group_norm(x, x.shape[1]), instance_norm(x))


def test_which_axes_share_statistics(x):
    """Zero mean and unit (biased) variance exactly over the axes each norm normalises."""
    for y, dims in [(batch_norm(x), (0, 2, 3)), (layer_norm(x), (1, 2, 3)),
                    (instance_norm(x), (2, 3))]:
        torch.testing.assert_close(y.mean(dims), torch.zeros_like(y.mean(dims)), atol=1e-5,
                                   rtol=0)
        var = y.var(dims, unbiased=False)
        torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)
    groups = group_norm(x, 3).reshape(4, 3, 2, 5, 7)
    torch.testing.assert_close(groups.var((2, 3, 4), unbiased=False), torch.ones(4, 3,
                               device=x.device), atol=1e-3, rtol=0)


def test_only_batch_norm_depends_on_the_other_samples(x):
    other = torch.cat([x[:1], torch.randn_like(x[1:])])
    assert not torch.allclose(batch_norm(x)[0], batch_norm(other)[0])
    for fn in (layer_norm, instance_norm, lambda t: group_norm(t, 2)):
        torch.testing.assert_close(fn(x)[0], fn(other)[0])


def test_batch_norm_spread_is_batch_norm_with_random_batch_mates(x):
    from course_lib.normalization import batch_norm_spread

    g = torch.Generator().manual_seed(1)
    spread = batch_norm_spread(x.cpu(), 3, draws=5, index=2, generator=g)
    g = torch.Generator().manual_seed(1)
    others = torch.tensor([0, 1, 3])
    for row, order in zip(spread, torch.rand(5, 3, generator=g).argsort(dim=1)):
        mates = others[order[:2]]
        batch = x.cpu()[torch.cat([torch.tensor([2]), mates])]
        torch.testing.assert_close(row, batch_norm(batch)[0])
    # the whole batch: every draw sees the same statistics; one image: instance norm
    whole = batch_norm_spread(x.cpu(), 4, draws=3)
    torch.testing.assert_close(whole, batch_norm(x.cpu())[0].expand(3, -1, -1, -1))
    torch.testing.assert_close(batch_norm_spread(x.cpu(), 1, draws=1)[0], instance_norm(x.cpu())[0])
    with pytest.raises(ValueError, match="batch_size must be in 1..4"):
        batch_norm_spread(x.cpu(), 5)
    with pytest.raises(ValueError, match="0 <= index < 4"):
        batch_norm_spread(x.cpu(), 2, index=4)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        layer_norm(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="divides the 6 channels"):
        group_norm(torch.zeros(1, 6, 2, 2), 4)
    with pytest.raises(ValueError, match="'batch' or 'group'"):
        norm_layer("layer", 8)


def test_small_cnn_has_depth_norm_layers_per_stage():
    for norm, layer in (("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm)):
        model = SmallCNN(norm, width=8, depth=3, groups=4)
        norms = [m for m in model.modules() if isinstance(m, layer)]
        assert len(norms) == 9 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert [m.num_groups for m in SmallCNN("group", 8, 1, 4).modules()
            if isinstance(m, torch.nn.GroupNorm)] == [4, 4, 4]
    with pytest.raises(ValueError, match="depth"):
        SmallCNN("group", depth=0)


def test_small_cnn_trains_a_few_steps():
    from course_lib.experiments.normalization import BatchSizeRecipe

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    model = train_at_batch_size("group", 4, x, y, BatchSizeRecipe(images=64, epochs=0.5))
    assert isinstance(model, SmallCNN) and model(x[:1]).shape == (1, 10)
    with pytest.raises(ValueError, match="batch_size must be in 1..images=64"):
        train_at_batch_size("batch", 128, x, y, BatchSizeRecipe(images=64))


def test_mean_and_std_over_seeds():
    from course_lib.experiments.normalization import mean_and_std

    means, stds = mean_and_std([[10.0, 12.0, 14.0], [5.0]])
    assert means == [12.0, 5.0] and stds == [2.0, 0.0]  # sample std (ddof = 1); one seed: 0
    with pytest.raises(ValueError, match="at least one seed"):
        mean_and_std([[]])


def test_experiment_writes_its_table_with_the_command_that_rebuilds_it(tmp_path):
    """Also: the table does not depend on how many networks train at once (--jobs)."""
    import json
    import shlex

    from course_lib.experiments.normalization import RESULTS, BatchSizeRecipe, main, parse_args

    shipped = json.loads(RESULTS.read_text())
    assert {k: shipped[k] for k in vars(BatchSizeRecipe())} == {**vars(BatchSizeRecipe())}
    assert len(shipped["test_error"]["batch"][0]) == len(shipped["seeds"]) >= 3
    tables = []
    for jobs in ("1", "2"):
        out = tmp_path / f"table{jobs}.json"
        main(["--batch-sizes", "8", "4", "--images", "16", "--epochs", "0.5", "--seeds", "0", "1",
              "--width", "8", "--jobs", jobs, "--out", str(out)])
        tables.append(json.loads(out.read_text()))
    table = tables[0]
    assert list(table) == list(shipped) and len(table["test_error"]["group"]) == 2
    assert table["test_error"] == tables[1]["test_error"]
    config, args = parse_args(shlex.split(table["command"])[3:])
    assert config == BatchSizeRecipe(batch_sizes=[8, 4], images=16, epochs=0.5, seeds=[0, 1],
                                     width=8)
    assert args.out == str(out.with_name("table1.json"))


def test_picture_shades_exactly_the_cells_each_norm_averages(x):
    """The figure's mask agrees with the functions: perturbing the shaded cells of sample 0 /
    channel 0 moves its statistics, the unshaded cells are normalised apart."""
    from course_lib.normalization import draw_normalization_axes, shared_cells

    n, c, h, w = x.shape
    fns = {"batch": batch_norm, "layer": layer_norm, "instance": instance_norm,
           "group": lambda t: group_norm(t, 2)}
    for kind, fn in fns.items():
        mask = shared_cells(kind, n, c, h * w, groups=2).reshape(n, c, h, w)
        bumped = x + 5 * (~mask).to(x.device)  # shift everything outside the shaded set
        torch.testing.assert_close(fn(bumped)[mask.to(x.device)], fn(x)[mask.to(x.device)])
    with pytest.raises(ValueError, match="kind must be"):
        shared_cells("weight")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    draw_normalization_axes("group", fig.add_subplot(projection="3d"))
    plt.close(fig)
