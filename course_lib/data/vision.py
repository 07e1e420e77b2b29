"""CelebA (Liu et al. 2015) and CIFAR-10 (Krizhevsky 2009), read by torchvision from local files.

Neither can be downloaded on the course machines, so nothing here downloads: the loaders find
the files, check that all of them are there (and say where to get them if not), then let
torchvision's own readers (``download=False``) verify the checksums and parse them.
``root`` is torchvision's: the folder that *contains* ``celeba/`` or ``cifar-10-batches-py/``.
:func:`find_celeba` and :func:`find_cifar10` look for it in ``$COURSE_DATA_DIR``, then in the
repository's ``data/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from course_lib.data.fashion_mnist import DatasetError
from course_lib.runtime import DATA_DIR, user_data_dir

CELEBA_FILES = ("list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
                "list_landmarks_align_celeba.txt", "list_eval_partition.txt")
CELEBA_SPLITS = ("train", "valid", "test", "all")
CELEBA_WIDTH = 178  # the aligned-and-cropped images are 178 x 218
CELEBA_HOW_TO = """How to get CelebA (about 1.4 GB):
  1. from the authors' page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html follow the
     Google Drive (or Baidu) link and download Img/img_align_celeba.zip, the four files in
     Anno/ named above and Eval/list_eval_partition.txt;
  2. put the five .txt files in {folder}/ and unzip img_align_celeba.zip there, giving
     {folder}/img_align_celeba/000001.jpg ... 202599.jpg;
  3. pass root="{root}", or put the celeba/ folder into $COURSE_DATA_DIR or {data_dir}.
With internet, `pip install gdown` and torchvision.datasets.CelebA(root, download=True) fetch
the same files (Google Drive often refuses with a quota error; retry later). Kaggle's copy has
.csv annotations and no identity file, which torchvision's reader does not accept."""
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
CIFAR10_HOW_TO = """How to get CIFAR-10 (163 MB): download the Python version,
  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
and unpack it with `tar xzf cifar-10-python.tar.gz -C {root}`, which creates {folder}/.
Or put that folder into $COURSE_DATA_DIR or {data_dir}. With internet,
torchvision.datasets.CIFAR10(root, download=True) does both steps."""


class CelebAData(NamedTuple):
    images: torch.Tensor  # [N, 3, size, size] float32 in [0, 1]
    attributes: torch.Tensor  # [N, 40] int64 in {0, 1}
    attr_names: list[str]  # the 40 attribute names, in column order


class CIFAR10Data(NamedTuple):
    images: torch.Tensor  # [N, 3, 32, 32] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64 in 0..9
    classes: list[str]


def search_dirs() -> list[Path]:
    """Where :func:`find_celeba` and :func:`find_cifar10` look, in order."""
    return [d for d in (user_data_dir(), DATA_DIR) if d is not None]


def _find(base_folder: str) -> Path | None:
    return next((d for d in search_dirs() if (d / base_folder).is_dir()), None)


def find_celeba() -> Path | None:
    """The first search folder holding ``celeba/`` (pass it as ``root``), or None."""
    return _find("celeba")


def find_cifar10() -> Path | None:
    """The first search folder holding ``cifar-10-batches-py/`` (pass it as ``root``), or None."""
    return _find("cifar-10-batches-py")


def _resolve_root(root: str | Path | None, base_folder: str, name: str, how_to: str) -> Path:
    if root is not None:
        return Path(root)
    found = _find(base_folder)
    if found is None:
        looked = ", ".join(str(d) for d in search_dirs())
        raise FileNotFoundError(
            f"{name} was not found: no {base_folder}/ folder in {looked}.\n"
            + how_to.format(folder=Path("<root>") / base_folder, root="<root>",
                            data_dir=DATA_DIR))
    return found


def _check_present(folder: Path, needed: list[str], name: str, how_to: str) -> None:
    missing = [f for f in needed if not (folder / f).exists()]
    if missing:
        hint = (f"\n(You passed the {folder.parent.name}/ folder itself: root must be its parent, "
                f"{folder.parent.parent}.)" if folder.parent.name == folder.name else "")
        raise FileNotFoundError(
            f"{name} is incomplete or absent: expected the folder {folder} with "
            f"{', '.join(needed)}; missing: {', '.join(missing)}.{hint}\n"
            + how_to.format(folder=folder, root=folder.parent, data_dir=DATA_DIR))


def load_celeba(root: str | Path | None = None, split: str = "train", size: int = 32,
                attributes: bool = True, limit: int | None = None, crop: int = CELEBA_WIDTH,
                num_workers: int = 0) -> CelebAData | torch.Tensor:
    """CelebA's aligned faces as a tensor, with the 40 binary attributes.

    Each 178 x 218 image is centre-cropped to ``crop`` x ``crop`` (178: the largest square;
    a smaller crop such as 140 keeps mostly the face) and resized to ``size`` x ``size``
    with antialiasing. ``split`` is CelebA's own partition ("train": 162,770 images, "valid":
    19,867, "test": 19,962, or "all"); ``limit`` keeps at most the first ``limit`` images of
    it. The whole training split at 32 x 32 is 2 GB of float32 and decoding its JPEGs takes
    minutes: use ``limit`` for quick runs and ``num_workers`` > 0 to decode in parallel.

    Returns ``CelebAData(images, attributes, attr_names)``, or only the images if
    ``attributes`` is False. Attributes are torchvision's {0, 1} (the files hold -1 / 1).
    """
    if split not in CELEBA_SPLITS:
        raise ValueError(f"split must be one of {CELEBA_SPLITS}, got {split!r}")
    if not 1 <= crop <= CELEBA_WIDTH or not 1 <= size:
        raise ValueError(f"need 1 <= crop <= {CELEBA_WIDTH} (the image width) and size >= 1, "
                         f"got crop={crop!r}, size={size!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None (all images) or >= 1, got {limit!r}")
    root = _resolve_root(root, "celeba", "CelebA", CELEBA_HOW_TO)
    _check_present(root / "celeba", ["img_align_celeba", *CELEBA_FILES], "CelebA",
                   CELEBA_HOW_TO)
    transform = transforms.Compose([transforms.CenterCrop(crop), transforms.Resize(size),
                                    transforms.ToTensor()])
    try:
        dataset = datasets.CelebA(str(root), split=split, target_type="attr",
                                  transform=transform, download=False)
    except RuntimeError as e:  # torchvision's md5 check of the .txt files failed
        raise DatasetError(
            f"CelebA's annotation files in {root / 'celeba'} are all present but do not have "
            f"the md5 sums torchvision expects ({e}): they are corrupt, truncated, or another "
            f"release. Download them again.\n"
            + CELEBA_HOW_TO.format(folder=root / "celeba", root=root, data_dir=DATA_DIR)) from e
    attr_names = [name for name in dataset.attr_names if name]  # the header line ends in a space
    subset = Subset(dataset, range(min(limit or len(dataset), len(dataset))))
    batches = list(DataLoader(subset, batch_size=256, num_workers=num_workers))
    images = torch.cat([x for x, _ in batches])
    if not attributes:
        return images
    return CelebAData(images, torch.cat([a for _, a in batches]), attr_names)


def load_cifar10(root: str | Path | None = None, train: bool = True) -> CIFAR10Data:
    """CIFAR-10's 50,000 training (or 10,000 test) images, their labels and class names."""
    root = _resolve_root(root, "cifar-10-batches-py", "CIFAR-10", CIFAR10_HOW_TO)
    _check_present(root / "cifar-10-batches-py", list(CIFAR10_FILES), "CIFAR-10",
                   CIFAR10_HOW_TO)
    try:
        dataset = datasets.CIFAR10(str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision's md5 check failed
        folder = root / "cifar-10-batches-py"
        raise DatasetError(
            f"CIFAR-10's files in {folder} are all present but do not have the md5 sums "
            f"torchvision expects ({e}): they are corrupt or truncated. Download them again.\n"
            + CIFAR10_HOW_TO.format(folder=folder, root=root, data_dir=DATA_DIR)) from e
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float() / 255  # NHWC -> NCHW
    return CIFAR10Data(images, torch.tensor(dataset.targets), list(dataset.classes))
