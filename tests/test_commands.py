"""The package's command-line entry points run and say what they did."""
import json

from course_lib.experiments import benchmark
from course_lib.data import __main__ as data_cli


def test_data_command_finds_and_verifies_fashion_mnist(capsys):
    assert data_cli.main() == 0
    out = capsys.readouterr().out
    assert "train: 60000 images, checksums OK" in out and "test: 10000 images" in out


def test_data_command_explains_missing_data(tmp_path, monkeypatch, capsys):
    from course_lib.data import fashion_mnist

    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", tmp_path)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path)
    monkeypatch.setattr(fashion_mnist, "download", lambda root=None: None)  # offline
    assert data_cli.main() == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_benchmark_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--repeats", "1", "--out", str(out), "--groups", "data"])
    results = json.loads(out.read_text())
    assert set(results["data"]) == {"fashion_mnist_train_load_s", "minibatches_per_s_at_128",
                                    "shapes_10k_generation_s"}
    assert all(v > 0 for v in results["data"].values())
    assert "fashion_mnist_train_load_s" in capsys.readouterr().out
