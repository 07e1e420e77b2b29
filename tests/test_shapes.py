"""Shapes with captions: determinism, balance, and labels checked against the rendered pixels.

The pixel checks do not reuse the renderer: objects are found as connected components of
non-black pixels (scipy.ndimage) and their shapes are compared with scikit-image's rasterised
disk, rectangle and polygon.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from skimage import draw

from course_lib.data.shapes import (COLOURS, PALETTE, RADII, SHAPES, SIZES, TEMPLATES, ShapeSpec,
                                    describe, dominant_colours, make_shapes, pixel_colours, render)

N = 600


@pytest.fixture(scope="module")
def dataset():
    return make_shapes(N, seed=1)


def reference_masks(x: int, y: int, r: int) -> np.ndarray:
    """scikit-image rasterisations of the four shapes [4, 32, 32], in the order of SHAPES."""
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0][draw.disk((y, x), r + 0.5, shape=(32, 32))] = True
    masks[1][draw.rectangle((y - r, x - r), (y + r, x + r), shape=(32, 32))] = True
    masks[2][draw.polygon([y - r - 0.5, y + r + 0.5, y + r + 0.5],
                          [x, x - r - 0.5, x + r + 0.5], shape=(32, 32))] = True
    t = max(1, round(r / 3))
    masks[3][draw.rectangle((y - r, x - t), (y + r, x + t), shape=(32, 32))] = True
    masks[3][draw.rectangle((y - t, x - r), (y + t, x + r), shape=(32, 32))] = True
    return masks


def components(image: torch.Tensor) -> tuple[np.ndarray, int]:
    """Connected components (8-neighbourhood) of the non-black pixels of one image [3, H, W]."""
    return ndimage.label(image.sum(0).numpy() > 0, structure=np.ones((3, 3)))


def test_images_and_labels_have_the_documented_types(dataset):
    assert dataset.images.shape == (N, 3, 32, 32) and dataset.images.dtype == torch.float32
    assert 0 <= dataset.images.min() and dataset.images.max() <= 1
    assert set(dataset.labels) == {"n_objects", "colour", "shape", "size", "x", "y", "relation"}
    for key, value in dataset.labels.items():
        assert value.dtype == torch.int64 and len(value) == N, key
    one = dataset.labels["n_objects"] == 1
    for key in ("colour", "shape", "size", "x", "y"):
        assert (dataset.labels[key][one, 1] == -1).all()
        assert (dataset.labels[key][~one, 1] >= 0).all()
    assert ((dataset.labels["relation"] == -1) == one).all()


def test_same_seed_same_dataset():
    a, b, c = make_shapes(50, seed=3), make_shapes(50, seed=3), make_shapes(50, seed=4)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    assert [a.captions(i) for i in range(50)] == [b.captions(i) for i in range(50)]
    assert not torch.equal(a.images, c.images)


def test_attributes_are_balanced():
    ds = make_shapes(4000, seed=2, two_object_prob=0.5, twin_prob=0.25)
    two = ds.labels["n_objects"] == 2
    assert abs(two.float().mean().item() - 0.5) < 4 * (0.25 / 4000) ** 0.5
    present = ds.labels["colour"] >= 0
    for key, names in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
        counts = torch.bincount(ds.labels[key][:, 0], minlength=len(names)).numpy()
        assert stats.chisquare(counts).pvalue > 0.001, (key, counts)
        assert len(torch.unique(ds.labels[key][present])) == len(names)
    relations = torch.bincount(ds.labels["relation"][two], minlength=4).numpy()
    assert stats.chisquare(relations).pvalue > 0.001
    same = ((ds.labels["colour"][:, 0] == ds.labels["colour"][:, 1])
            & (ds.labels["shape"][:, 0] == ds.labels["shape"][:, 1]))[two].float()
    expected = 0.25 + 0.75 / (len(COLOURS) * len(SHAPES))
    assert abs(same.mean().item() - expected) < 4 * (expected * (1 - expected) / len(same)) ** 0.5
    assert (make_shapes(200, seed=0, two_object_prob=0.0).labels["n_objects"] == 1).all()
    assert (make_shapes(200, seed=0, two_object_prob=1.0).labels["n_objects"] == 2).all()


def test_each_object_is_where_its_labels_say_with_their_colour_and_shape(dataset):
    for i in range(200):
        image = dataset.images[i]
        label, count = components(image)
        objects = dataset.objects(i)
        assert count == len(objects), f"image {i}: objects touch or overlap"
        for o in objects:
            r = int(RADII[SIZES.index(o.size)])
            mask = label == label[o.y, o.x]
            rows, cols = np.nonzero(mask)
            assert (rows.min(), rows.max(), cols.min(), cols.max()) == (o.y - r, o.y + r,
                                                                        o.x - r, o.x + r)
            rgb = (image.permute(1, 2, 0).numpy()[mask] * 255).round().astype(np.uint8)
            assert (rgb == PALETTE[COLOURS.index(o.colour)]).all()
            refs = reference_masks(o.x, o.y, r)
            iou = (refs & mask).sum((1, 2)) / (refs | mask).sum((1, 2))
            assert SHAPES[int(iou.argmax())] == o.shape and iou.max() > 0.8, (i, o, iou)


def test_relations_are_true_of_the_pixel_centroids(dataset):
    two = torch.nonzero(dataset.labels["n_objects"] == 2).flatten().tolist()
    assert len(two) > N // 3
    for i in two:
        label, _ = components(dataset.images[i])
        a, b = dataset.objects(i)
        (ya, xa), (yb, xb) = (ndimage.center_of_mass(label == label[o.y, o.x]) for o in (a, b))
        down, right = yb - ya, xb - xa  # from object 0 to object 1; rows grow downwards
        if abs(down) > abs(right):
            seen = "above" if down > 0 else "below"
        else:
            seen = "left of" if right > 0 else "right of"
        assert seen == dataset.relation(i), (i, down, right)
        assert abs(abs(down) - abs(right)) >= 3, "the relation should not be borderline"


def test_render_reproduces_the_dataset_images(dataset):
    for i in range(50):
        assert torch.equal(render(dataset.objects(i)), dataset.images[i])


def test_describe_exact_captions():
    red = ShapeSpec("red", "circle", "small", 8, 6)
    orange = ShapeSpec("orange", "square", "large", 16, 22)
    assert describe([orange]) == {"plain": "a large orange square", "short": "an orange square",
                                  "synonyms": "a big orange box",
                                  "there is": "there is one large orange square"}
    assert describe([red, orange], "above") == {
        "plain": "a small red circle above a large orange square",
        "short": "a red circle above an orange square",
        "synonyms": "a tiny red disc over a big orange box",
        "there is": "two shapes: a small red circle and a large orange square",
        "inverse": "an orange square below a red circle",
    }
    twin = ShapeSpec("red", "circle", "large", 24, 8)
    assert describe([red, twin], "left of")["count"] == "two red circles"
    assert describe([twin, twin], "left of")["count"] == "two large red circles"


def test_captions_name_the_labelled_attributes_and_no_others(dataset):
    colour_word = re.compile("|".join(COLOURS))
    shape_words = {"circle": ("circle", "disc"), "square": ("square", "box"),
                   "triangle": ("triangle",), "cross": ("cross", "plus sign")}
    for i in range(N):
        objects, relation = dataset.objects(i), dataset.relation(i)
        captions = dataset.captions(i)
        for text in captions:
            assert set(colour_word.findall(text)) == {o.colour for o in objects}, text
            for o in objects:
                assert any(word in text for word in shape_words[o.shape]), text
        if relation is None:
            assert len(captions) == 4
            continue
        a, b = objects
        twins = (a.colour, a.shape) == (b.colour, b.shape)
        assert len(captions) == 5 + twins
        assert f" {relation} " in dataset.caption(i, "short")
        inverse = dataset.caption(i, "inverse").split(" ")
        assert inverse[1] == b.colour and inverse[-1] == a.shape
        opposite = {"above": "below", "below": "above", "left of": "right of",
                    "right of": "left of"}[relation]
        assert f" {opposite} " in " ".join(inverse)
        if twins:
            assert dataset.caption(i, "count").startswith("two ")


def test_caption_errors(dataset):
    one = int(torch.nonzero(dataset.labels["n_objects"] == 1)[0])
    with pytest.raises(ValueError, match="does not apply"):
        dataset.caption(one, "inverse")
    with pytest.raises(ValueError, match="does not apply"):
        dataset.caption(one, "poem")
    with pytest.raises(IndexError, match="out of range"):
        dataset.captions(N)
    assert set(TEMPLATES) >= {t for i in range(N) for t in describe(dataset.objects(i),
                                                                     dataset.relation(i))}


def test_pixel_colours_and_dominant_colours_recover_the_labels(dataset):
    images = dataset.images[:200]
    colours = dataset.labels["colour"][:200]
    noisy = (images + 0.08 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
             ).clamp(0, 1)
    for batch in (images, noisy):
        found = dominant_colours(batch, k=2)
        for i in range(200):
            expected = {int(c) for c in colours[i] if c >= 0}
            assert {int(c) for c in found[i] if c >= 0} == expected, i
    exact = pixel_colours(images)
    assert ((exact >= 0) == (images.sum(1) > 0)).all()


def test_pixel_colours_maps_each_palette_colour_to_itself(device):
    image = torch.from_numpy(PALETTE).float().div(255).T[None, :, None, :]  # [1, 3, 1, 6]
    assert pixel_colours(image.to(device)).flatten().tolist() == list(range(len(COLOURS)))
    assert pixel_colours(torch.zeros(1, 3, 2, 2, device=device)).eq(-1).all()
    ten_each = image.expand(1, 3, 10, 6).to(device)
    assert dominant_colours(ten_each, k=6, min_pixels=11).tolist() == [[-1] * 6]
    assert sorted(dominant_colours(ten_each, k=6, min_pixels=10)[0].tolist()) == list(range(6))


def test_bad_arguments_raise():
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            make_shapes(n, seed=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        make_shapes(10, seed="zero")
    with pytest.raises(ValueError, match=r"two_object_prob .* \[0, 1\]"):
        make_shapes(10, seed=0, two_object_prob=1.5)
    with pytest.raises(ValueError, match="colour must be one of"):
        ShapeSpec("pink", "circle", "small", 10, 10)
    with pytest.raises(ValueError, match="shape must be one of"):
        ShapeSpec("red", "star", "small", 10, 10)
    with pytest.raises(ValueError, match=r"centre x in \[7, 24\]"):
        ShapeSpec("red", "circle", "large", 3, 10)
    with pytest.raises(ValueError, match="1 or 2 ShapeSpec"):
        render([ShapeSpec("red", "circle", "small", 10, 10)] * 3)
    with pytest.raises(ValueError, match="relation in"):
        describe([ShapeSpec("red", "circle", "small", 10, 10)] * 2, "near")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixel_colours(torch.full((1, 3, 4, 4), -1.0))
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        pixel_colours(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="k <= 6"):
        dominant_colours(torch.zeros(1, 3, 4, 4), k=7)


def test_palette_colours_are_well_apart():
    rgb = np.vstack([np.zeros((1, 3)), PALETTE.astype(float)])  # black background first
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(rgb), 1)]
    assert len(COLOURS) >= 6 and len(PALETTE) == len(COLOURS)
    assert distances.min() > 90, "two palette colours (or a colour and black) are too close"
