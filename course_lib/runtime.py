"""Where the course runs: device choice, seeding, the quick switch and the repository's folders.

Environment variables (all optional):
- ``COURSE_DEVICE``: force a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
- ``COURSE_QUICK=1``: shorten training cells (CI and grading); nbgrader's ``NBGRADER_EXECUTION``
  turns it on too. The cells still run every line they run in a full session, with fewer steps.
- ``COURSE_DATA_DIR``: a folder searched first for datasets.
- ``COURSE_ROOT``: the course folder (holding ``data/checkpoints/``; ``runs/`` is written there).
  Unset, it is the clone this package was installed from in editable mode, else the current
  folder: an installed wheel never writes into its package folder.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch



def course_root() -> Path:
    """``$COURSE_ROOT``; else the clone holding this package (an editable install); else the
    current folder (a wheel installed in site-packages)."""
    if os.environ.get("COURSE_ROOT"):
        return Path(os.environ["COURSE_ROOT"]).expanduser().resolve()
    clone = Path(__file__).resolve().parent.parent
    if (clone / "pyproject.toml").is_file() and (clone / "data" / "checkpoints").is_dir():
        return clone
    return Path.cwd().resolve()


REPO_ROOT = course_root()
DATA_DIR = REPO_ROOT / "data"
CHECKPOINT_DIR = DATA_DIR / "checkpoints"
RUNS_DIR = REPO_ROOT / "runs"


def user_data_dir() -> Path | None:
    """``$COURSE_DATA_DIR``, the folder searched first for datasets (None when unset); a value
    that is not a folder is an error rather than a silent fallback to the other folders."""
    value = os.environ.get("COURSE_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise NotADirectoryError(f"COURSE_DATA_DIR={value!r} is not a folder: point it at the "
                                 f"folder that holds the datasets, or unset it")
    return path


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU; ``prefer`` or ``$COURSE_DEVICE`` overrides the choice."""
    name = prefer or os.environ.get("COURSE_DEVICE")
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA GPU; "
                               "unset COURSE_DEVICE or set it to 'cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but Apple MPS is not available; "
                               "unset COURSE_DEVICE or set it to 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and every GPU); returns a CPU generator with that seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def quick_mode() -> bool:
    """True when training cells should take few steps: ``COURSE_QUICK=1`` or an nbgrader run."""
    flag = os.environ.get("COURSE_QUICK", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or "NBGRADER_EXECUTION" in os.environ


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where live plots and widget progress bars make sense)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
