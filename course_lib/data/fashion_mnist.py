"""Fashion-MNIST (Xiao et al. 2017), the real 60k + 10k images, as in-memory tensors.

The four original IDX files are looked for, in this order, in ``$COURSE_DATA_DIR``, the
repository's ``data/``, Debian's ``/usr/share/datasets/fashion-mnist/`` (package
``dataset-fashion-mnist``) and finally fetched by torchvision into ``data/`` when the network
allows. Each folder may hold the files gzipped or not, flat or in torchvision's
``FashionMNIST/raw/`` layout. Checksums are pinned on the *decompressed* bytes: Debian's ``.gz``
files are compressed differently from the ones torchvision downloads, but hold the same content.
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from course_lib.runtime import DATA_DIR, user_data_dir

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# sha256 of the decompressed IDX files (md5 of train images, for comparison: f4a8712d...).
FILES = {
    ("train", "images"): ("train-images-idx3-ubyte",
                          "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train", "labels"): ("train-labels-idx1-ubyte",
                          "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("test", "images"): ("t10k-images-idx3-ubyte",
                         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte",
                         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}

HOW_TO_FIX = """To fix it, do one of:
  1. on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
     (puts the files in /usr/share/datasets/fashion-mnist/);
  2. put the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
     t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in a folder and set
     COURSE_DATA_DIR to it (or copy them into the repository's data/ folder);
  3. connect to the internet and run `python -m course_lib.data`, which lets torchvision
     download them into data/."""


class DatasetError(RuntimeError):
    """Missing or corrupt dataset files; the message names the file, the problem and the fixes."""


def search_dirs() -> list[Path]:
    """The folders searched, in order (each also in torchvision's ``FashionMNIST/raw`` layout)."""
    dirs = [d for d in (user_data_dir(), DATA_DIR, DEBIAN_DIR) if d is not None]
    return [p for d in dirs for p in (d, d / "fashion-mnist", d / "FashionMNIST" / "raw")]


def _find_file(stem: str) -> Path | None:
    for folder in search_dirs():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_verified(path: Path, sha256: str) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"Fashion-MNIST file {path} cannot be read ({e}): it is corrupt or "
                           f"truncated. Delete it and get it again.\n{HOW_TO_FIX}") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DatasetError(f"Fashion-MNIST file {path} has the wrong checksum: sha256 of its "
                           f"content is {digest}, expected {sha256}. The file is corrupt or is "
                           f"not the original Fashion-MNIST. Delete it and get it again.\n"
                           f"{HOW_TO_FIX}")
    return raw


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """IDX format: 2 zero bytes, a dtype byte (0x08 = uint8), ndim, then ndim big-endian int32."""
    if raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def download(root: Path = DATA_DIR) -> None:
    """Let torchvision fetch the four files into ``root/FashionMNIST/raw`` (needs internet)."""
    from torchvision.datasets import FashionMNIST
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError... offline
        raise DatasetError(f"Fashion-MNIST is not on this machine and torchvision could not "
                           f"download it ({type(e).__name__}: {e}).\n{HOW_TO_FIX}") from e


def locate(allow_download: bool = False) -> dict[tuple[str, str], Path]:
    """Paths of the four files; downloads them first if missing and ``allow_download``."""
    paths = {key: _find_file(stem) for key, (stem, _) in FILES.items()}
    missing = [FILES[k][0] for k, p in paths.items() if p is None]
    if missing and allow_download:
        download()
        return locate(allow_download=False)
    if missing:
        looked = "\n  ".join(str(d) for d in search_dirs())
        raise DatasetError(f"Fashion-MNIST file(s) {', '.join(missing)} (.gz or not) not found. "
                           f"Looked in:\n  {looked}\n{HOW_TO_FIX}")
    return paths


def load_fashion_mnist(split: str = "train", size: int = 28, value_range: tuple[int, int] = (0, 1),
                       device: str | torch.device = "cpu", allow_download: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as float32 images [N, 1, size, size] and int64 labels [N].

    ``size=32`` is the lecture's variant: the 28x28 image zero-padded by 2 pixels on every side
    (background stays background). ``value_range`` is ``(0, 1)`` or ``(-1, 1)`` (x * 2 - 1).
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size not in (28, 32):
        raise ValueError(f"size must be 28 (original) or 32 (the lecture's padded images), "
                         f"got {size!r}")
    if tuple(value_range) not in ((0, 1), (-1, 1)):
        raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")
    paths = locate(allow_download)
    arrays = [_parse_idx(_read_verified(paths[split, kind], FILES[split, kind][1]),
                         paths[split, kind]) for kind in ("images", "labels")]
    images = torch.from_numpy(arrays[0].copy()).unsqueeze(1).to(device)  # [N, 1, 28, 28] uint8
    labels = torch.from_numpy(arrays[1].astype(np.int64)).to(device)
    images = images.float().div_(255.0)
    if size == 32:
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    if tuple(value_range) == (-1, 1):
        images = images.mul_(2).sub_(1)
    return images, labels
