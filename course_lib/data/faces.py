"""Cartoon faces with CelebA's attributes: a procedural 32x32 RGB stand-in for CelebA.

CelebA (Liu et al. 2015) cannot be downloaded on the course machines and is 1.4 GB on a
student's laptop. These faces carry 17 of its 40 binary attributes, under CelebA's names, with
correlations a real dataset has (mustaches and beards only on male faces, makeup mostly on
female ones, bangs on long hair, glasses more often with gray hair) and nuisance variation no
attribute names (skin tone, face position and size, background colour, hair shade, frame
colour). Every image is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the
same faces and labels, so generated faces can be checked attribute by attribute by a detector
trained on them (:mod:`course_lib.face_attributes`).

:func:`load_faces` returns real CelebA when :func:`~course_lib.data.find_celeba` finds it and
these faces otherwise, in the same :class:`~course_lib.data.vision.CelebAData` form, so one
notebook runs on both. :func:`write_celeba_attributes` and :func:`read_celeba_attributes` keep
labels in CelebA's ``list_attr_celeba.txt`` format (+1 / -1).

Geometry is drawn at 64x64 and averaged down to 32x32 (2x2 supersampling), in units of the
face's half-width ``a`` and half-height ``b`` around its centre (``cx``, ``cy``); rows grow
downwards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from course_lib.checks import check_count
from course_lib.data.vision import CelebAData, find_celeba, load_celeba

IMAGE_SIZE = 32
ATTRIBUTES = ("Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Eyeglasses", "Goatee",
              "Gray_Hair", "Heavy_Makeup", "Male", "Mouth_Slightly_Open", "Mustache",
              "No_Beard", "Oval_Face", "Pale_Skin", "Rosy_Cheeks", "Smiling", "Wearing_Hat")
SEEDS = {"train": 0, "test": 1}  # the cartoon faces' two splits, disjoint by seed
SOURCES = ("auto", "CelebA", "cartoon")
_CHUNK = 1000  # faces drawn at once (part of the definition: the draws follow the chunks)

HAIR = {"Black_Hair": (0.09, 0.07, 0.07), "Brown_Hair": (0.42, 0.25, 0.12),
        "Blond_Hair": (0.93, 0.80, 0.42), "Gray_Hair": (0.70, 0.70, 0.72),
        None: (0.66, 0.22, 0.08)}  # None: auburn, which has no CelebA attribute
HAIR_PROBS = {True: (0.30, 0.30, 0.08, 0.10, 0.22), False: (0.22, 0.28, 0.30, 0.03, 0.17)}
HAT_COLOURS = np.array([(0.80, 0.12, 0.15), (0.12, 0.55, 0.25), (0.15, 0.30, 0.80),
                        (0.50, 0.18, 0.65), (0.95, 0.55, 0.10), (0.05, 0.60, 0.65)])
FRAME_COLOURS = np.array([(0.05, 0.05, 0.05), (0.30, 0.15, 0.05), (0.05, 0.10, 0.35)])
PALE_SKIN = np.array([0.99, 0.92, 0.88])
SKIN_LIGHT, SKIN_DARK = np.array([0.93, 0.74, 0.60]), np.array([0.42, 0.27, 0.18])


def _sample_attributes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Boolean [n] arrays per attribute, with CelebA-like correlations."""
    u = lambda: rng.random(n)  # noqa: E731
    male = u() < 0.42
    female = ~male
    hair_kind = np.empty(n, dtype=int)
    for is_male in (True, False):
        idx = np.flatnonzero(male == is_male)
        hair_kind[idx] = rng.choice(5, size=len(idx), p=HAIR_PROBS[is_male])
    a = {name: hair_kind == i for i, name in enumerate(HAIR) if name is not None}
    beard_kind = np.where(male, rng.choice(3, size=n, p=(0.6, 0.15, 0.25)), 0)  # none/goatee/full
    a["Male"] = male
    a["Goatee"] = beard_kind == 1
    a["No_Beard"] = beard_kind == 0
    a["Mustache"] = male & ((beard_kind == 2) | (u() < np.where(beard_kind == 1, 0.5, 0.12)))
    a["Heavy_Makeup"] = u() < np.where(female, 0.6, 0.01)
    a["Rosy_Cheeks"] = u() < np.where(female, np.where(a["Heavy_Makeup"], 0.22, 0.1), 0.02)
    a["Eyeglasses"] = u() < np.where(a["Gray_Hair"], 0.35, np.where(male, 0.12, 0.07))
    a["Wearing_Hat"] = u() < 0.07
    a["Bangs"] = u() < np.where(a["Wearing_Hat"], 0.05, np.where(female, 0.28, 0.08))
    a["Smiling"] = u() < 0.48
    a["Mouth_Slightly_Open"] = u() < np.where(a["Smiling"], 0.7, 0.25)
    a["Pale_Skin"] = u() < np.where(female, 0.08, 0.03)
    a["Oval_Face"] = u() < 0.28
    return a


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Paint ``colour`` [n, 3] where ``mask`` [n, S, S] holds."""
    np.copyto(canvas, colour[:, :, None, None].astype(np.float32), where=mask[:, None])


def _render(a: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[n, 3, 32, 32] float32 images of faces with attributes ``a``."""
    n = len(a["Male"])
    s = 2 * IMAGE_SIZE  # drawn at 64x64, averaged down
    grid = np.arange(s, dtype=np.float32) + 0.5
    yy, xx = grid[None, :, None], grid[None, None, :]                # [1, S, 1] and [1, 1, S]
    col = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float32), (n, 3))     # noqa: E731
    p = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]  # noqa: E731

    # nuisance geometry and colours
    cx, cy = 32 + p(-3, 3), 33 + p(-3, 3)
    half_w = p(14, 17)
    oval = a["Oval_Face"][:, None, None]
    half_w = np.where(oval, 0.86 * half_w, half_w)
    half_h = half_w * np.where(oval, p(1.38, 1.48), p(1.12, 1.22))
    background = rng.uniform(0.15, 0.85, (n, 3))
    hair_kind = np.select([a[k] for k in HAIR if k is not None], range(4), 4)
    hair = np.array(list(HAIR.values()))[hair_kind] + rng.uniform(-0.04, 0.04, (n, 3))
    tone = rng.uniform(0, 1, (n, 1))
    skin = np.where(a["Pale_Skin"][:, None], PALE_SKIN + rng.uniform(-0.015, 0.015, (n, 3)),
                    (1 - tone) * SKIN_LIGHT + tone * SKIN_DARK)
    lips = np.where(a["Heavy_Makeup"][:, None], col((0.80, 0.04, 0.16)),
                    0.3 * skin + 0.7 * np.array([0.45, 0.08, 0.10]))
    dark = col((0.06, 0.03, 0.03))
    y_ = lambda k: cy + k * half_h  # noqa: E731  a row k half-heights below the centre
    x_ = lambda k: cx + k * half_w  # noqa: E731

    canvas = np.empty((n, 3, s, s), dtype=np.float32)
    canvas[:] = background[:, :, None, None]
    female = ~a["Male"][:, None, None]
    # 1. hair behind the face: long (female) down to the jaw, short (male) on top only
    long_hair = _ellipse(yy, xx, y_(0.15), cx, 1.3 * half_h, 1.32 * half_w) & (yy < y_(1.2))
    top_hair = _ellipse(yy, xx, y_(-0.12), cx, 1.2 * half_h, 1.14 * half_w) & (yy < y_(-0.3))
    _paint(canvas, top_hair | (female & long_hair), hair)
    # 2. the face, cheeks, beard
    face = _ellipse(yy, xx, cy, cx, half_h, half_w)
    _paint(canvas, face, skin)
    cheeks = (_ellipse(yy, xx, y_(0.25), x_(-0.55), 0.2 * half_w, 0.2 * half_w)
              | _ellipse(yy, xx, y_(0.25), x_(0.55), 0.2 * half_w, 0.2 * half_w))
    _paint(canvas, a["Rosy_Cheeks"][:, None, None] & cheeks,
           0.35 * skin + 0.65 * np.array([0.95, 0.35, 0.45]))
    full_beard = (~a["No_Beard"] & ~a["Goatee"])[:, None, None]
    beard = face & (yy > y_(0.28))
    goatee = _ellipse(yy, xx, y_(0.8), cx, 0.16 * half_h, 0.24 * half_w)
    _paint(canvas, (full_beard & beard) | (a["Goatee"][:, None, None] & goatee), 0.8 * hair)
    # 3. mustache and mouth (closed line, smile arc, open mouth, open smile)
    mouth_y = y_(0.5)
    mustache = _ellipse(yy, xx, mouth_y - 0.17 * half_h, cx, 0.08 * half_h, 0.36 * half_w)
    _paint(canvas, a["Mustache"][:, None, None] & mustache, 0.55 * hair)
    smile, open_ = a["Smiling"][:, None, None], a["Mouth_Slightly_Open"][:, None, None]
    closed = (np.abs(yy - mouth_y) < 0.06 * half_h) & (np.abs(xx - cx) < 0.36 * half_w)
    arc_r = np.sqrt((yy - (mouth_y - 0.32 * half_h)) ** 2 + (xx - cx) ** 2)
    arc = ((np.abs(arc_r - 0.5 * half_w) < 0.08 * half_h) & (yy > mouth_y - 0.2 * half_h))
    gap = _ellipse(yy, xx, mouth_y, cx, 0.11 * half_h, 0.22 * half_w)
    grin = (_ellipse(yy, xx, mouth_y - 0.06 * half_h, cx, 0.24 * half_h, 0.38 * half_w)
            & (yy > mouth_y - 0.06 * half_h))
    _paint(canvas, np.where(smile, np.where(open_, grin, arc), np.where(open_, gap, closed)),
           lips)
    _paint(canvas, open_ & np.where(smile, _ellipse(yy, xx, mouth_y + 0.06 * half_h, cx,
                                                    0.12 * half_h, 0.28 * half_w),
                                    _ellipse(yy, xx, mouth_y, cx, 0.07 * half_h,
                                             0.16 * half_w)), dark)
    # 4. eyes, eye shadow, eyebrows, glasses
    eye_y = y_(-0.12)
    left = lambda ry, rx: _ellipse(yy, xx, eye_y, x_(-0.38), ry, rx)  # noqa: E731
    right = lambda ry, rx: _ellipse(yy, xx, eye_y, x_(0.38), ry, rx)  # noqa: E731
    shadow = (left(0.2 * half_w, 0.22 * half_w) | right(0.2 * half_w, 0.22 * half_w)) & (
        yy < eye_y)
    _paint(canvas, a["Heavy_Makeup"][:, None, None] & shadow, col((0.45, 0.25, 0.60)))
    _paint(canvas, left(0.13 * half_w, 0.15 * half_w) | right(0.13 * half_w, 0.15 * half_w),
           dark)
    brow_h = np.where(female, 0.05, 0.08) * half_h
    brows = ((np.abs(yy - y_(-0.33)) < brow_h)
             & ((np.abs(xx - x_(-0.38)) < 0.2 * half_w) | (np.abs(xx - x_(0.38)) < 0.2 * half_w)))
    _paint(canvas, brows, 0.75 * hair)
    lens_r = np.sqrt((yy - eye_y) ** 2 + np.minimum(np.abs(xx - x_(-0.38)),
                                                     np.abs(xx - x_(0.38))) ** 2)
    rims = (np.abs(lens_r - 0.28 * half_w) < 0.075 * half_w) | (
        (np.abs(yy - eye_y) < 0.05 * half_h) & (np.abs(xx - cx) < 0.12 * half_w))
    frames = FRAME_COLOURS[rng.integers(0, len(FRAME_COLOURS), n)]
    _paint(canvas, a["Eyeglasses"][:, None, None] & rims, frames)
    # 5. bangs over the forehead, then the hat over the top of the head
    bang_edge = y_(-0.48) + 0.06 * half_h * np.sin((xx - cx) / (0.18 * half_w))
    bangs = face & (yy < bang_edge)
    _paint(canvas, a["Bangs"][:, None, None] & bangs, hair)
    crown = _ellipse(yy, xx, y_(-0.9), cx, 0.55 * half_h, 1.05 * half_w) & (yy < y_(-0.6))
    brim = (np.abs(yy - y_(-0.62)) < 0.08 * half_h) & (np.abs(xx - cx) < 1.35 * half_w)
    hat = HAT_COLOURS[rng.integers(0, len(HAT_COLOURS), n)]
    _paint(canvas, a["Wearing_Hat"][:, None, None] & (crown | brim), hat)

    images = (canvas[..., 0::2, 0::2] + canvas[..., 0::2, 1::2] + canvas[..., 1::2, 0::2]
              + canvas[..., 1::2, 1::2]) / 4                           # 2x2 means: [n, 3, 32, 32]
    return np.clip(images, 0, 1)


def make_faces(n: int, seed: int = 0) -> CelebAData:
    """``n`` cartoon faces [n, 3, 32, 32] in [0, 1] and their attributes [n, 17] in {0, 1}
    (torchvision's CelebA convention), columns named by ``ATTRIBUTES``. ``n`` and ``seed``
    together define the faces (all attributes are drawn before any face is rendered)."""
    check_count(n, "n")
    rng = np.random.default_rng(seed)
    attributes = _sample_attributes(rng, n)
    images = np.concatenate([
        _render({k: v[i:i + _CHUNK] for k, v in attributes.items()}, rng)
        for i in range(0, n, _CHUNK)])
    labels = np.stack([attributes[name] for name in ATTRIBUTES], axis=1)
    return CelebAData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                      list(ATTRIBUTES))


def resolve_source(source: str = "auto") -> str:
    """"CelebA" or "cartoon": ``source`` itself, or for "auto" CelebA where
    :func:`~course_lib.data.find_celeba` finds it."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "auto":
        return "CelebA" if find_celeba() is not None else "cartoon"
    if source == "CelebA" and find_celeba() is None:
        raise FileNotFoundError("source='CelebA' was asked for, but find_celeba() finds no "
                                "CelebA; see course_lib.data.vision for how to get it, or use "
                                "source='cartoon'")
    return source


def load_faces(split: str = "train", n: int = 20_000, source: str = "auto") -> CelebAData:
    """Faces for notebook 04 from :func:`resolve_source`: CelebA's ``split`` (its first ``n``
    images, centre-cropped to 140 pixels, mostly the face), or ``n`` cartoon faces of that split
    (seed ``SEEDS[split]``)."""
    if split not in SEEDS:
        raise ValueError(f"split must be one of {sorted(SEEDS)}, got {split!r}")
    check_count(n, "n")
    if resolve_source(source) == "CelebA":
        return load_celeba(find_celeba(), split, size=IMAGE_SIZE, limit=n, crop=140)
    return make_faces(n, seed=SEEDS[split])


def write_celeba_attributes(path: str | Path, attributes: torch.Tensor,
                            attr_names: list[str]) -> None:
    """Write {0, 1} ``attributes`` [N, A] in CelebA's ``list_attr_celeba.txt`` format: the image
    count, the names, then one line per image ``000001.jpg`` followed by +1 / -1 values."""
    if attributes.ndim != 2 or attributes.shape[1] != len(attr_names):
        raise ValueError(f"attributes must be [N, {len(attr_names)}] (one column per name), got "
                         f"{tuple(attributes.shape)}")
    signs = (2 * attributes.long() - 1).tolist()
    lines = [str(len(signs)), " ".join(attr_names) + " "]
    lines += [f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in row)
              for i, row in enumerate(signs)]
    Path(path).write_text("\n".join(lines) + "\n")


def read_celeba_attributes(path: str | Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(image file names, attribute names, {0, 1} attributes [N, A]) from a file in
    ``list_attr_celeba.txt`` format."""
    lines = Path(path).read_text().splitlines()
    try:
        count, names = int(lines[0]), lines[1].split()
        rows = [line.split() for line in lines[2:2 + count]]
        values = torch.tensor([[int(v) for v in row[1:]] for row in rows])
    except (IndexError, ValueError) as e:
        raise ValueError(f"{path} is not in list_attr_celeba.txt format (a count, a line of "
                         f"names, then 'file.jpg +1 -1 ...' per image): {e}") from e
    if values.shape != (count, len(names)) or not set(values.unique().tolist()) <= {-1, 1}:
        raise ValueError(f"{path}: expected {count} rows of {len(names)} values in {{-1, 1}}, "
                         f"got shape {tuple(values.shape)}")
    return [row[0] for row in rows], names, (values > 0).long()
