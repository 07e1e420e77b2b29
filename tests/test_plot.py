import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib.plot import image_grid, plot_losses, scatter_2d, show_images  # noqa: E402
from course_lib.train import History  # noqa: E402


def test_image_grid_maps_the_value_range_and_tiles():
    images = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(images, nrow=3, value_range=(-1, 1), padding=1)
    assert grid.shape == (6, 16, 3)  # 1 + 4 + 1 rows; 3 tiles of 4 + 4 pads of 1
    np.testing.assert_allclose(grid[1:5, 1:5], 0.0)
    np.testing.assert_allclose(grid[1:5, 6:10], 0.5)
    np.testing.assert_allclose(grid[1:5, 11:15], 1.0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        image_grid(torch.zeros(3, 4, 4))


def test_show_images_with_labels_titles_each_tile():
    axes = show_images(torch.rand(5, 3, 8, 8), nrow=3, labels=list("abcde"))
    assert axes.shape == (2, 3) and axes[1, 1].get_title() == "e"
    with pytest.raises(ValueError, match="one label per image"):
        show_images(torch.rand(2, 1, 8, 8), labels=["a"])
    plt.close("all")


def test_scatter_and_losses():
    ax = scatter_2d(torch.randn(30, 2), torch.arange(30) % 3, class_names=["x", "y", "z"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        scatter_2d(torch.randn(5, 3))
    h = History()
    for s in range(1, 11):
        h.append(s, {"loss": 1 / s})
    ax = plot_losses(h, smooth=3)
    assert len(ax.lines[0].get_xdata()) == 8
    plt.close("all")
