import gzip
import hashlib
import shutil

import pytest
import torch

from course_lib.data import FASHION_MNIST_CLASSES, DatasetError, fashion_mnist, load_fashion_mnist


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


def test_real_dataset_sizes_labels_and_range(test_split):
    images, labels = test_split
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert images.min() == 0 and images.max() == 1
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_train_split_is_the_real_one():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60_000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [6000] * 10
    # First training image of the original release is an ankle boot (label 9).
    assert labels[:5].tolist() == [9, 0, 0, 3, 0]


def test_pinned_checksum_is_of_the_decompressed_content():
    # Facts from the issue: Debian's train-images .gz has md5 cf8536b0..., torchvision pins the
    # .gz md5 8d4fb7e6...; the decompressed content's md5 starts f4a8712d.
    path = fashion_mnist.locate()["train", "images"]
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    assert hashlib.md5(raw).hexdigest().startswith("f4a8712d")


def test_padded_and_signed_variants(test_split):
    images, _ = test_split
    padded, _ = load_fashion_mnist("test", size=32, value_range=(-1, 1))
    assert padded.shape == (10_000, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], images * 2 - 1)
    border = torch.cat([padded[..., :2, :].flatten(), padded[..., -2:, :].flatten(),
                        padded[..., :, :2].flatten(), padded[..., :, -2:].flatten()])
    assert (border == -1).all()  # padding is background, not grey


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"size": 64}, {"value_range": (0, 255)}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        load_fashion_mnist(**kwargs)


@pytest.fixture
def private_copy(tmp_path, monkeypatch):
    """The four real files in a folder of our own, searched first and alone."""
    for key, (stem, _) in fashion_mnist.FILES.items():
        shutil.copy(fashion_mnist.locate()[key], tmp_path)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", tmp_path / "nothing")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nothing")
    return tmp_path


def test_course_data_dir_is_searched_first(private_copy):
    assert fashion_mnist.locate()["test", "labels"].parent == private_copy
    assert len(load_fashion_mnist("test")[0]) == 10_000


def test_uncompressed_files_are_accepted(private_copy):
    gz = private_copy / "t10k-labels-idx1-ubyte.gz"
    (private_copy / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    assert len(load_fashion_mnist("test")[1]) == 10_000


def test_missing_file_names_it_and_the_three_fixes(private_copy):
    (private_copy / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_fashion_mnist("test")
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and str(private_copy) in message
    for fix in ("apt-get install dataset-fashion-mnist", "COURSE_DATA_DIR",
                "python -m course_lib.data"):
        assert fix in message


def test_corrupt_file_is_refused(private_copy):
    path = private_copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still a valid IDX file
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match="wrong checksum.*t10k-labels|t10k-labels.*wrong checksum"):
        load_fashion_mnist("test")


def test_truncated_gzip_is_refused(private_copy):
    path = private_copy / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_fashion_mnist("test")
