"""Every measured figure a notebook's prose quotes is one its outputs show (issue 17 §1).

A figure is a number with a decimal point or a percentage in a markdown cell, outside math and
code. It must be found, rounded as quoted, in the notebook's own outputs: a figure from a shipped
table is one the notebook displays. Two kinds are exempt: constants that the notebook's code
spells out (a recipe's learning rate), and a paper's figure in a sentence that cites it
("Ho et al. (2020) report FID 3.17").
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(\s?%)?(?![\w.]?\d)")
CITATION = re.compile(r"et al\.|\(\d{4}\)|\b(19|20)\d\d\b|paper|reports?\b|[Tt]able \d", re.I)
NUMBER_IN_TEXT = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def prose(markdown: str) -> str:
    """The markdown without math, code spans, links' targets and HTML tags."""
    for pattern in (r"\$\$.*?\$\$", r"\$[^$]*\$", r"```.*?```", r"`[^`]*`", r"\]\([^)]*\)",
                    r"<[^>]+>"):
        markdown = re.sub(pattern, " ", markdown, flags=re.S)
    return markdown


def quoted_figures(markdown: str) -> list[tuple[str, str]]:
    """(figure as quoted, its sentence) for every measured-looking figure of a markdown cell."""
    found = []
    for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z(*-])|\n\s*[-*]\s|\n\n", prose(markdown)):
        if CITATION.search(sentence):
            continue
        for match in FIGURE.finditer(sentence):
            number, percent = match.groups()
            if percent or "." in number:
                found.append((number + ("%" if percent else ""), sentence.strip()))
    return found


def numbers(text: str) -> set[float]:
    return {float(n.replace(",", "")) for n in NUMBER_IN_TEXT.findall(text)}


def shown(figure: str, measured: set[float], constants: set[float]) -> bool:
    percent = figure.endswith("%")
    text = figure.rstrip("%")
    value, decimals = float(text), len(text.partition(".")[2])
    candidates = {value} | ({value / 100} if percent else set())

    def rounds_to(x: float) -> bool:
        return (round(x, decimals) == value or (percent and round(100 * x, decimals) == value))

    return (any(rounds_to(x) for x in measured)
            or any(abs(c - x) < 1e-12 for c in candidates for x in constants))


def output_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        for kind, data in output.get("data", {}).items():
            if kind.startswith("text/"):
                parts.append(data if isinstance(data, str) else "".join(data))
    return "\n".join(parts)


def unsourced(path: Path) -> list[str]:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    measured = numbers("\n".join(map(output_text, code)))
    constants = numbers("\n".join(cell.source for cell in code))
    return [f"{figure!r} in: {sentence[:160]}"
            for cell in notebook.cells if cell.cell_type == "markdown"
            for figure, sentence in quoted_figures(cell.source)
            if not shown(figure, measured, constants)]


def test_the_checker_finds_figures_and_their_sources():
    figures = [f for f, _ in quoted_figures(
        "FID 4.65 on $1.5$ and `0.3`; 75 % right. Ho et al. (2020) report 3.17.\n\n- at 1,000")]
    assert figures == ["4.65", "75%"]
    assert shown("4.65", {4.6541}, set()) and shown("75%", {0.752}, set())
    assert not shown("4.65", {4.66}, set()) and not shown("75%", {0.74}, set())
    assert shown("0.999", set(), {0.999})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_in_the_prose_is_in_the_outputs(path):
    missing = unsourced(path)
    assert not missing, (f"{path.name}: figures quoted in markdown that no output of the "
                         "notebook and no shipped table shows:\n  " + "\n  ".join(missing))
