"""Checkpoints that are safe to share: atomic writes, a sha256 manifest, ``weights_only`` loads.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values::

    {"format": "course_lib/1", "arch": str, "config": dict, "step": int, "metrics": dict,
     "state": {name: state_dict, ...}}

Beside it, ``manifest.json`` records for each file its sha256, size, architecture, config, step,
metrics and whatever ``info`` the trainer adds (training time, device). Loading checks the file
against the manifest before unpickling anything, so a corrupt or tampered file is refused with a
message that says so, and ``torch.load(weights_only=True)`` never runs arbitrary code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_lib.runtime import CHECKPOINT_DIR

FORMAT = "course_lib/1"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, tampered with or made for another model."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def _manifest_lock(folder: Path):
    """Serialise the JSON updates (manifest, results tables) of concurrent processes (a no-op
    where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(folder / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: str | Path, update: Callable[[dict], None], sort_keys: bool = False
                ) -> dict:
    """Apply ``update(table)`` to the JSON object in ``path`` (``{}`` if there is none yet) and
    write it back atomically, under the folder's lock: concurrent writers of one results table
    or manifest never lose each other's rows. Returns the table written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(path.parent):
        table = json.loads(path.read_text()) if path.exists() else {}
        update(table)
        text = json.dumps(table, indent=2, sort_keys=sort_keys) + "\n"
        _atomic_write(path, lambda f: f.write(text.encode()))
    return table


def _update_manifest(path: Path, update: Callable[[dict], None]) -> None:
    """Apply ``update(manifest)`` to the manifest of ``path``'s folder (entries in name order)."""
    def update_sorted(manifest: dict) -> None:
        update(manifest)
        entries = dict(sorted(manifest.items()))
        manifest.clear()
        manifest.update(entries)

    update_json(path.parent / MANIFEST, update_sorted)


def read_manifest(folder: str | Path) -> dict[str, dict]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def save_checkpoint(path: str | Path, state: dict[str, Any], *, arch: str, config: dict,
                    step: int = 0, metrics: dict | None = None, **info: Any) -> str:
    """Save ``state`` (state_dicts, tensors, plain values) and record it in the manifest.

    Returns the file's sha256. ``info`` goes to the manifest only (e.g. ``train_seconds``,
    ``device``).
    """
    path = Path(path)
    payload = {"format": FORMAT, "arch": arch, "config": config, "step": step,
               "metrics": metrics or {}, "state": state}
    _atomic_write(path, lambda f: torch.save(payload, f))
    digest = sha256_of(path)
    entry = {"sha256": digest, "size_bytes": path.stat().st_size, "arch": arch,
             "config": config, "step": step, "metrics": metrics or {}, **info}
    _update_manifest(path, lambda manifest: manifest.__setitem__(path.name, entry))
    return digest


def record_metrics(path: str | Path, metrics: dict[str, float]) -> None:
    """Add quality figures measured after training (FID, prompt accuracy) to the checkpoint's
    manifest entry; the file itself, and so its sha256, stays as it is."""
    path = Path(path)

    def add(manifest: dict) -> None:
        if path.name not in manifest:
            raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST}")
        manifest[path.name]["metrics"] = manifest[path.name]["metrics"] | metrics

    _update_manifest(path, add)


def load_checkpoint(path: str | Path, *, arch: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify ``path`` against its folder's manifest, then load it with ``weights_only=True``.

    ``arch``, when given, must equal the architecture the checkpoint was saved for.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. Shipped checkpoints are looked "
                              f"for in {CHECKPOINT_DIR} (the course root's data/checkpoints/; "
                              f"set COURSE_ROOT to the course clone when course_lib is "
                              f"installed as a wheel); your own runs are saved under runs/ by "
                              f"the notebooks' from-scratch flag.")
    entry = read_manifest(path.parent).get(path.name)
    if entry is None:
        raise CheckpointError(f"checkpoint {path} is not listed in {path.parent / MANIFEST}, so "
                              f"its integrity cannot be checked. Save checkpoints with "
                              f"course_lib.checkpoint.save_checkpoint, which records them.")
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt or was modified: its sha256 is "
                              f"{digest}, the manifest records {entry['sha256']}. Restore it "
                              f"(git checkout -- {path}) or retrain it.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: "
                              f"{e}). It is not a course_lib checkpoint.") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a course_lib checkpoint (format "
                              f"{FORMAT!r} expected).")
    if arch is not None and payload["arch"] != arch:
        raise CheckpointError(f"checkpoint {path} holds a {payload['arch']!r} model, but a "
                              f"{arch!r} was expected. Pick the checkpoint made for this model.")
    return payload


def load_state(module: nn.Module | torch.optim.Optimizer, state_dict: dict, name: str = "model"
               ) -> None:
    """``load_state_dict`` with an error that names the missing, unexpected or mis-shaped keys."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's {name!r} does not fit this "
                              f"{type(module).__name__}: it was saved for another architecture "
                              f"or configuration.\n{e}") from e
