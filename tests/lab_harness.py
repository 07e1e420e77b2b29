"""The course's JupyterLab driven by a real headless Chromium (Playwright), for tests/test_browser.py.

`lab_server` starts `jupyter lab` on a free loopback port with a random token and the course's
settings (`lab/settings/`), rooted at a folder the caller owns (a copy of notebooks/); `Notebook`
opens a notebook from the file browser, runs it through the Run menu and checks what a student
sees: error outputs, widgets that failed to render, and the image an interaction redraws.
"""
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

try:
    from playwright.sync_api import Page, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the tests skip, naming the package
    Page = PlaywrightTimeout = sync_playwright = None

REPO = Path(__file__).resolve().parents[1]
SETTINGS = REPO / "lab" / "settings"
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 900
REDRAW_TIMEOUT_S = 120
# In the page: the texts of the error outputs under `root`: a cell's exception, or a traceback
# on stderr (how an Output widget, such as interact's, shows an exception of its callback).
ERRORS_UNDER = """root => [...root.querySelectorAll(`.jp-OutputArea-output[data-mime-type$='error'],
    .jp-OutputArea-output[data-mime-type$='stderr']`)]
  .filter(o => o.dataset.mimeType.endsWith('error') || o.textContent.includes('Traceback'))
  .map(o => o.textContent)"""
WIDGET_ERROR = "Error displaying widget"
# ipywidgets' view of a widget that failed (8.x), or JupyterLab's message (model not found, ...)
BROKEN_WIDGET = f".jupyter-widgets-error-widget, .jp-OutputArea-output:has-text('{WIDGET_ERROR}')"
KERNEL_IDLE = re.compile(r"\| Idle$")  # the status bar's "Python 3 (ipykernel) | Idle"


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (the package to install), or None."""
    if sync_playwright is None:
        return "Playwright for Python is not installed: pip install playwright"
    if shutil.which("chromium") is None:
        return "no Chromium on PATH: apt-get install chromium"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_command(root: Path, port: int, token: str) -> list[str]:
    """The `jupyter lab` command line of `make lab`, served on loopback for a headless browser."""
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", f"--LabApp.app_settings_dir={SETTINGS}"]
    return command + (["--allow-root"] if os.geteuid() == 0 else [])


@dataclass
class Lab:
    url: str
    token: str
    log: Path

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        """A call to the server's REST API, `path` below the root (api/status, lab/api/settings)."""
        response = requests.request(method, f"{self.url}/{path}", timeout=30,
                                    headers={"Authorization": f"token {self.token}"}, **kwargs)
        response.raise_for_status()
        return response

    def shutdown_kernels(self) -> None:
        for kernel in self.api("GET", "api/kernels").json():
            self.api("DELETE", f"api/kernels/{kernel['id']}")


@contextlib.contextmanager
def lab_server(root: Path, state: Path):
    """JupyterLab serving `root`. Its config, user settings (`state/user-settings`, empty unless
    the caller puts some there), workspaces and log live in `state`: a fresh student's
    JupyterLab, whatever ~/.jupyter holds. Kernels see this process's environment (COURSE_QUICK
    included) and import course_lib from this clone; MPLBACKEND is dropped so that they draw
    inline, as in `make lab`."""
    port, token, log = free_port(), secrets.token_hex(16), state / "jupyterlab.log"
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    env.update(COURSE_ROOT=str(REPO),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_RUNTIME_DIR=str(state / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(state / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"))
    lab = Lab(f"http://127.0.0.1:{port}", token, log)
    with log.open("w") as out:
        process = subprocess.Popen(lab_command(root, port, token), env=env, cwd=root,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(lab, process)
        yield lab
    finally:
        with contextlib.suppress(requests.RequestException):
            lab.api("POST", "api/shutdown")
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(lab: Lab, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {process.returncode}:\n"
                               f"{lab.log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            lab.api("GET", "api/status")
            return
        time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer within {START_TIMEOUT_S} s:\n"
                       f"{lab.log.read_text()[-3000:]}")


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium under Playwright (never Playwright's own browser build)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        try:
            yield browser
        finally:
            browser.close()


@dataclass(frozen=True)
class Interaction:
    """One thing a student does to an `interact` widget: press `value` on the slider labelled
    `control`, choose the next option of a dropdown, or type `value` into a text box; then
    click `button` where the widget waits for one (`interact_manual`)."""
    kind: str  # "slider", "dropdown" or "text"
    control: str
    value: str = ""
    button: str | None = None
    widget: int = 0  # which interact widget of the notebook, in page order

    def __str__(self) -> str:
        what = {"slider": f"slider {self.control}: {self.value}",
                "dropdown": f"dropdown {self.control}: next option",
                "text": f"text {self.control}: {self.value!r}"}[self.kind]
        return what + (f", then '{self.button}'" if self.button else "")


# In the page: from the first input event (key, change, click) on an interact widget, count the
# new images decoded in its output and note when the last one was; or catch an error output.
ARM_REDRAW = """root => {
  const errorsUnder = ERRORS_UNDER;
  const out = root.querySelector('.widget-output');
  let shown = out.querySelector('img')?.src ?? '';
  const state = window.__redraw = {start: null, end: null, redraws: 0, error: null};
  for (const type of ['keydown', 'change', 'click'])
    root.addEventListener(type, e => { state.start ??= e.timeStamp; }, {capture: true, once: true});
  new MutationObserver(() => {
    state.error ??= errorsUnder(out)[0] ?? null;
    const img = out.querySelector('img');
    if (img && img.src !== shown) {
      shown = img.src;
      state.redraws += 1;
      img.decode().catch(() => {}).then(() => { state.end = performance.now(); });
    }
  }).observe(out, {subtree: true, childList: true, attributes: true});
}""".replace("ERRORS_UNDER", ERRORS_UNDER)

# Done when the callback raised, or a new image is shown, the kernel is idle and the picture has
# not changed for a second (interact may redraw more than once for one input).
REDRAW_SETTLED = """() => {
  const state = window.__redraw;
  return state.error !== null || (state.end !== null && performance.now() - state.end > 1000
    && document.querySelector('#jp-main-statusbar').textContent.includes('| Idle'));
}"""

RUN_FINISHED = """() => {
  const indicator = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
  const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];
  return indicator?.dataset.status === 'idle' && !prompts.some(p => p.textContent.includes('*'));
}"""

RUN_STARTED = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt')]
  .some(p => p.textContent.includes('*'))"""

WIDGETS_SETTLED = """() => [...document.querySelectorAll(
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.widget-view+json']")]
  .every(o => o.querySelector('.jupyter-widgets') || o.textContent.includes('Error'))"""


class Notebook:
    """A notebook as a student meets it in JupyterLab, in one browser page."""

    def __init__(self, page: Page, lab: Lab, name: str):
        self.page, self.lab, self.name = page, lab, name

    def open(self) -> None:
        """Go to JupyterLab, double-click the notebook in the file browser, wait for its kernel."""
        self.page.goto(f"{self.lab.url}/lab?reset&token={self.lab.token}")  # no tabs restored
        self.page.locator(".jp-DirListing-itemText").get_by_text(self.name, exact=True).dblclick()
        self.page.locator("#jp-main-statusbar").get_by_text(KERNEL_IDLE).wait_for(
            timeout=START_TIMEOUT_S * 1000)

    def run_all(self) -> float:
        """Run > Run All Cells, wait until every cell has run and the kernel is idle; seconds."""
        start = time.perf_counter()
        self.page.get_by_role("menuitem", name="Run", exact=True).click()
        self.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        self.page.wait_for_function(RUN_STARTED, timeout=60_000)
        self.page.wait_for_function(RUN_FINISHED, timeout=RUN_TIMEOUT_S * 1000, polling=500)
        return time.perf_counter() - start

    def assert_no_errors(self) -> None:
        errors = self.page.evaluate(f"() => ({ERRORS_UNDER})(document.body)")
        if errors:
            raise AssertionError(f"{self.name}: {len(errors)} error output(s) in the page, the "
                                 f"first:\n{errors[0]}")

    def assert_widgets_rendered(self, interacts: int) -> None:
        """Every widget output shows its widget (no error view, no "Error displaying widget"),
        and the page holds `interacts` interact widgets."""
        self.page.wait_for_function(WIDGETS_SETTLED, timeout=60_000)
        broken = self.page.locator(BROKEN_WIDGET)
        if broken.count():
            broken.first.click()  # ipywidgets' error view then shows the JavaScript error
            raise AssertionError(f"{self.name}: {WIDGET_ERROR} ({broken.count()} widget(s)): "
                                 f"{broken.first.text_content().strip()}")
        found = self.page.locator(".widget-interact").count()
        assert found == interacts, f"{self.name}: {found} interact widgets rendered, {interacts} expected"

    def interact(self, step: Interaction, screenshot: Path) -> tuple[float, int]:
        """Do `step` and wait for its widget's image to change and settle: seconds from input to
        the last new image in the page, and how many images came. Fails with the kernel's
        traceback if the callback raised."""
        root = self.page.locator(".widget-interact").nth(step.widget)
        root.scroll_into_view_if_needed()
        control = root.locator(f".widget-{step.kind}").filter(
            has=self.page.get_by_text(step.control, exact=True))
        act = {"slider": lambda: control.locator(".noUi-handle").press(step.value),
               "dropdown": lambda: select_next(control.locator("select")),
               "text": lambda: control.locator("input").fill(step.value)}[step.kind]
        if step.button is not None:  # the change waits for the button: time from its click
            act()
            act = root.get_by_role("button", name=step.button).click
        root.evaluate(ARM_REDRAW)
        act()
        try:
            self.page.wait_for_function(REDRAW_SETTLED, timeout=REDRAW_TIMEOUT_S * 1000)
        except PlaywrightTimeout as error:
            raise AssertionError(f"{self.name}: {step}: no new image within {REDRAW_TIMEOUT_S} s") from error
        state = self.page.evaluate("() => window.__redraw")
        root.screenshot(path=screenshot)
        if state["error"] is not None:
            raise AssertionError(f"{self.name}: {step}: the callback raised:\n{state['error']}")
        assert state["start"] is not None, f"{self.name}: {step}: the picture changed before any input"
        return (state["end"] - state["start"]) / 1000, state["redraws"]


def select_next(select) -> None:
    """Choose the option after the selected one (the first after the last)."""
    options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
    current = select.input_value()
    select.select_option(options[(options.index(current) + 1) % len(options)])
