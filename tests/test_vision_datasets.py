"""CelebA and CIFAR-10 loaders on tiny fake copies written in the real file formats.

Only torchvision's md5 check is patched (the fake files cannot have the real checksums); the
rest of torchvision's reading path runs as it does on the real data.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.celeba
import torchvision.datasets.cifar
from PIL import Image

from course_lib.data import vision
from course_lib.data.fashion_mnist import DatasetError
from course_lib.data.vision import find_celeba, find_cifar10, load_celeba, load_cifar10

ATTR_NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips "
              "Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin "
              "Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open "
              "Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
              "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
              "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
PARTITION = [0, 0, 1, 0, 2, 0, 1, 2]  # 4 train, 2 valid, 2 test (torchvision fails on 1)


def md5_skipped(fpath, md5=None) -> bool:
    """torchvision's check_integrity without the md5 sum: the file must still exist."""
    return os.path.isfile(fpath)


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.celeba, "check_integrity", md5_skipped)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", md5_skipped)


@pytest.fixture
def no_search_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(vision, "DATA_DIR", tmp_path / "empty_data_dir")


@pytest.fixture
def fake_celeba(tmp_path):
    """8 faces 178 x 218 and the five annotation files, laid out and formatted like CelebA's."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 9)]
    for name in names:
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        pixels[:20], pixels[-20:] = 255, 0  # bands the centre crop must cut away
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name, quality=95)
    attrs = rng.choice([-1, 1], size=(8, 40))
    rows = [f"{n} " + " ".join(f"{v:2d}" for v in row) for n, row in zip(names, attrs)]
    (folder / "list_attr_celeba.txt").write_text(
        "8\n" + " ".join(ATTR_NAMES) + " \n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, PARTITION)))
    (folder / "identity_CelebA.txt").write_text(
        "".join(f"{n} {2880 + i}\n" for i, n in enumerate(names)))
    (folder / "list_bbox_celeba.txt").write_text(
        "8\nimage_id x_1 y_1 width height\n"
        + "".join(f"{n}    95  71 226 313\n" for n in names))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        "8\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n"
        + "".join(f"{n} 69  109  106  113   77  142   73  152  108  154\n" for n in names))
    return tmp_path, names, (attrs + 1) // 2


@pytest.fixture
def fake_cifar10(tmp_path):
    """CIFAR-10's pickled batches (2 images per training batch, 3 test images)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name, n in [(f"data_batch_{k}", 2) for k in range(1, 6)] + [("test_batch", 3)]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = batch
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": 10000, "label_names": classes, "num_vis": 3072}, f,
                    protocol=2)
    return tmp_path, batches, classes


def test_celeba_images_are_centre_cropped_and_resized(fake_celeba, no_md5):
    root, names, attrs = fake_celeba
    faces = load_celeba(root, split="train", size=32)
    train = [i for i, p in enumerate(PARTITION) if p == 0]
    assert faces.images.shape == (4, 3, 32, 32) and faces.images.dtype == torch.float32
    for row, i in enumerate(train):  # PIL directly: keep rows 20..197, then shrink to 32 x 32
        image = Image.open(root / "celeba" / "img_align_celeba" / names[i]).convert("RGB")
        expected = np.asarray(image.crop((0, 20, 178, 198)).resize((32, 32), Image.BILINEAR))
        np.testing.assert_allclose(faces.images[row].permute(1, 2, 0).numpy(), expected / 255,
                                   atol=1.5 / 255)
    assert faces.attributes.dtype == torch.int64
    assert torch.equal(faces.attributes, torch.from_numpy(attrs[train]))
    assert faces.attr_names == ATTR_NAMES


def test_celeba_splits_limit_and_options(fake_celeba, no_md5):
    root, _, attrs = fake_celeba
    assert [len(load_celeba(root, split=s).images) for s in ("valid", "test", "all")] == [2, 2, 8]
    first = load_celeba(root, split="all", limit=3, size=16)
    assert first.images.shape == (3, 3, 16, 16)
    assert torch.equal(first.attributes, torch.from_numpy(attrs[:3]))
    assert len(load_celeba(root, split="test", limit=100).images) == 2
    images = load_celeba(root, split="valid", attributes=False, crop=140, size=64)
    assert isinstance(images, torch.Tensor) and images.shape == (2, 3, 64, 64)


def test_celeba_missing_files_say_what_and_where(fake_celeba, no_md5):
    root, _, _ = fake_celeba
    (root / "celeba" / "identity_CelebA.txt").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_celeba(root)
    message = str(error.value)
    assert str(root / "celeba") in message and "missing: identity_CelebA.txt" in message
    assert "mmlab.ie.cuhk.edu.hk/projects/CelebA.html" in message
    with pytest.raises(FileNotFoundError, match="root must be its parent"):
        load_celeba(root / "celeba")


def test_celeba_not_found_anywhere(no_search_dirs):
    assert find_celeba() is None
    with pytest.raises(FileNotFoundError, match="no celeba/ folder in .*empty_data_dir"):
        load_celeba()


def test_celeba_wrong_checksums_are_reported(fake_celeba):
    root, _, _ = fake_celeba
    with pytest.raises(DatasetError, match="md5"):
        load_celeba(root)


def test_celeba_bad_arguments_raise(fake_celeba, no_md5):
    root, _, _ = fake_celeba
    with pytest.raises(ValueError, match="split must be one of"):
        load_celeba(root, split="validation")
    with pytest.raises(ValueError, match="crop"):
        load_celeba(root, crop=200)
    with pytest.raises(ValueError, match="size >= 1"):
        load_celeba(root, size=0)
    with pytest.raises(ValueError, match="limit"):
        load_celeba(root, limit=0)


def test_find_celeba_searches_env_then_data_dir(fake_celeba, monkeypatch, tmp_path):
    root, _, _ = fake_celeba
    other = tmp_path / "other"
    (other / "celeba").mkdir(parents=True)
    monkeypatch.setattr(vision, "DATA_DIR", other)
    monkeypatch.setenv("COURSE_DATA_DIR", str(root))
    assert find_celeba() == root
    monkeypatch.delenv("COURSE_DATA_DIR")
    assert find_celeba() == other


def test_cifar10_images_labels_and_classes(fake_cifar10, no_md5, monkeypatch):
    root, batches, classes = fake_cifar10
    train = load_cifar10(root, train=True)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.float32
    data = np.concatenate([batches[f"data_batch_{k}"]["data"] for k in range(1, 6)])
    # each row of "data" is the red plane, then green, then blue, each 32 x 32 row-major
    np.testing.assert_array_equal((train.images * 255).round().numpy().astype(np.uint8),
                                  data.reshape(10, 3, 32, 32))
    labels = sum((batches[f"data_batch_{k}"]["labels"] for k in range(1, 6)), [])
    assert train.labels.tolist() == labels and train.labels.dtype == torch.int64
    assert train.classes == classes
    test = load_cifar10(root, train=False)
    assert test.images.shape == (3, 3, 32, 32) and test.labels.tolist() == batches["test_batch"][
        "labels"]
    monkeypatch.setenv("COURSE_DATA_DIR", str(root))
    assert find_cifar10() == root and len(load_cifar10().images) == 10


def test_cifar10_missing_and_corrupt(fake_cifar10, no_search_dirs):
    root, _, _ = fake_cifar10
    with pytest.raises(DatasetError, match="md5"):
        load_cifar10(root)
    (root / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match="missing: batches.meta") as error:
        load_cifar10(root)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no cifar-10-batches-py/ folder"):
        load_cifar10()
