"""The course notebooks as nbgrader assignments: one notebook serves the lecture, the assignment
and the grading.

The numbered notebooks are nbgrader *source* notebooks. Their answer cells (nbgrader metadata
``solution``) hold the solution between ``### BEGIN SOLUTION`` and ``### END SOLUTION``; their
test cells (``grade``, locked, with points) call a :mod:`course_lib.grading` checker, visibly,
and again between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` from a freshly
reloaded :mod:`course_lib.grading`, so that a notebook that replaced the checker earns nothing.
``nbgrader generate_assignment`` strips both regions from the student version.

:func:`init_course` lays out a course directory (command line: ``python -m course_lib.assignments
init DIR``) with one assignment per notebook::

    DIR/nbgrader_config.py             # CONFIG: cell timeout, restored cells, quiet progress bars
    DIR/source/01_gan/01_gan.ipynb     # a copy of notebooks/01_gan.ipynb
    ...

and nbgrader does the rest (the README's instructor workflow): ``generate_assignment``, collect
into ``submitted/<student>/<assignment>/``, ``autograde``, ``generate_feedback``, ``export``.
For untrusted submissions, ``python -m course_lib.assignments autograde ASSIGNMENT`` in place of
``nbgrader autograde`` runs each submission's kernel in a bubblewrap sandbox
(:mod:`course_lib.sandbox`; ``--unsandboxed`` where bubblewrap cannot run).

Grading needs the graded cells, not the lecture's demos (FIDs of 10,000 samples, training
curves): :class:`GradingCellsOnly`, in the autograder's pipeline, keeps the nbgrader cells and the
code cells they depend on (:func:`cells_needed`) and blanks the rest, so a notebook grades in
seconds instead of a minute.
"""
from __future__ import annotations

import argparse
import json
import shutil
import symtable
from pathlib import Path

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

from course_lib import sandbox
from course_lib.runtime import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"

CONFIG = '''\
# nbgrader configuration of a Generative Deep Modeling course directory, written by
# `python -m course_lib.assignments init`. Run every nbgrader command from this directory.
import os

c = get_config()  # noqa: F821 (nbgrader defines it)
c.CourseDirectory.course_id = "generative-deep-modeling"

# A cell that runs longer than this is interrupted and its test scores 0; the rest of the
# notebook still runs. nbgrader's default, 30 s, is too short for the sampling demos on a 2-core
# CPU; under grading (nbgrader sets NBGRADER_EXECUTION) training cells take a few steps.
c.Execute.timeout = {timeout}

# After a cell's reply, nbclient waits iopub_timeout seconds (default 4) for the cell's last
# output and the kernel's "idle" message, and nbgrader's Execute sets raise_on_iopub_timeout, so
# on a busy machine (when 200 submissions are graded) a correct answer died with "Timeout waiting
# for IOPub output ... after 4 seconds" and scored 0. Wait as long as for the cell itself, and
# as long for a kernel to start.
c.Execute.iopub_timeout = {timeout}
c.Execute.raise_on_iopub_timeout = True  # a lost output is an error, never a silent pass
c.Execute.startup_timeout = {timeout}

# Put back graded cells a student deleted (else the submission waits for manual grading).
# Test cells a student edited are restored from the source whatever this says.
c.OverwriteCells.add_missing_cells = True

# Run only the graded cells and the cells they depend on, after restoring the test cells from
# the source; the lecture's demos are blanked. Remove GradingCellsOnly to run every cell (about
# a minute per notebook on a 2-core CPU instead of seconds).
from nbgrader.preprocessors import (CheckCellMetadata, ClearOutput, DeduplicateIds,
                                    OverwriteCells, OverwriteKernelspec)

from course_lib.assignments import GradingCellsOnly

c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec,
                                      OverwriteCells, GradingCellsOnly, CheckCellMetadata]

# The autograder's kernels inherit this environment: no progress bars in the feedback.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
'''


def _is_graded(cell: dict) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return bool(meta.get("solution") or meta.get("grade"))


def _names(source: str) -> tuple[set[str], set[str]] | None:
    """(names a code cell binds, names it reads from earlier cells), IPython magics included,
    from the cell's symbol table; None when it does not parse. A name the cell both binds and
    reads at top level counts as its own (``for t in ...: f(t)``), so ``x = x + 1`` on an
    earlier cell's ``x`` is not traced."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        table = symtable.symtable(TransformerManager().transform_cell(source), "<cell>", "exec")
    except SyntaxError:
        return None
    bound = {symbol.get_name() for symbol in table.get_symbols()
             if symbol.is_assigned() or symbol.is_imported()}
    read = {symbol.get_name() for symbol in table.get_symbols() if symbol.is_referenced()}
    scopes = list(table.get_children())
    while scopes:  # functions, lambdas, classes, comprehensions: their reads of globals
        scope = scopes.pop()
        read |= {symbol.get_name() for symbol in scope.get_symbols()
                 if symbol.is_global() and symbol.is_referenced()}
        scopes += scope.get_children()
    return bound, read - bound


def cells_needed(cells: list[dict]) -> set[int]:
    """Indices of the code cells grading must run: the nbgrader cells (answers and tests), every
    cell that does not parse (it may do anything), and, transitively, for each name such a cell
    reads, the last earlier code cell that binds it."""
    names = [_names("".join(cell["source"])) if cell["cell_type"] == "code" else None
             for cell in cells]
    keep = {i for i, cell in enumerate(cells) if cell["cell_type"] == "code"
            and (_is_graded(cell) or names[i] is None)}
    todo = sorted(keep)
    while todo:
        i = todo.pop()
        for name in names[i][1] if names[i] else ():
            j = next((j for j in range(i - 1, -1, -1) if names[j] and name in names[j][0]), None)
            if j is not None and j not in keep:
                keep.add(j)
                todo.append(j)
    return keep


class GradingCellsOnly(Preprocessor):
    """nbgrader preprocessor: blank the code cells that :func:`cells_needed` leaves out (their
    source becomes a comment that says so), so the autograder runs only what the scores depend
    on. Answers in cells of their own that the graded cells use are kept."""

    enabled = Bool(True)  # nbconvert's preprocessors are off unless enabled

    def preprocess(self, nb, resources):
        keep = cells_needed(nb.cells)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and i not in keep:
                cell.source = "# not run when grading: the graded cells do not depend on this cell"
                cell.outputs = []
        return nb, resources


def numbered_notebooks() -> list[Path]:
    """notebooks/NN_topic.ipynb, in order."""
    return sorted(path for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def graded_cells(notebook: str | Path) -> list[dict]:
    """The nbgrader cells of a notebook, in order: ``{"grade_id", "kind", "points"}`` with kind
    "answer" (a solution cell, no points) or "test" (a locked grade cell)."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    found = []
    for cell in cells:
        meta = cell.get("metadata", {}).get("nbgrader")
        if meta and (meta.get("solution") or meta.get("grade")):
            found.append({"grade_id": meta["grade_id"],
                          "kind": "test" if meta.get("grade") else "answer",
                          "points": meta.get("points", 0)})
    return found


def exercises() -> dict[str, list[tuple[str, float]]]:
    """notebook name -> [(test cell grade_id, points)] for every numbered notebook with tests."""
    table = {}
    for path in numbered_notebooks():
        tests = [(cell["grade_id"], cell["points"]) for cell in graded_cells(path)
                 if cell["kind"] == "test"]
        if tests:
            table[path.stem] = tests
    return table


def init_course(root: str | Path, notebooks: list[str] | None = None, timeout: int = 120) -> Path:
    """Write ``root/nbgrader_config.py`` and copy each graded notebook (default: all of them) to
    ``root/source/<name>/<name>.ipynb``; existing sources are replaced (after a ``git pull``),
    submissions and the gradebook are left alone. Returns ``root``."""
    available = exercises()
    names = notebooks or list(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"no graded notebook named {', '.join(unknown)}; the graded notebooks "
                         f"are {', '.join(available)}")
    root = Path(root)
    for name in names:
        folder = root / "source" / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(NOTEBOOK_DIR / f"{name}.ipynb", folder / f"{name}.ipynb")
    (root / "nbgrader_config.py").write_text(CONFIG.format(timeout=timeout))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the course notebooks as nbgrader assignments")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="lay out an nbgrader course directory")
    init.add_argument("root")
    init.add_argument("--notebooks", nargs="+", metavar="NAME",
                      help="e.g. 01_gan 04_vae (default: every graded notebook)")
    init.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    commands.add_parser("exercises", help="list the graded tests and their points")
    grade = commands.add_parser(
        "autograde", help="nbgrader autograde with each submission's kernel in a bubblewrap "
                          "sandbox; run it in the course directory",
        description="nbgrader autograde ASSIGNMENT, each kernel sandboxed (course_lib.sandbox): "
                    "read-only course tree, its own submission only, no network, no home, "
                    "memory, processes and wall time capped. Refuses where bubblewrap cannot "
                    "run, unless --unsandboxed.")
    grade.add_argument("assignment", help="e.g. 04_vae")
    grade.add_argument("--student", help="one student id or a pattern such as 'batch*' "
                                         "(default: every submission)")
    isolation = grade.add_mutually_exclusive_group()
    isolation.add_argument("--sandbox", dest="sandboxed", action="store_true", default=True,
                           help="sandbox every kernel in bubblewrap (the default)")
    isolation.add_argument("--unsandboxed", dest="sandboxed", action="store_false",
                           help="no isolation (trusted submissions only); course_lib is still "
                                "a private copy per kernel, checked for changes")
    grade.add_argument("--timeout", type=int, help="seconds per cell (default: the course's "
                                                   "c.Execute.timeout)")
    defaults = sandbox.Limits()
    grade.add_argument("--memory-gb", type=float, default=defaults.memory_gb,
                       help=f"address space per kernel (default {defaults.memory_gb:g})")
    grade.add_argument("--processes", type=int, default=defaults.processes,
                       help=f"processes and threads per kernel (default {defaults.processes})")
    grade.add_argument("--wall", type=int, default=defaults.wall,
                       help=f"seconds per submission in all (default {defaults.wall})")
    grade.add_argument("--force", action="store_true", help="regrade submissions already graded")
    args = parser.parse_args(argv)
    if args.command == "autograde":
        limits = sandbox.Limits(memory_gb=args.memory_gb, processes=args.processes,
                                wall=args.wall)
        try:
            sandbox.autograde(args.assignment, args.student, args.sandboxed, args.timeout,
                              limits, args.force)
        except sandbox.SandboxUnavailable as error:
            parser.exit(2, f"refusing to grade untrusted code: {error}\n")
    elif args.command == "init":
        root = init_course(args.root, args.notebooks, args.timeout)
        print(f"course directory {root}: {len(list((root / 'source').iterdir()))} assignments; "
              f"next: cd {root} && nbgrader generate_assignment 01_gan")
    else:
        for name, tests in exercises().items():
            cells = ", ".join(f"{grade_id} ({points:g})" for grade_id, points in tests)
            print(f"{name:<24}{cells}")


if __name__ == "__main__":
    main()
