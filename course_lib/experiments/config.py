"""Typed recipes: one dataclass per recipe, its command line, and the command that reproduces it.

A recipe is a ``@dataclass`` whose fields are the settings of one training run, with the defaults
in one place (as nanoGPT's ``GPTConfig``); a nested dataclass field (``model``) holds the network's
settings. Three operations cover every experiment:

- :func:`override` merges a (possibly nested) dict of changes into a recipe; an unknown or
  misspelled key is an error that names the known ones.
- :func:`add_arguments` / :func:`overrides_from_args` give every field a command-line flag
  (``--batch-size``, ``--model.base``), so the command line and the recipe cannot drift apart.
- :func:`command` writes the ``python -m`` line that reproduces a config, every field spelled
  out, so the command a checkpoint's manifest records rebuilds exactly its config.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import shlex
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from course_lib.runtime import course_root

C = TypeVar("C")


class ConfigError(ValueError):
    """A recipe setting that does not exist or has the wrong type."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls``, or None for a plain field."""
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _check_keys(cls: type, keys, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where} has no setting {key!r}{hint} Known settings: "
                              f"{', '.join(known)}")


def from_dict(cls: type[C], values: dict, where: str | None = None) -> C:
    """Build recipe ``cls`` from a plain dict (a checkpoint's stored config); nested dataclass
    fields from nested dicts. Missing keys take the defaults; unknown keys are an error."""
    where = where or cls.__name__
    _check_keys(cls, values, where)
    kwargs = {}
    for key, value in values.items():
        nested, origin = _nested(cls, key), typing.get_origin(_hints(cls)[key])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{where}.{key}")
        elif origin in (list, tuple) and isinstance(value, (list, tuple)):
            value = origin(value)  # JSON (the manifest) stores a tuple as a list
        kwargs[key] = value
    return cls(**kwargs)


def override(config: C, changes: dict | None = None, **more: Any) -> C:
    """A copy of ``config`` with ``changes`` applied; a dict given for a nested recipe field is
    merged into it (``override(ddpm, model={"base": 64})`` keeps the other model settings)."""
    changes = {**(changes or {}), **more}
    cls = type(config)
    _check_keys(cls, changes, cls.__name__)
    merged = {}
    for key, value in changes.items():
        nested = _nested(cls, key)
        if nested is not None and isinstance(value, dict):
            value = override(getattr(config, key), value)
        merged[key] = value
    return dataclasses.replace(config, **merged)


def to_dict(config: Any) -> dict:
    """The config as plain values (what a checkpoint stores)."""
    return dataclasses.asdict(config)


# --- the command line --------------------------------------------------------------------------

def _flags(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(flag, dotted field path, type hint) for every plain field, nested ones prefixed."""
    out = []
    for f in dataclasses.fields(cls):
        nested = _nested(cls, f.name)
        path = f"{prefix}{f.name}"
        if nested is not None:
            out += _flags(nested, f"{path}.")
        else:
            out.append(("--" + path.replace("_", "-"), path, _hints(cls)[f.name]))
    return out


def _parse_none(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _argument_kwargs(hint: Any) -> dict:
    """argparse keywords for a field of type ``hint``: int, float, str, bool, their optionals,
    and lists or tuples of int or float."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        kwargs = _argument_kwargs(inner)
        kwargs["type"] = _parse_none(kwargs["type"])
        return kwargs
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (list, tuple):
        return {"type": args[0], "nargs": "+"}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line flag for a field of type {hint!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag per field of recipe ``cls``; a flag left out keeps the recipe's value."""
    group = parser.add_argument_group(f"{cls.__name__} settings (default: the recipe's)")
    for flag, path, hint in _flags(cls):
        group.add_argument(flag, dest=f"config:{path}", default=argparse.SUPPRESS,
                           **_argument_kwargs(hint))


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict:
    """The nested dict of the recipe flags that were given on the command line."""
    changes: dict = {}
    for _, path, hint in _flags(cls):
        value = vars(args).get(f"config:{path}", argparse.SUPPRESS)
        if value is argparse.SUPPRESS:
            continue
        if typing.get_origin(hint) is tuple:
            value = tuple(value)
        *parents, leaf = path.split(".")
        target = changes
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return changes


def _format(value: Any) -> list[str]:
    if isinstance(value, bool):
        raise AssertionError("booleans are written as --flag / --no-flag")
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return ["none" if value is None else str(value)]


def relative_path(path: str | Path) -> str:
    """``path`` relative to the course root where it lies inside it (recorded commands then run
    from any clone)."""
    path = Path(path).resolve()
    root = course_root().resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def command(module: str, config: Any, *positional: str, **options: Any) -> str:
    """The ``python -m`` line that rebuilds ``config`` exactly: the positional arguments, every
    recipe field as a flag, then ``options`` (``out=...`` -> ``--out ...``; None is left out)."""
    words = ["python", "-m", module, *positional]
    for flag, path, _ in _flags(type(config)):
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, *_format(value)]
    for name, value in options.items():
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)
