"""The command line the experiments share: a flag per recipe field (from
:func:`~course_lib.experiments.config.add_arguments`), ``--out`` and ``--device``; for an
experiment with several commands, the recipe of the command given."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

from course_lib.experiments.config import add_arguments, override, overrides_from_args

C = TypeVar("C")


def add_recipe_options(parser: argparse.ArgumentParser, recipe_cls: type, out: str | Path
                       ) -> None:
    """A flag per field of ``recipe_cls``, ``--out`` (default ``out``) and ``--device``."""
    add_arguments(parser, recipe_cls)
    parser.add_argument("--out", default=str(out), help="default: %(default)s")
    parser.add_argument("--device", default=None, help="default: CUDA, then MPS, then CPU")


def parse_recipe(recipe: C, description: str, out: str | Path, argv: list[str] | None = None
                 ) -> tuple[C, argparse.Namespace]:
    """(``recipe`` with the recipe flags of ``argv`` applied, the parsed options)."""
    parser = argparse.ArgumentParser(description=description)
    add_recipe_options(parser, type(recipe), out)
    args = parser.parse_args(argv)
    return override(recipe, overrides_from_args(args, type(recipe))), args


def parse_command(parser: argparse.ArgumentParser, recipes: dict[str, type],
                  argv: list[str] | None = None) -> tuple[object, argparse.Namespace]:
    """(the recipe of the parsed ``command`` with its flags applied, the parsed options), for a
    parser whose subcommands are the keys of ``recipes``."""
    args = parser.parse_args(argv)
    cls = recipes[args.command]
    return override(cls(), overrides_from_args(args, cls)), args
