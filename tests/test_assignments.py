"""The nbgrader round trip in temporary course directories (no network, no Docker): generate the
student versions of every graded notebook, validate the source and a student version, autograde
the solutions, the untouched student versions and the failure-mode submissions, generate
feedback, export the grades, and check the scores. Then grading with every core busy, and a
batch of submissions graded by one command against the same submissions graded one by one."""
import contextlib
import csv
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from course_lib import assignments

NOTEBOOKS = list(assignments.exercises())
TRIALS = "04_vae"  # the notebook the failure-mode submissions are made of
TIMEOUT = 120  # seconds per cell; the slowest, 10's model graded by its FID, about 40 s on one thread
LOADED = "09_normalization"  # the notebook graded under CPU load (one of the cheapest)
# submissions in the batch test; CI grades a few, COURSE_GRADING_BATCH=30 measures throughput
BATCH = int(os.environ.get("COURSE_GRADING_BATCH", "6"))
HOG_SECONDS = 900  # a CPU hog ends by itself after this, should the test process die first
QUALITY = "10_flow_matching"  # the notebook with a model graded by its FID (test_quality)
MODELS = ("good_model", "poor_model", "tampered_model")  # its submissions beside the blank one

REPARAMETERIZE = """\
def my_reparameterize(mu, logvar, generator=None):
    return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
"""
KL = """\
def my_kl_divergence(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)
"""
FAILURE_MODES = {  # student: (answer cell, {test cell: new source, or None to delete it})
    "raises": (REPARAMETERIZE + "\n\ndef my_kl_divergence(mu, logvar):\n"
                                "    return torch.sum(mu, dim=2)  # IndexError\n", {}),
    "loops": (REPARAMETERIZE + "\n\ndef my_kl_divergence(mu, logvar):\n"
                               "    while True:\n        pass\n", {}),
    "tampers": (REPARAMETERIZE + "\n\n" + KL.replace("-0.5", "0.5"),
                {"test_kl_divergence": 'print("all tests pass")', "test_reparameterize": None}),
    "cheats": ("import course_lib.grading\n"
               "course_lib.grading.check_reparameterize = lambda fn: None\n"
               "course_lib.grading.check_kl_divergence = lambda fn: None\n\n"
               "def my_reparameterize(mu, logvar, generator=None):\n    return mu\n\n"
               "def my_kl_divergence(mu, logvar):\n    return mu.sum(1)\n", {}),
    "delegates": ("from course_lib import vae\n\n"
                  "def my_reparameterize(mu, logvar, generator=None):\n"
                  "    return vae.reparameterize(mu, logvar, generator)\n\n"
                  "def my_kl_divergence(mu, logvar):\n    return vae.kl_divergence(mu, logvar)\n",
                  {}),
    # answers that try to fool the checker; each earns 0 for the KL test (issue 19, section 5)
    "subclass": (REPARAMETERIZE + """
class Yes(torch.Tensor):
    def allclose(self, *args, **kwargs):
        return True
    def equal(self, *args, **kwargs):
        return True
    def __eq__(self, other):
        return True
    __hash__ = torch.Tensor.__hash__
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("allclose", "equal", "isclose", "assert_close"):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})

def my_kl_divergence(mu, logvar):
    return torch.zeros(len(mu), dtype=mu.dtype).as_subclass(Yes)
""", {}),
    "patches_allclose": (REPARAMETERIZE + """
import numpy as np, numpy.testing, torch.testing
yes = lambda *args, **kwargs: True
torch.allclose = torch.equal = torch.isclose = np.allclose = np.isclose = yes
torch.Tensor.allclose = torch.Tensor.equal = torch.Tensor.__eq__ = yes
torch.Tensor.numpy = lambda self: np.zeros(1)
numpy.testing.assert_allclose = torch.testing.assert_close = lambda *args, **kwargs: None

def my_kl_divergence(mu, logvar):
    return torch.zeros(len(mu), dtype=mu.dtype)
""", {}),
    "replaces_module": (REPARAMETERIZE + """
import sys, types
fake = types.SimpleNamespace(check_reparameterize=lambda fn: None,
                             check_kl_divergence=lambda fn: None)
import course_lib, course_lib.grading
sys.modules["course_lib.grading"] = course_lib.grading = fake

def my_kl_divergence(mu, logvar):
    return mu.sum(1)
""", {}),
    "copies_reference": (REPARAMETERIZE + """
import types
from course_lib import vae
_kl = types.FunctionType(vae.kl_divergence.__code__, vae.kl_divergence.__globals__)

def my_kl_divergence(mu, logvar):
    return _kl(mu, logvar)
""", {}),
    "exits": (REPARAMETERIZE + """
def my_kl_divergence(mu, logvar):
    raise SystemExit(0)
""", {}),
}
GROUP_NORM = "09_normalization"  # torch's group_norm behind an alias: 0 of 3
ALIASED_GROUP_NORM = """\
def my_group_norm(x, num_groups, eps=1e-5):
    return getattr(torch, "group" + "_norm")(x, num_groups, eps=eps)
"""


def nbgrader(course, *args):
    # nbgrader calls `alembic` by name: the environment's scripts must be on the PATH. The two
    # course directories grade side by side, one CPU thread each.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, text=True,
                            capture_output=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def submit(course, student, name, notebook):
    folder = course / "submitted" / student / name
    folder.mkdir(parents=True)
    nbformat.write(notebook, folder / f"{name}.ipynb")


def submit_model(course, student, payload):
    """A trained flow model, saved with its manifest where the quality-graded cell looks for it
    (``submission/`` beside the submitted notebook)."""
    from course_lib.checkpoint import save_checkpoint

    save_checkpoint(course / "submitted" / student / QUALITY / "submission" /
                    "flow_fashion_student.pt", payload["state"], arch=payload["arch"],
                    config=payload["config"], step=payload["step"])


def models(folder):
    """The three checkpoints of the quality-graded round trip: the shipped flow model (good), the
    same network after 3 training steps (poor), and the good one with one byte changed after it
    was saved (tampered)."""
    from course_lib.checkpoint import load_checkpoint
    from course_lib.experiments.config import override
    from course_lib.experiments.flow import CHECKPOINT, FlowRecipe, train_flow

    train_flow(override(FlowRecipe(), steps=3, warmup=1), folder / "poor.pt",
               run=folder / "poor_run.pt")
    return {"good_model": load_checkpoint(CHECKPOINT),
            "poor_model": load_checkpoint(folder / "poor.pt"),
            "tampered_model": load_checkpoint(CHECKPOINT)}


def tamper(course, student):
    path = course / "submitted" / student / QUALITY / "submission" / "flow_fashion_student.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def failure_mode(release, answer, tests):
    notebook = nbformat.read(release, as_version=4)
    cells = []
    for cell in notebook.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id == "answer_reparameterize_kl":
            cell.source = answer
        elif grade_id in tests:
            if tests[grade_id] is None:
                continue
            cell.source = tests[grade_id]
        cells.append(cell)
    notebook.cells = cells
    return notebook


def grade(course, make_submissions):
    """generate_assignment, the submissions, autograde, generate_feedback, export: the README's
    workflow for every assignment at once. Returns the exported grades."""
    nbgrader(course, "generate_assignment", "*")
    make_submissions(course)
    nbgrader(course, "autograde", "*")
    nbgrader(course, "generate_feedback", "*")
    nbgrader(course, "export", "--to", "grades.csv")
    with open(course / "grades.csv") as f:
        return {(row["assignment"], row["student_id"]): row for row in csv.DictReader(f)}


def scores(course, name):
    """student -> total autograded score of assignment ``name``, from the gradebook."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        return {submission.student_id: submission.score
                for submission in gradebook.find_assignment(name).submissions}


def solutions(course, payloads):
    for name in NOTEBOOKS:
        submit(course, "solution", name, nbformat.read(
            course / "source" / name / f"{name}.ipynb", as_version=4))
    submit_model(course, "solution", payloads["good_model"])


def students(course, payloads):
    for name in NOTEBOOKS:
        submit(course, "blank", name, nbformat.read(
            course / "release" / name / f"{name}.ipynb", as_version=4))
    for student in MODELS:
        submit(course, student, QUALITY, nbformat.read(
            course / "release" / QUALITY / f"{QUALITY}.ipynb", as_version=4))
        submit_model(course, student, payloads[student])
    tamper(course, "tampered_model")
    release = course / "release" / TRIALS / f"{TRIALS}.ipynb"
    for student, (answer, tests) in FAILURE_MODES.items():
        submit(course, student, TRIALS, failure_mode(release, answer, tests))
    notebook = nbformat.read(course / "release" / GROUP_NORM / f"{GROUP_NORM}.ipynb", 4)
    for cell in notebook.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "answer_group_norm":
            cell.source = ALIASED_GROUP_NORM
    submit(course, "aliases", GROUP_NORM, notebook)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The round trip, once, in two course directories graded side by side (one for the
    solutions and nbgrader validate, one for the student versions and the failure modes); the
    tests below read what it left."""
    lecture, cohort = (assignments.init_course(tmp_path_factory.mktemp(name), timeout=TIMEOUT)
                       for name in ("lecture", "cohort"))
    payloads = models(tmp_path_factory.mktemp("models"))
    with ThreadPoolExecutor(2) as pool:
        cohort_run = pool.submit(grade, cohort, lambda course: students(course, payloads))
        lecture_grades = grade(lecture, lambda course: solutions(course, payloads))
        validation = {"source": nbgrader(lecture, "validate", f"source/{TRIALS}/{TRIALS}.ipynb"),
                      "release": nbgrader(lecture, "validate",
                                          f"release/{TRIALS}/{TRIALS}.ipynb")}
        cohort_grades = cohort_run.result()
    return {"lecture": lecture, "cohort": cohort, "grades": {**lecture_grades, **cohort_grades},
            "validation": validation}


def test_grading_runs_the_graded_cells_and_what_they_need():
    def code(source, nbgrader=None):
        cell = nbformat.v4.new_code_cell(source)
        if nbgrader:
            cell.metadata["nbgrader"] = {"grade_id": nbgrader, "solution": nbgrader == "answer",
                                         "grade": nbgrader == "test"}
        return cell

    notebook = nbformat.v4.new_notebook(cells=[
        code("import math\nimport torch"),                                    # 0: needed
        code("x = torch.randn(10**7)\nheavy = x.sum()"),                       # 1: a demo
        nbformat.v4.new_markdown_cell("An exercise"),                           # 2
        code("SCALE = 2"),                                                     # 3: needed
        code("def helper(v):\n    return math.sqrt(v)"),                       # 4: needed
        code("def my_f(v):\n    return helper(v) * SCALE", "answer"),           # 5
        code("for v in (4.0, 9.0):\n    assert my_f(v) == 2 * v ** 0.5", "test"),  # 6
        code("%matplotlib inline\nprint(heavy, [v for v in range(3)])"),       # 7: a demo
        code("this is not Python ("),                                          # 8: kept
    ])
    assert assignments.cells_needed(notebook.cells) == {0, 3, 4, 5, 6, 8}
    graded, _ = assignments.GradingCellsOnly()(notebook, {})
    assert graded.cells[1].source.startswith("# not run when grading")
    assert graded.cells[7].source.startswith("# not run when grading")
    assert graded.cells[4].source.startswith("def helper")


def test_init_course_lays_out_the_course_and_refuses_unknown_notebooks(tmp_path):
    root = assignments.init_course(tmp_path, ["04_vae"])
    assert (root / "source" / "04_vae" / "04_vae.ipynb").read_bytes() == (
        assignments.NOTEBOOK_DIR / "04_vae.ipynb").read_bytes()
    config = (root / "nbgrader_config.py").read_text()
    assert "c.Execute.timeout = 120" in config and "add_missing_cells = True" in config
    with pytest.raises(ValueError, match="no graded notebook named 00_setup"):
        assignments.init_course(tmp_path, ["00_setup"])


def test_every_numbered_notebook_after_setup_has_graded_exercises():
    table = assignments.exercises()
    assert list(table) == [path.stem for path in assignments.numbered_notebooks()][1:]
    for name, tests in table.items():
        cells = assignments.graded_cells(assignments.NOTEBOOK_DIR / f"{name}.ipynb")
        assert any(cell["kind"] == "answer" for cell in cells), name
        assert all(points > 0 for _, points in tests), name
        assert len({cell["grade_id"] for cell in cells}) == len(cells), name
    source = (assignments.NOTEBOOK_DIR / "06_ddpm.ipynb").read_text()
    assert "### BEGIN HIDDEN TESTS" in source and "check_ddim_step(my_ddim_step)" in source


def test_validate_passes_the_source_and_fails_the_student_version(course):
    validation = course["validation"]
    assert "Success! Your notebook passes all the tests." in validation["source"]
    # nbgrader validate exits 0 either way: the verdict is in what it prints
    assert "VALIDATION FAILED ON 2 CELL(S)!" in validation["release"]
    assert "NotImplementedError" in validation["release"]


def test_the_student_versions_hold_no_solution_and_no_hidden_test(course):
    for name in NOTEBOOKS:
        text = (course["cohort"] / "release" / name / f"{name}.ipynb").read_text()
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
        assert "raise NotImplementedError()" in text and "course_lib.grading import check_" in text


def test_solutions_earn_full_marks_and_blank_notebooks_nothing(course):
    grades = course["grades"]
    for name, tests in assignments.exercises().items():
        full = sum(points for _, points in tests)
        assert float(grades[name, "solution"]["score"]) == full, name
        assert float(grades[name, "solution"]["max_score"]) == full, name
        assert float(grades[name, "blank"]["score"]) == 0, name


@pytest.mark.parametrize("student, expected", [
    ("raises", {"test_reparameterize": 2, "test_kl_divergence": 0}),
    ("loops", {"test_reparameterize": 2, "test_kl_divergence": 0}),
    ("tampers", {"test_reparameterize": 2, "test_kl_divergence": 0}),
    ("cheats", {"test_reparameterize": 0, "test_kl_divergence": 0}),
    ("delegates", {"test_reparameterize": 0, "test_kl_divergence": 0}),
    ("subclass", {"test_reparameterize": 2, "test_kl_divergence": 0}),
    ("patches_allclose", {"test_reparameterize": 2, "test_kl_divergence": 0}),
    ("replaces_module", {"test_reparameterize": 0, "test_kl_divergence": 0}),  # reload refuses it
    ("copies_reference", {"test_reparameterize": 2, "test_kl_divergence": 0}),
    ("exits", {"test_reparameterize": 2, "test_kl_divergence": 0}),
])
def test_failure_modes_get_the_scores_they_deserve(course, student, expected):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course['cohort'] / 'gradebook.db'}") as gradebook:
        for grade_id, score in expected.items():
            found = gradebook.find_grade(grade_id, TRIALS, TRIALS, student)
            assert (found.score, found.needs_manual_grade) == (score, False), grade_id
    assert float(course["grades"][TRIALS, student]["score"]) == sum(expected.values())


def test_what_the_autograder_saw(course):
    def graded(student):
        path = course["cohort"] / "autograded" / student / TRIALS / f"{TRIALS}.ipynb"
        return {cell.metadata["nbgrader"]["grade_id"]: (cell.source, json.dumps(cell.outputs))
                for cell in nbformat.read(path, 4).cells
                if cell.metadata.get("nbgrader", {}).get("grade")}

    raises = graded("raises")
    assert "my_kl_divergence raised IndexError" in raises["test_kl_divergence"][1]
    loops = graded("loops")
    assert "CellTimeoutError" in loops["test_kl_divergence"][1]
    tampers = graded("tampers")
    assert "was missing from the submission" in tampers["test_reparameterize"][0]
    assert "check_kl_divergence(my_kl_divergence)" in tampers["test_kl_divergence"][0]
    assert "has the wrong sign" in tampers["test_kl_divergence"][1]
    cheats = graded("cheats")
    assert "importlib.reload(course_lib.grading)" in cheats["test_kl_divergence"][0]
    assert "my_reparameterize passes" in cheats["test_reparameterize"][1]  # the visible check
    assert "GradingError" in cheats["test_reparameterize"][1]  # the hidden one
    delegates = graded("delegates")
    assert "your answer calls course_lib.vae.kl_divergence" in delegates["test_kl_divergence"][1]
    assert "a subclass of torch.Tensor" in graded("subclass")["test_kl_divergence"][1]
    assert "returns only zeros" in graded("patches_allclose")["test_kl_divergence"][1]
    assert "reload() argument must be a module" in graded("replaces_module")[
        "test_kl_divergence"][1]
    assert "your answer calls course_lib.vae.kl_divergence" in graded("copies_reference")[
        "test_kl_divergence"][1]
    assert "SystemExit" in graded("exits")["test_kl_divergence"][1]


def test_a_model_is_graded_by_its_fid(course):
    """The quality-graded cell: the shipped model earns the top band, a network trained for 3
    steps the lowest (FID 56), and a checkpoint changed after saving nothing, with the reason in
    its feedback."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course['cohort'] / 'gradebook.db'}") as gradebook:
        found = {student: gradebook.find_grade("test_quality", QUALITY, QUALITY, student).score
                 for student in (*MODELS, "blank")}
    assert found == {"good_model": 4, "poor_model": 1, "tampered_model": 0, "blank": 0}

    def output(student):
        path = course["cohort"] / "autograded" / student / QUALITY / f"{QUALITY}.ipynb"
        return next(json.dumps(cell.outputs) for cell in nbformat.read(path, 4).cells
                    if cell.metadata.get("nbgrader", {}).get("grade_id") == "test_quality")

    assert "4 points: FID" in output("good_model")
    assert "1 point: FID" in output("poor_model")
    assert "is corrupt or was modified" in output("tampered_model")
    assert "no checkpoint at submission" in output("blank")


def test_torch_group_norm_behind_an_alias_earns_nothing(course):
    path = course["cohort"] / "autograded" / "aliases" / GROUP_NORM / f"{GROUP_NORM}.ipynb"
    outputs = [json.dumps(cell.outputs) for cell in nbformat.read(path, 4).cells
               if cell.metadata.get("nbgrader", {}).get("grade_id") == "test_group_norm"]
    assert "your answer calls torch's native_group_norm" in outputs[0]
    assert float(course["grades"][GROUP_NORM, "aliases"]["score"]) == 0


def test_every_submission_gets_feedback(course):
    submissions = [("lecture", name, "solution") for name in NOTEBOOKS]
    submissions += [("cohort", name, "blank") for name in NOTEBOOKS]
    submissions += [("cohort", TRIALS, student) for student in FAILURE_MODES]
    submissions += [("cohort", GROUP_NORM, "aliases")]
    submissions += [("cohort", QUALITY, student) for student in MODELS]
    for where, name, student in submissions:
        html = course[where] / "feedback" / student / name / f"{name}.html"
        assert html.exists() and "Score" in html.read_text(), html


def _runs_a_loop_on_exercises(name):
    source = (assignments.NOTEBOOK_DIR / f"{name}.ipynb").read_text()
    return "or_reference(" in source


LOOP_NOTEBOOKS = [name for name in NOTEBOOKS if _runs_a_loop_on_exercises(name)]


def _run_blank(path):
    """Execute a student version top to bottom, errors allowed; the cells that raised."""
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, iopub_timeout=60, allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook, [cell for cell in notebook.cells if cell.cell_type == "code"
                      and any(o.output_type == "error" for o in cell.outputs)]


@pytest.mark.skipif(not LOOP_NOTEBOOKS, reason="no notebook runs a loop on its exercises")
def test_a_blank_student_notebook_runs_top_to_bottom(course, monkeypatch):
    """In the student versions, the loops that call unsolved exercises run on the reference (with
    its note) and every cell runs; only the graded test cells fail."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    paths = [course["cohort"] / "release" / name / f"{name}.ipynb" for name in LOOP_NOTEBOOKS]
    with ThreadPoolExecutor(2) as pool:
        for path, (notebook, failed) in zip(paths, pool.map(_run_blank, paths)):
            outside_tests = [cell.source[:80] for cell in failed
                             if not cell.metadata.get("nbgrader", {}).get("grade")]
            assert not outside_tests, f"{path.name}: cells that failed: {outside_tests}"
            notes = "".join(o.get("text", "") for cell in notebook.cells
                            if cell.cell_type == "code" for o in cell.outputs)
            assert "is not written yet: running" in notes, path.name


@contextlib.contextmanager
def cpu_hogs(count):
    """``count`` processes that spin on a core each until the block ends (killed then; each also
    stops by itself after HOG_SECONDS). Yields them, to check they ran throughout."""
    spin = (f"import time\nend = time.monotonic() + {HOG_SECONDS}\n"
            f"while time.monotonic() < end:\n    pass")
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait(timeout=60)


def test_grading_with_every_core_busy_earns_full_marks(tmp_path):
    """The load that made `nbgrader validate` die with "Timeout waiting for IOPub output" (the
    iopub_timeout of 4 s): a spinning process on every core while a correct submission is
    validated and autograded."""
    course = assignments.init_course(tmp_path, [LOADED], timeout=TIMEOUT)
    nbgrader(course, "generate_assignment", LOADED)
    source = f"source/{LOADED}/{LOADED}.ipynb"
    submit(course, "solution", LOADED, nbformat.read(course / source, as_version=4))
    with cpu_hogs(len(os.sched_getaffinity(0))) as hogs:
        validation = nbgrader(course, "validate", source)
        nbgrader(course, "autograde", LOADED)
        assert all(hog.poll() is None for hog in hogs)  # the cores stayed busy throughout
    assert "Success! Your notebook passes all the tests." in validation
    full = sum(points for _, points in assignments.exercises()[LOADED])
    assert scores(course, LOADED) == {"solution": full}


def test_a_batch_grades_as_one_by_one(tmp_path):
    """BATCH submissions of one assignment (correct, blank, a tampered test cell and a wrong KL,
    in turn) graded by one `nbgrader autograde`, against one of each graded alone; prints the
    throughput (README: COURSE_GRADING_BATCH=30)."""
    course = assignments.init_course(tmp_path, [TRIALS], timeout=TIMEOUT)
    nbgrader(course, "generate_assignment", TRIALS)
    release = course / "release" / TRIALS / f"{TRIALS}.ipynb"
    kinds = {"solution": nbformat.read(course / "source" / TRIALS / f"{TRIALS}.ipynb", 4),
             "blank": nbformat.read(release, 4),
             "tampers": failure_mode(release, *FAILURE_MODES["tampers"])}
    for kind, notebook in kinds.items():
        submit(course, kind, TRIALS, notebook)
        nbgrader(course, "autograde", TRIALS, "--student", kind)
    alone = scores(course, TRIALS)
    assert alone == {"solution": 4, "blank": 0, "tampers": 2}
    batch = {f"batch{i:03d}": kind for i, kind in zip(range(BATCH), itertools.cycle(kinds))}
    for student, kind in batch.items():
        submit(course, student, TRIALS, kinds[kind])
    start = time.perf_counter()
    nbgrader(course, "autograde", TRIALS, "--student", "batch*")
    seconds = time.perf_counter() - start
    graded = scores(course, TRIALS)
    assert {student: graded[student] for student in batch} == {
        student: alone[kind] for student, kind in batch.items()}
    print(f"graded {BATCH} submissions of {TRIALS} in {seconds:.0f} s with one nbgrader "
          f"autograde: {60 * BATCH / seconds:.1f} per minute")
