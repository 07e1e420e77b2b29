"""The course in a real browser: JupyterLab (as `make lab` opens it) driven by Debian's headless
Chromium through Playwright, on a temporary copy of notebooks/.

Each widget notebook is opened from the file browser and run through the Run menu; no cell may
show an error and every widget must render; then each interaction must redraw its image. The
time from input to the new image is recorded in runs/browser/latencies.json (benchmark figures,
never asserted), with a screenshot per notebook and per interaction in runs/browser/.
"""
import json
import os
import re
import shutil
import subprocess

import nbformat
import pytest
from lab_harness import REPO, SETTINGS, Interaction, Notebook, chromium, lab_server, missing_browser

from course_lib.runtime import RUNS_DIR

pytestmark = pytest.mark.browser

OUT = RUNS_DIR / "browser"
NEWS_QUESTION = "official Jupyter news"

# Every notebook with widgets, the interact widgets it shows and what a student does to them.
WIDGET_NOTEBOOKS = {
    "01_gan.ipynb": (1, [Interaction("slider", "step", "ArrowRight")]),
    "02_dcgan.ipynb": (2, [Interaction("slider", "s", "ArrowRight"),
                           Interaction("slider", "step", "ArrowLeft", widget=1)]),
    "03_autoencoder.ipynb": (1, [Interaction("slider", "z1", "ArrowRight"),
                                 Interaction("slider", "z2", "ArrowDown")]),
    "04_vae.ipynb": (1, [Interaction("slider", "strength", "ArrowRight"),
                         Interaction("dropdown", "name")]),
    "05_diffusion_schedules.ipynb": (1, [Interaction("slider", "t", "PageUp"),
                                         Interaction("dropdown", "schedule")]),
    "06_ddpm.ipynb": (2, [Interaction("slider", "t", "PageDown"),
                          Interaction("slider", "steps", "ArrowRight", widget=1)]),
    "07_text_to_image.ipynb": (1, [
        Interaction("text", "prompt", "a photo of a sneaker", button="Run Interact"),
        Interaction("slider", "w", "ArrowRight", button="Run Interact"),
        Interaction("dropdown", "dataset", button="Run Interact")]),
    "08_fid.ipynb": (1, [Interaction("slider", "level", "ArrowRight"),
                         Interaction("dropdown", "kind")]),
    "09_normalization.ipynb": (1, [Interaction("slider", "batch", "ArrowRight"),
                                   Interaction("dropdown", "groups")]),
}


def test_every_widget_notebook_is_driven():
    """WIDGET_NOTEBOOKS lists every notebook that imports ipywidgets, with its interact calls."""
    found = {}
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "code")
        if "ipywidgets" in code:
            found[path.name] = len(re.findall(r"\binteract(?:_manual)?\(", code))
    assert found == {name: interacts for name, (interacts, _) in WIDGET_NOTEBOOKS.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A copy of notebooks/: JupyterLab saves what it runs, never into the committed files."""
    copy = tmp_path_factory.mktemp("lab") / "notebooks"
    shutil.copytree(REPO / "notebooks", copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return copy


@pytest.fixture(scope="module")
def lab(root, tmp_path_factory):
    with lab_server(root, tmp_path_factory.mktemp("lab-state")) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    missing = missing_browser()
    if missing:
        pytest.skip(missing)
    with chromium() as instance:
        yield instance


@pytest.fixture
def page(browser, lab):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()
        lab.shutdown_kernels()


@pytest.fixture(scope="module")
def figures():
    """Per notebook: Run All time and each interaction's latency; written when the module ends."""
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        yield results
    finally:
        (OUT / "latencies.json").write_text(json.dumps(results, indent=2) + "\n")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


@pytest.mark.parametrize("name", list(WIDGET_NOTEBOOKS))
def test_widget_notebook(page, lab, figures, name):
    interacts, steps = WIDGET_NOTEBOOKS[name]
    notebook = Notebook(page, lab, name)
    notebook.open()
    seconds = notebook.run_all()
    notebook.assert_no_errors()
    notebook.assert_widgets_rendered(interacts)
    stem = name.removesuffix(".ipynb")
    page.locator(".widget-interact").first.scroll_into_view_if_needed()
    page.screenshot(path=OUT / f"{stem}.png")
    interactions = {}
    for step in steps:
        latency, redraws = notebook.interact(step, OUT / f"{stem}__{slug(str(step))}.png")
        interactions[str(step)] = {"latency_s": round(latency, 3), "redraws": redraws}
        notebook.assert_no_errors()
    figures[name] = {"run_all_s": round(seconds, 1), "interactions": interactions}
    assert page.get_by_text(NEWS_QUESTION).count() == 0, "JupyterLab asked about its news feed"


BROKEN = [  # two cells: a widget whose view does not exist in the front end, and an interact
    # whose callback raises once the slider moves
    """\
import ipywidgets as widgets
from traitlets import Unicode


class Broken(widgets.IntSlider):
    _view_name = Unicode("NoSuchView").tag(sync=True)


Broken()""",
    """\
import ipywidgets as widgets
import matplotlib.pyplot as plt


def draw(x=0):
    if x:
        raise ValueError("broken on purpose")
    plt.plot([0, 1])
    plt.show()


widgets.interact(draw, x=widgets.IntSlider(value=0, min=0, max=5));""",
]


def test_harness_reports_broken_widgets(page, lab, root):
    """The detector itself: a widget that cannot render and a callback that raises both fail."""
    name = "broken_widgets.ipynb"
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in BROKEN],
                                            metadata=kernel), root / name)
    notebook = Notebook(page, lab, name)
    notebook.open()
    notebook.run_all()
    notebook.assert_no_errors()
    with pytest.raises(AssertionError, match="Error displaying widget"):
        notebook.assert_widgets_rendered(1)
    with pytest.raises(AssertionError, match="broken on purpose"):
        notebook.interact(Interaction("slider", "x", "ArrowRight"), OUT / "broken_widgets.png")


def test_course_settings(lab):
    """The course's overrides reach JupyterLab: no question about the news feed."""
    schema = lab.api("GET", "lab/api/settings/@jupyterlab/apputils-extension:notification").json()["schema"]
    assert schema["properties"]["fetchNews"]["default"] == "false"
    assert schema["properties"]["checkForUpdates"]["default"] is False


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_make_lab_command():
    """`make lab` starts JupyterLab with the course's settings (as root with --allow-root);
    PROJECTOR=1 adds the user settings of lab/projector/."""
    def dry_run(*switch):
        lines = subprocess.run(["make", "-n", "lab", *switch], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.replace("\\\n", " ")
        return next(line for line in lines.splitlines() if "jupyter lab" in line)

    plain, projector = dry_run(), dry_run("PROJECTOR=1")
    for line in plain, projector:
        assert f"--LabApp.app_settings_dir={SETTINGS}" in line
        assert ("--allow-root" in line) == (os.geteuid() == 0)
    assert "JUPYTERLAB_SETTINGS_DIR" not in plain
    assert f"JUPYTERLAB_SETTINGS_DIR={REPO / 'runs' / 'lab-projector'} " in projector


FONT_SIZES = """() => ['--jp-code-font-size', '--jp-content-font-size1']
    .map(v => getComputedStyle(document.body).getPropertyValue(v).trim())"""


def test_projector_and_presentation_mode(browser, tmp_path):
    """`make lab PROJECTOR=1`'s user settings enlarge the fonts (JupyterLab's: 13px, 14px), and
    View > Appearance > Presentation Mode, as the README tells an instructor, switches it on."""
    shutil.copytree(REPO / "lab" / "projector", tmp_path / "user-settings")
    (tmp_path / "root").mkdir()
    with lab_server(tmp_path / "root", tmp_path) as server:
        page = browser.new_page()
        try:
            page.goto(f"{server.url}/lab?token={server.token}")
            page.wait_for_function(f"() => ({FONT_SIZES})().join() === '20px,20px'", timeout=60_000)
            page.get_by_role("menuitem", name="View", exact=True).click()
            for item in "Appearance", "Presentation Mode":
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()
            page.wait_for_selector("#main.jp-mod-presentationMode", state="attached")  # the shell
        finally:
            page.close()
