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


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        layer_norm(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="divides the 6 channels"):
        group_norm(torch.zeros(1, 6, 2, 2), 4)
    with pytest.raises(ValueError, match="'batch' or 'group'"):
        norm_layer("layer", 8)


def test_small_cnn_trains_a_few_steps():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    model = train_at_batch_size("group", 4, images=64, epochs=0.5, x_train=x, y_train=y)
    assert isinstance(model, SmallCNN) and model(x[:1]).shape == (1, 10)


def test_experiment_writes_its_table_with_the_command_that_rebuilds_it(tmp_path):
    import json
    import shlex

    from course_lib.experiments.normalization import RESULTS, BatchSizeRecipe, main, parse_args

    shipped = json.loads(RESULTS.read_text())
    assert {k: shipped[k] for k in ("batch_sizes", "images", "epochs", "seed")} == {
        **vars(BatchSizeRecipe())}
    out = tmp_path / "table.json"
    main(["--batch-sizes", "8", "--images", "16", "--epochs", "0.5", "--out", str(out)])
    table = json.loads(out.read_text())
    assert list(table) == list(shipped) and len(table["test_error"]["group"]) == 1
    config, args = parse_args(shlex.split(table["command"])[3:])
    assert config == BatchSizeRecipe(batch_sizes=[8], images=16, epochs=0.5)
    assert args.out == str(out)


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
