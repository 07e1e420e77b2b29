import shlex

import pytest
import torch

from course_lib.checkpoint import read_manifest
from course_lib.classifier import (CHECKPOINT, FashionClassifier, accuracy, load_classifier,
                                   to_classifier_input)
from course_lib.data import load_fashion_mnist
from course_lib.experiments.config import ConfigError, from_dict, override, to_dict


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


def test_shipped_classifier_reaches_92_percent(test_split):
    model = load_classifier()
    measured = accuracy(model, *test_split)
    assert measured >= 0.92
    recorded = read_manifest(CHECKPOINT.parent)[CHECKPOINT.name]["metrics"]["test_accuracy"]
    assert measured == pytest.approx(recorded, abs=2e-4)  # the manifest tells the truth
    assert CHECKPOINT.stat().st_size < 2 * 2**20


def test_features_are_the_pooled_128d_activations(test_split, device):
    model = load_classifier(device=device)
    x = test_split[0][:16].to(device)
    feats = model.features(x)
    assert feats.shape == (16, 128) and (feats >= 0).all()  # after ReLU and average pooling
    torch.testing.assert_close(model.head[1](feats), model(x))
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model.features(torch.zeros(2, 1, 32, 32, device=device))


def test_to_classifier_input_undoes_padding_and_scaling(test_split):
    images = test_split[0][:8]
    padded, _ = load_fashion_mnist("test", size=32, value_range=(-1, 1))
    torch.testing.assert_close(to_classifier_input(padded[:8], value_range=(-1, 1)), images)
    with pytest.raises(ValueError, match="Fashion-MNIST-like"):
        to_classifier_input(torch.zeros(2, 3, 32, 32))


def test_training_command_runs_and_records_itself(tmp_path, capsys):
    from course_lib.experiments.classifier import main, parse_args

    out = tmp_path / "clf.pt"
    main(["--epochs", "0.005", "--out", str(out)])  # two steps of the real recipe
    entry = read_manifest(tmp_path)["clf.pt"]
    assert entry["arch"] == "fashion_classifier" and entry["step"] == 2
    words = shlex.split(entry["command"])
    assert words[:3] == ["python", "-m", "course_lib.experiments.classifier"]
    assert to_dict(parse_args(words[3:])[0]) == entry["config"]
    assert "test accuracy" in capsys.readouterr().out
    assert isinstance(load_classifier(out), FashionClassifier)


def test_recipe_is_the_shipped_config_merges_model_settings_and_refuses_unknown_ones():
    from course_lib.experiments.classifier import ClassifierModel, ClassifierRecipe, parse_args

    stored = read_manifest(CHECKPOINT.parent)[CHECKPOINT.name]["config"]
    assert to_dict(ClassifierRecipe()) == stored and list(to_dict(ClassifierRecipe())) == list(stored)
    narrow = override(ClassifierRecipe(), model={"width": 16})
    assert narrow.model == ClassifierModel(width=16, dropout=0.3) and narrow.epochs == 8
    assert parse_args(["--model.width", "16"])[0] == narrow
    with pytest.raises(ConfigError, match="no setting 'epoch'; did you mean 'epochs'"):
        override(ClassifierRecipe(), epoch=1)
    with pytest.raises(ConfigError, match="ClassifierRecipe.model has no setting 'droput'"):
        from_dict(ClassifierRecipe, {"model": {"droput": 0.1}})
    with pytest.raises(SystemExit):
        parse_args(["--model.widht", "16"])
