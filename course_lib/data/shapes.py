"""Shapes with captions: a procedural 32x32 RGB dataset for text-to-image diffusion.

Each image shows one or two coloured shapes on a black background; every attribute is known,
so a generated image can be checked against its prompt ("a red circle above a blue square")
instead of being judged by eye, in the spirit of Imagen's attribute-binding and counting
prompts (Saharia et al. 2022, DrawBench). Everything is drawn from ``numpy.random.default_rng
(seed)``: the same seed gives the same images, labels and captions.

Geometry (pixel rows y grow downwards, columns x to the right): an object of half-size r
centred at (x, y) fills part of the (2r + 1) x (2r + 1) box around its centre and touches all
four sides of it. Two objects are separated by at least ``GAP`` background pixels along the axis
of their relation, and their centres are offset by at most half their distance along the other
axis, so "above" can never be read as "left of".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
PALETTE = np.array([(215, 35, 35), (250, 130, 20), (235, 230, 50),
                    (30, 180, 60), (40, 90, 235), (150, 55, 205)], dtype=np.uint8)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
RADII = np.array([4, 7])  # half-size r per size: boxes of 9 x 9 and 15 x 15 pixels
RELATIONS = ("above", "below", "left of", "right of")
GAP = 2
TEMPLATES = ("plain", "short", "synonyms", "there is", "inverse", "count")

INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SIZE_SYNONYMS = {"small": "tiny", "large": "big"}
SHAPE_SYNONYMS = {"circle": "disc", "square": "box", "triangle": "triangle", "cross": "plus sign"}
RELATION_SYNONYMS = {"above": "over", "below": "under", "left of": "to the left of",
                     "right of": "to the right of"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


@dataclass(frozen=True)
class ShapeSpec:
    """One object: palette colour, shape, size and centre pixel (x = column, y = row)."""

    colour: str
    shape: str
    size: str
    x: int
    y: int

    def __post_init__(self) -> None:
        for field, allowed in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        r = int(RADII[SIZES.index(self.size)])
        for axis in ("x", "y"):
            value = getattr(self, axis)
            if not isinstance(value, (int, np.integer)) or not r <= value <= IMAGE_SIZE - 1 - r:
                raise ValueError(f"a {self.size} object (half-size {r}) needs an integer centre "
                                 f"{axis} in [{r}, {IMAGE_SIZE - 1 - r}] to fit in the image, "
                                 f"got {value!r}")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(objects: Sequence[ShapeSpec], relation: str | None = None) -> dict[str, str]:
    """Every caption that fits ``objects``, keyed by template name (see ``TEMPLATES``).

    Two objects read "objects[0] <relation> objects[1]"; "count" exists only when both have
    the same colour and shape ("two red circles").
    """
    if len(objects) == 1 and relation is None:
        (o,) = objects
        return {"plain": _a(f"{o.size} {o.colour} {o.shape}"),
                "short": _a(f"{o.colour} {o.shape}"),
                "synonyms": _a(f"{SIZE_SYNONYMS[o.size]} {o.colour} {SHAPE_SYNONYMS[o.shape]}"),
                "there is": f"there is one {o.size} {o.colour} {o.shape}"}
    if len(objects) != 2 or relation not in RELATIONS:
        raise ValueError(f"describe takes one object without a relation or two objects with a "
                         f"relation in {RELATIONS}; got {len(objects)} object(s) and "
                         f"relation {relation!r}")
    a, b = objects
    captions = {
        "plain": f"{_a(f'{a.size} {a.colour} {a.shape}')} {relation} "
                 f"{_a(f'{b.size} {b.colour} {b.shape}')}",
        "short": f"{_a(f'{a.colour} {a.shape}')} {relation} {_a(f'{b.colour} {b.shape}')}",
        "synonyms": f"{_a(f'{SIZE_SYNONYMS[a.size]} {a.colour} {SHAPE_SYNONYMS[a.shape]}')} "
                    f"{RELATION_SYNONYMS[relation]} "
                    f"{_a(f'{SIZE_SYNONYMS[b.size]} {b.colour} {SHAPE_SYNONYMS[b.shape]}')}",
        "there is": f"two shapes: {_a(f'{a.size} {a.colour} {a.shape}')} and "
                    f"{_a(f'{b.size} {b.colour} {b.shape}')}",
        "inverse": f"{_a(f'{b.colour} {b.shape}')} {INVERSE[relation]} "
                   f"{_a(f'{a.colour} {a.shape}')}",
    }
    if (a.colour, a.shape) == (b.colour, b.shape):
        size = f"{a.size} " if a.size == b.size else ""
        captions["count"] = f"two {size}{a.colour} {PLURALS[a.shape]}"
    return captions


def _paint(images: np.ndarray, colour: np.ndarray, shape: np.ndarray, size: np.ndarray,
           x: np.ndarray, y: np.ndarray) -> None:
    """Draw one object per image into uint8 ``images`` [n, H, W, 3]; colour -1 draws nothing."""
    n = len(images)
    grid = np.arange(IMAGE_SIZE)
    dx = np.abs(grid[None, None, :] - x[:, None, None])  # [n, 1, W]
    dy = grid[None, :, None] - y[:, None, None]  # [n, H, 1], positive below the centre
    r = RADII[size][:, None, None]
    t = r // 3  # half-thickness of the cross's bars
    masks = np.stack([
        dx ** 2 + dy ** 2 <= r ** 2 + r,  # circle of radius r + 1/2
        (dx <= r) & (np.abs(dy) <= r),  # square
        (2 * dx <= dy + r) & (dy <= r),  # triangle: apex (x, y - r), base row y + r
        ((dx <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (dx <= r)),  # cross
    ])  # [4, n, H, W]
    mask = masks[shape, np.arange(n)] & (colour >= 0)[:, None, None]  # [n, H, W]
    images[mask] = PALETTE[np.broadcast_to(colour[:, None, None], mask.shape)[mask]]


def render(objects: Sequence[ShapeSpec]) -> torch.Tensor:
    """The image [3, 32, 32] (float32 in [0, 1]) of one or two objects; later ones on top."""
    if not 1 <= len(objects) <= 2 or not all(isinstance(o, ShapeSpec) for o in objects):
        raise ValueError(f"render takes a list of 1 or 2 ShapeSpec, got {objects!r}")
    image = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for o in objects:
        _paint(image, np.array([COLOURS.index(o.colour)]), np.array([SHAPES.index(o.shape)]),
               np.array([SIZES.index(o.size)]), np.array([o.x]), np.array([o.y]))
    return torch.from_numpy(image[0]).permute(2, 0, 1).float() / 255


def _place_pairs(rng: np.random.Generator, r: np.ndarray, relation: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Centres x, y [n, 2] of two objects with half-sizes r [n, 2] standing in ``relation``."""
    first_is_0 = (relation == 0) | (relation == 2)  # "above"/"left of": object 0 comes first
    r_first = np.where(first_is_0, r[:, 0], r[:, 1])
    r_second = np.where(first_is_0, r[:, 1], r[:, 0])
    last = IMAGE_SIZE - 1
    # along the relation's axis: distance d leaves >= GAP background pixels between the boxes
    d = rng.integers(r_first + r_second + 1 + GAP, last - r_first - r_second + 1)
    along_first = rng.integers(r_first, last - r_second - d + 1)
    along = np.stack([along_first, along_first + d], axis=1)  # [n, 2], (first, second)
    # across it: the second centre lies within d // 2 of the first
    across_first = rng.integers(r_first, last - r_first + 1)
    across_second = rng.integers(np.maximum(r_second, across_first - d // 2),
                                 np.minimum(last - r_second, across_first + d // 2) + 1)
    across = np.stack([across_first, across_second], axis=1)
    along = np.where(first_is_0[:, None], along, along[:, ::-1])  # [n, 2], (object 0, object 1)
    across = np.where(first_is_0[:, None], across, across[:, ::-1])
    vertical = (relation <= 1)[:, None]
    return np.where(vertical, across, along), np.where(vertical, along, across)


@dataclass
class ShapesDataset:
    """Images [n, 3, 32, 32] (float32 in [0, 1]) and integer labels (see :func:`make_shapes`)."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.images)

    def _check_index(self, i: int) -> None:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for a dataset of {len(self)} images")

    def objects(self, i: int) -> list[ShapeSpec]:
        self._check_index(i)
        count = int(self.labels["n_objects"][i])
        return [ShapeSpec(COLOURS[int(self.labels["colour"][i, j])],
                          SHAPES[int(self.labels["shape"][i, j])],
                          SIZES[int(self.labels["size"][i, j])],
                          int(self.labels["x"][i, j]), int(self.labels["y"][i, j]))
                for j in range(count)]

    def relation(self, i: int) -> str | None:
        self._check_index(i)
        index = int(self.labels["relation"][i])
        return RELATIONS[index] if index >= 0 else None

    def captions(self, i: int) -> list[str]:
        """All captions of image i (3 to 6 paraphrases, see ``TEMPLATES``)."""
        return list(describe(self.objects(i), self.relation(i)).values())

    def caption(self, i: int, template: str) -> str:
        options = describe(self.objects(i), self.relation(i))
        if template not in options:
            raise ValueError(f"template {template!r} does not apply to image {i}; it has "
                             f"{tuple(options)} (all templates: {TEMPLATES})")
        return options[template]


def make_shapes(n: int, seed: int, two_object_prob: float = 0.5,
                twin_prob: float = 0.25) -> ShapesDataset:
    """``n`` random images of one or two shapes with their labels, deterministic from ``seed``.

    Colour, shape, size and relation are uniform; an image has two objects with probability
    ``two_object_prob``, and the second copies the first's colour and shape with probability
    ``twin_prob`` (so that counting captions like "two red circles" are common).

    ``labels`` holds int64 tensors: ``n_objects`` [n] (1 or 2); ``colour``, ``shape``, ``size``
    (indices into COLOURS, SHAPES, SIZES), ``x``, ``y`` (centre column and row) [n, 2], with -1
    in column 1 when there is one object; ``relation`` [n] (index into RELATIONS of "object 0
    <relation> object 1"), -1 when there is one object.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of images) must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, p in (("two_object_prob", two_object_prob), ("twin_prob", twin_prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability and must be in [0, 1], got {p!r}")
    rng = np.random.default_rng(seed)
    two = rng.random(n) < two_object_prob
    colour = rng.integers(0, len(COLOURS), (n, 2))
    shape = rng.integers(0, len(SHAPES), (n, 2))
    size = rng.integers(0, len(SIZES), (n, 2))
    twin = rng.random(n) < twin_prob
    colour[twin, 1], shape[twin, 1] = colour[twin, 0], shape[twin, 0]
    relation = rng.integers(0, len(RELATIONS), n)
    r = RADII[size]
    x, y = _place_pairs(rng, r, relation)
    x[~two, 0] = rng.integers(r[~two, 0], IMAGE_SIZE - r[~two, 0])
    y[~two, 0] = rng.integers(r[~two, 0], IMAGE_SIZE - r[~two, 0])
    for array in (colour, shape, size, x, y):
        array[~two, 1] = -1
    relation[~two] = -1

    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for j in (0, 1):
        _paint(images, colour[:, j], shape[:, j], size[:, j], x[:, j], y[:, j])
    labels = {"n_objects": 1 + two, "colour": colour, "shape": shape, "size": size,
              "x": x, "y": y, "relation": relation}
    return ShapesDataset(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
                         {k: torch.from_numpy(v.astype(np.int64)) for k, v in labels.items()})


def pixel_colours(images: torch.Tensor) -> torch.Tensor:
    """Index into COLOURS of the nearest palette colour of every pixel, -1 where black is nearest.

    ``images`` [n, 3, H, W] in [0, 1]; returns int64 [n, H, W]. Nearest means Euclidean distance
    in RGB, so noisy or generated images are mapped onto the palette too.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor [n, 3, H, W], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        raise ValueError(f"images must hold values in [0, 1], got [{low:.3f}, {high:.3f}]; "
                         f"map [-1, 1] outputs with (x + 1) / 2 and clamp(0, 1)")
    palette = torch.cat([torch.zeros(1, 3), torch.from_numpy(PALETTE).float() / 255])  # [7, 3]
    pixels = images.permute(0, 2, 3, 1).float()  # [n, H, W, 3]
    distances = ((pixels[..., None, :] - palette.to(images.device)) ** 2).sum(-1)  # [n, H, W, 7]
    return distances.argmin(-1) - 1


def dominant_colours(images: torch.Tensor, k: int = 2, min_pixels: int = 10) -> torch.Tensor:
    """The ``k`` palette colours covering most pixels of each image, most frequent first.

    Returns int64 [n, k] indices into COLOURS, -1 where fewer than ``k`` colours cover
    ``min_pixels`` pixels (a small shape covers 41 to 81 pixels; the threshold ignores stray
    pixels of generated images).
    """
    if not 1 <= k <= len(COLOURS) or min_pixels < 1:
        raise ValueError(f"need 1 <= k <= {len(COLOURS)} and min_pixels >= 1, got k={k}, "
                         f"min_pixels={min_pixels}")
    labels = pixel_colours(images).flatten(1) + 1  # [n, H * W], 0 = background
    counts = torch.nn.functional.one_hot(labels, len(COLOURS) + 1).sum(1)[:, 1:]  # [n, C]
    top = counts.topk(k, dim=1)
    return torch.where(top.values >= min_pixels, top.indices, -1)


def _object_mask(shape: str, size: str, x: int, y: int) -> np.ndarray:
    return render([ShapeSpec(COLOURS[0], shape, size, x, y)]).sum(0).numpy() > 0  # [H, W]


def detect_objects(image: torch.Tensor, min_pixels: int = 15) -> list[ShapeSpec]:
    """Read the objects back from an image [3, 32, 32] in [0, 1], generated or not: the
    checker of text-to-image prompts (colour, shape, size, position, count).

    Every palette colour's connected regions (8-neighbourhood) of at least ``min_pixels``
    pixels are objects; the size comes from the region's bounding box (small boxes are 9
    pixels wide, large 15) and the shape is the one whose rendering at that size and box centre
    overlaps the region best (intersection over union). Objects are ordered top to bottom.
    """
    from scipy import ndimage

    colours = pixel_colours(image[None])[0].numpy()  # [H, W]
    found = []
    for c, colour in enumerate(COLOURS):
        regions, count = ndimage.label(colours == c, structure=np.ones((3, 3)))
        for k in range(1, count + 1):
            region = regions == k
            if region.sum() < min_pixels:
                continue
            rows, cols = np.nonzero(region)
            width = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            size = SIZES[int(width > (2 * RADII[0] + 1 + 2 * RADII[1] + 1) // 2)]
            r = int(RADII[SIZES.index(size)])
            x = int(np.clip(round((cols.min() + cols.max()) / 2), r, IMAGE_SIZE - 1 - r))
            y = int(np.clip(round((rows.min() + rows.max()) / 2), r, IMAGE_SIZE - 1 - r))
            iou = [(region & m).sum() / (region | m).sum()
                   for m in (_object_mask(s, size, x, y) for s in SHAPES)]
            found.append(ShapeSpec(colour, SHAPES[int(np.argmax(iou))], size, x, y))
    return sorted(found, key=lambda o: (o.y, o.x))
