"""The experiments layer: typed recipes, recorded commands that rebuild their configs, the split
from the paper modules, locked results writes and a package that works installed as a wheel."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import multiprocessing
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from course_lib.checkpoint import read_manifest, update_json
from course_lib.experiments.config import (ConfigError, add_arguments, command, from_dict, override,
                                           overrides_from_args, to_dict)
from course_lib.runtime import CHECKPOINT_DIR, REPO_ROOT

PAPER_MODULES = ("gan", "autoencoder", "vae", "diffusion", "unet", "text", "imagen", "metrics",
                 "normalization", "classifier", "face_attributes", "flow_matching")


@dataclass
class Net:
    width: int = 8
    mults: list[int] = field(default_factory=lambda: [1, 2])
    low_res: int | None = None


@dataclass
class Recipe:
    model: Net = field(default_factory=Net)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    saturating: bool = False
    schedule: str = "cosine"


def test_override_merges_nested_settings_and_refuses_misspellings():
    recipe = override(Recipe(), model={"width": 64}, lr=2e-4)
    assert recipe.model == Net(width=64) and recipe.lr == 2e-4 and recipe.betas == (0.5, 0.999)
    with pytest.raises(ConfigError, match="no setting 'lrr'; did you mean 'lr'"):
        override(Recipe(), lrr=1.0)
    with pytest.raises(ConfigError, match=r"Net has no setting 'widht'; did you mean 'width'"):
        override(Recipe(), model={"widht": 64})
    with pytest.raises(ConfigError, match=r"Recipe\.model has no setting 'depth'"):
        from_dict(Recipe, {"model": {"depth": 2}})


def test_from_dict_and_to_dict_round_trip_keeping_lists_and_tuples():
    stored = {"model": {"width": 8, "mults": [1, 2], "low_res": None}, "lr": 0.001,
              "betas": (0.5, 0.999), "saturating": False, "schedule": "cosine"}
    recipe = from_dict(Recipe, stored)
    assert recipe == Recipe() and to_dict(recipe) == stored
    assert type(to_dict(recipe)["betas"]) is tuple
    assert type(to_dict(recipe)["model"]["mults"]) is list
    assert from_dict(Recipe, {"lr": 0.5}) == Recipe(lr=0.5)  # missing keys take the defaults


def parse(argv: list[str]) -> Recipe:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("what")
    parser.add_argument("--out")
    add_arguments(parser, Recipe)
    return override(Recipe(), overrides_from_args(parser.parse_args(argv), Recipe))


def test_the_command_spells_out_every_field_and_parses_back_to_the_same_config():
    recipe = override(Recipe(), model={"width": 64, "low_res": 16}, saturating=True,
                      betas=(0.0, 0.9))
    line = command("course_lib.experiments.toy", recipe, "train", out="runs/x.pt")
    assert line.startswith("python -m course_lib.experiments.toy train --model.width 64 ")
    assert "--saturating" in line and "--betas 0.0 0.9" in line and line.endswith("--out runs/x.pt")
    assert parse(shlex.split(line)[3:]) == recipe
    assert parse(["train", "--no-saturating"]) == Recipe()
    assert parse(["train", "--model.low-res", "none", "--model.mults", "1", "2", "4"]) == \
        override(Recipe(), model={"mults": [1, 2, 4]})
    with pytest.raises(SystemExit):
        parse(["train", "--model.widht", "3"])


def test_every_recorded_command_rebuilds_its_checkpoints_config():
    """The manifest's commands are built from the configs; parsing one gives the config back
    (a key added to a recipe after a checkpoint was trained takes its default there)."""
    for name, entry in read_manifest(CHECKPOINT_DIR).items():
        words = shlex.split(entry["command"])
        assert words[:2] == ["python", "-m"], name
        assert words[2].startswith("course_lib.experiments."), name
        module = importlib.import_module(words[2])
        config, _ = module.parse_args(words[3:])
        assert config == from_dict(type(config), entry["config"]), name


def test_paper_modules_never_import_the_experiments_layer():
    for name in PAPER_MODULES:
        tree = ast.parse((REPO_ROOT / "course_lib" / f"{name}.py").read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names]
        assert not [m for m in imported if m and "experiments" in m], name
        assert not any(isinstance(node, ast.Call) and getattr(node.func, "attr", "") ==
                       "add_argument" for node in ast.walk(tree)), f"{name} parses a command line"
    code = ("import sys, importlib\n"
            f"for name in {PAPER_MODULES!r}: importlib.import_module('course_lib.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('course_lib.experiments')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.strip() == "[]"


def _add_rows(path: str, prefix: str) -> None:
    for i in range(20):
        update_json(path, lambda table, key=f"{prefix}{i}": table.setdefault("rows", {})
                    .__setitem__(key, i))


def test_concurrent_results_writers_lose_no_row(tmp_path):
    path = tmp_path / "results" / "table.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_add_rows, args=(str(path), p)) for p in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert len(json.loads(path.read_text())["rows"]) == 40
    assert not list(path.parent.glob("*.tmp"))


def test_installed_as_a_wheel_the_package_finds_the_course_root(tmp_path):
    """A wheel in a site folder of its own: with COURSE_ROOT it loads the shipped checkpoints;
    without it, it says where it looked; it never writes into its package folder."""
    source, wheel_dir, site = tmp_path / "source", tmp_path / "wheel", tmp_path / "site"
    shutil.copytree(REPO_ROOT / "course_lib", source / "course_lib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(source)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = wheel_dir.glob("course_lib-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=600, capture_output=True)
    code = ("import course_lib.runtime as r, course_lib.experiments.ddpm as e\n"
            "assert 'site' in r.__file__, r.__file__\n"
            "print(r.CHECKPOINT_DIR, r.RUNS_DIR)\n"
            "model, schedule = e.load_ddpm()\n"
            "print('loaded', schedule.T)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300, env={**env, "COURSE_ROOT": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{REPO_ROOT}/data/checkpoints {REPO_ROOT}/runs" in done.stdout and "loaded 1000" in \
        done.stdout
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert f"looked for in {elsewhere}/data/checkpoints" in done.stderr
    assert "COURSE_ROOT" in done.stderr
    package = site / "course_lib"
    assert not (package.parent / "runs").exists() and not (package / "runs").exists()


def test_recipes_are_dataclasses_with_every_default_in_one_place():
    from course_lib.experiments import ddpm

    for recipe in (ddpm.DDPMRecipe, ddpm.UNetConfig, ddpm.FIDTable):
        assert dataclasses.is_dataclass(recipe)
        assert all(f.default is not dataclasses.MISSING or f.default_factory is not
                   dataclasses.MISSING for f in dataclasses.fields(recipe)), recipe
    assert Path(ddpm.__file__).parent.name == "experiments"
