import numpy as np
import pytest
import scipy.ndimage
import torch

from course_lib.disturbances import LEVELS, disturb


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(20, 1, 28, 28, generator=g) * 0.8 + 0.1  # no pixel already 0 or 1


def test_level_zero_is_the_identity(images):
    other = torch.zeros(5, 1, 28, 28)
    for kind in LEVELS:
        torch.testing.assert_close(disturb(images, kind, 0, other=other), images, atol=1e-6,
                                   rtol=0)


def test_gaussian_noise_is_the_papers_mix(images):
    out = disturb(images, "gaussian_noise", 0.5, seed=1)
    noise = (out - 0.5 * images) / 0.5  # recovers N, rescaled to [0, 1] per image
    assert noise.amin(dim=(1, 2, 3)).abs().max() < 1e-5
    assert (noise.amax(dim=(1, 2, 3)) - 1).abs().max() < 1e-5


def test_blur_is_a_gaussian_filter_of_that_std(images):
    out = disturb(images, "gaussian_blur", 2)
    expected = scipy.ndimage.gaussian_filter(images[0, 0].double().numpy(), sigma=2,
                                             mode="nearest")
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)


def test_rectangles_have_the_side_alpha_times_the_image(images):
    out = disturb(images, "black_rectangles", 0.25, seed=3)
    black = (out == 0)[:, 0]
    assert (black.sum(dim=(1, 2)) >= 7 * 7).all()  # at least one full 7x7 rectangle
    assert (black.sum(dim=(1, 2)) <= 5 * 7 * 7).all()
    rows = black.any(dim=2).sum(dim=1)
    assert (rows >= 7).all()


def test_salt_and_pepper_sets_that_fraction_to_0_or_1(images):
    out = disturb(torch.full((50, 1, 28, 28), 0.5), "salt_and_pepper", 0.2, seed=0)
    changed = (out != 0.5).float().mean().item()
    assert changed == pytest.approx(0.2, abs=0.01)
    assert set(out[out != 0.5].unique().tolist()) <= {0.0, 1.0}


def test_contamination_replaces_that_fraction(images):
    other = torch.zeros(3, 1, 28, 28)
    out = disturb(images, "contamination", 0.25, other=other)
    replaced = (out.flatten(1) == 0).all(dim=1).sum().item()
    assert replaced == 5
    with pytest.raises(ValueError, match="needs `other`"):
        disturb(images, "contamination", 0.25)
    with pytest.raises(ValueError, match="shape"):
        disturb(images, "contamination", 0.25, other=torch.zeros(3, 3, 32, 32))


def test_swirl_moves_pixels_more_with_strength(images):
    diffs = [(disturb(images, "swirl", s) - images).abs().mean().item() for s in (1, 2, 4)]
    assert diffs[0] < diffs[1] < diffs[2]


def test_same_seed_same_result_and_bad_input(images):
    a = disturb(images, "black_rectangles", 0.5, seed=7)
    assert torch.equal(a, disturb(images, "black_rectangles", 0.5, seed=7))
    assert not torch.equal(a, disturb(images, "black_rectangles", 0.5, seed=8))
    with pytest.raises(ValueError, match="kind must be one of"):
        disturb(images, "jpeg", 1)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        disturb(images * 2 - 1, "swirl", 1)
