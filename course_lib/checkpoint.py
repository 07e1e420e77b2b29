"""Checkpoints that are safe to share: crash-consistent saves, a sha256 manifest, ``weights_only``
loads.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values::

    {"format": "course_lib/1", "arch": str, "config": dict, "step": int, "metrics": dict,
     "state": {name: state_dict, ...}}

Beside it, ``manifest.json`` records for each file its sha256, size, architecture, config, step,
metrics and whatever ``info`` the trainer adds (training time, device). Loading checks the file
against the manifest before unpickling anything, so a corrupt or tampered file is refused with a
message that says so, and ``torch.load(weights_only=True)`` never runs arbitrary code.

Saving over a checkpoint is crash-consistent: a ``kill -9`` or a power cut at any instant leaves
a checkpoint that loads (the old one or the new one) and a manifest that vouches for it. The file
and the manifest are two files, so they cannot change together; instead a save, holding the
folder's lock (``.manifest.lock``) from start to end, goes through states that are each valid:

1. the new file is written to a temporary ``.NAME.*.tmp`` in the same folder and fsync'ed;
2. the manifest entry becomes the new one with the old entry kept under ``"replaces"``: from now
   on a reader accepts either file, and the old file is still in place;
3. the temporary file is renamed over the old one (atomic);
4. the manifest drops ``"replaces"``.

Each manifest write is itself a temporary file renamed into place. A crash after 2 leaves
``"replaces"`` behind, which the next save settles. Temporary files of a crashed save are deleted
by the next save of that checkpoint (under the lock no other save can be writing them). Saves of
one folder from several processes are serialised by the lock. A reader takes no lock (the shipped
folder may be read-only): it opens the file, hashes what it opened, then reads the manifest and
loads from the same open file, so what it verifies is what it unpickles; if the digest matches no
entry and the file was replaced meanwhile by a save, it looks again. A manifest that is not an
object of entries with a sha256 is a :class:`CheckpointError` on load and on save, before anything
is written.
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


def _digest(f) -> str:
    """sha256 of an open binary file, read from its start."""
    digest = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return _digest(f)


def _write_temporary(path: Path, write: Callable) -> Path:
    """``write(f)`` into a new temporary file beside ``path``, flushed to disk; returns its path
    (deleted again if writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` (atomic) and make the rename durable where folders can be
    fsync'ed (POSIX)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # Windows cannot open a folder
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    _replace(_write_temporary(path, write), path)


@contextlib.contextmanager
def _manifest_lock(folder: Path):
    """Serialise the writers of a folder (checkpoint saves, manifest and results-table updates)
    across processes and threads (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(folder / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: str | Path, update: Callable[[dict], None], sort_keys: bool = False,
                indent: int | None = 2) -> dict:
    """Apply ``update(table)`` to the JSON object in ``path`` (``{}`` if there is none yet) and
    write it back atomically, under the folder's lock: concurrent writers of one results table
    or manifest never lose each other's rows. ``indent=None`` writes one line (for tables of
    many numbers). Returns the table written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(path.parent):
        table = json.loads(path.read_text()) if path.exists() else {}
        update(table)
        text = json.dumps(table, indent=indent, sort_keys=sort_keys) + "\n"
        _atomic_write(path, lambda f: f.write(text.encode()))
    return table


def _malformed(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"the checkpoint manifest {path} is malformed: {why}. Restore it (git "
                           f"checkout -- {path} for the shipped one), or delete it and save the "
                           f"checkpoints of {path.parent} again.")


def _is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def read_manifest(folder: str | Path) -> dict[str, dict]:
    """The folder's manifest, ``{}`` if it has none; a :class:`CheckpointError` unless it is a
    JSON object of entries (objects) that each hold a sha256, as does a ``"replaces"`` entry
    left by an interrupted save (see the module docstring)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _malformed(path, f"it is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise _malformed(path, f"it holds a JSON {type(manifest).__name__}, not an object "
                               f"mapping file names to entries")
    for name, entry in manifest.items():
        replaced = entry.get("replaces") if isinstance(entry, dict) else None
        for what in [entry] + ([replaced] if replaced is not None else []):
            if not isinstance(what, dict) or not _is_sha256(what.get("sha256")):
                raise _malformed(path, f"its entry {name!r} has no valid \"sha256\" (64 "
                                       f"lowercase hex digits)")
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest atomically, entries in name order; the caller holds the lock."""
    text = json.dumps(dict(sorted(manifest.items())), indent=2) + "\n"
    _atomic_write(folder / MANIFEST, lambda f: f.write(text.encode()))


def _update_manifest(path: Path, update: Callable[[dict], None]) -> None:
    """Apply ``update(manifest)`` to the manifest of ``path``'s folder, under its lock."""
    with _manifest_lock(path.parent):
        manifest = read_manifest(path.parent)
        update(manifest)
        _write_manifest(path.parent, manifest)


def _accepted(entry: dict) -> list[str]:
    """The digests a manifest entry vouches for: its own, and during a save the old file's."""
    replaced = entry.get("replaces")
    return [entry["sha256"]] + ([replaced["sha256"]] if replaced else [])


def _settled(path: Path, entry: dict | None) -> dict | None:
    """The entry that describes the file now at ``path``: ``entry``, or after an interrupted save
    the entry it replaces if the rename did not happen; None where the file is missing."""
    if entry is None or not path.is_file():
        return None
    replaced = entry.get("replaces")
    if replaced and sha256_of(path) == replaced["sha256"]:
        return replaced
    return {key: value for key, value in entry.items() if key != "replaces"}


def _remove_temporaries(path: Path) -> None:
    """Delete what crashed saves of ``path`` and of its manifest left (the caller holds the lock,
    so no running writer owns them)."""
    for name in (path.name, MANIFEST):
        for tmp in path.parent.iterdir():
            if tmp.name.startswith(f".{name}.") and tmp.name.endswith(".tmp"):
                tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict[str, Any], *, arch: str, config: dict,
                    step: int = 0, metrics: dict | None = None, **info: Any) -> str:
    """Save ``state`` (state_dicts, tensors, plain values) and record it in the manifest,
    crash-consistently and under the folder's lock (the steps are in the module docstring).

    Returns the file's sha256. ``info`` goes to the manifest only (e.g. ``train_seconds``,
    ``device``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "arch": arch, "config": config, "step": step,
               "metrics": metrics or {}, "state": state}
    with _manifest_lock(path.parent):
        manifest = read_manifest(path.parent)  # a malformed manifest stops the save here
        _remove_temporaries(path)
        previous = _settled(path, manifest.get(path.name))
        tmp = _write_temporary(path, lambda f: torch.save(payload, f))
        try:
            digest = sha256_of(tmp)
            entry = {"sha256": digest, "size_bytes": tmp.stat().st_size, "arch": arch,
                     "config": config, "step": step, "metrics": metrics or {}, **info}
            manifest[path.name] = entry | ({"replaces": previous} if previous else {})
            _write_manifest(path.parent, manifest)
        except BaseException:
            tmp.unlink()
            raise
        _replace(tmp, path)
        manifest[path.name] = entry
        _write_manifest(path.parent, manifest)
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


def _open_verified(path: Path, attempts: int = 5):
    """``path`` opened for reading, its content (hashed from the open file) vouched for by the
    manifest read after opening it. A digest the manifest does not know is corruption, unless a
    save replaced the file meanwhile: then it looks again."""
    for _ in range(attempts):
        f = open(path, "rb")  # noqa: SIM115 (returned open: what is hashed is loaded)
        try:
            digest = _digest(f)
            entry = read_manifest(path.parent).get(path.name)
            if entry is None:
                raise CheckpointError(
                    f"checkpoint {path} is not listed in {path.parent / MANIFEST}, so its "
                    f"integrity cannot be checked. Save checkpoints with "
                    f"course_lib.checkpoint.save_checkpoint, which records them.")
            if digest in _accepted(entry):
                f.seek(0)
                return f
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):  # not replaced meanwhile
                raise CheckpointError(
                    f"checkpoint {path} is corrupt or was modified: its sha256 is {digest}, the "
                    f"manifest records {entry['sha256']}. Restore it (git checkout -- {path}) "
                    f"or retrain it.")
        except BaseException:
            f.close()
            raise
        f.close()
    raise CheckpointError(f"checkpoint {path} was replaced {attempts} times while being read "
                          f"(a save in progress); load it again when the saving stops.")


def load_checkpoint(path: str | Path, *, arch: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify ``path`` against its folder's manifest, then load it with ``weights_only=True``
    (the bytes verified are the bytes loaded, even while a save replaces the file).

    ``arch``, when given, must equal the architecture the checkpoint was saved for.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. Shipped checkpoints are looked "
                              f"for in {CHECKPOINT_DIR} (the course root's data/checkpoints/; "
                              f"set COURSE_ROOT to the course clone when course_lib is "
                              f"installed as a wheel); your own runs are saved under runs/ by "
                              f"the notebooks' from-scratch flag.")
    with _open_verified(path) as f:
        try:
            payload = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} cannot be loaded safely "
                                  f"({type(e).__name__}: {e}). It is not a course_lib "
                                  f"checkpoint.") from e
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
