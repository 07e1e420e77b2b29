"""Sandboxed autograding (course_lib.sandbox): hostile submissions of 04_vae graded by ONE
`python -m course_lib.assignments autograde 04_vae` run. Each hostile student answers
my_reparameterize correctly (2 points) and puts its probe in my_kl_divergence, which then
returns the correct KL: a probe the sandbox stops raises, so the KL test scores 0 and the
submission 2; a probe that got through would score 4. The grader's files are hashed before and
after, a listener on 127.0.0.1 must see no connection, no process a submission started may
survive, and honest students graded before and after the attackers earn 4.

Then: the command refuses where bwrap is missing, and `--unsandboxed` gives each kernel a
private course_lib and voids a submission that rewrote it (and restored it afterwards).

The grader runs on a copy of course_lib (PYTHONPATH), the one the kernels get, so that a
sandbox failure would damage the copy, never the checkout (which the kernels never see)."""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import nbformat
import pytest

from course_lib import assignments, sandbox

NAME = "04_vae"
TIMEOUT = 30  # seconds per cell: the sleeping probe costs this much
REPO = Path(assignments.__file__).resolve().parents[1]

REPARAMETERIZE = """\
def my_reparameterize(mu, logvar, generator=None):
    return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
"""
KL = "-0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1)"


def probe_answer(probe: str) -> str:
    """The answer cell of a hostile student: the probe runs whenever my_kl_divergence does."""
    body = "\n".join("    " + line for line in probe.strip().splitlines())
    return (f"{REPARAMETERIZE}\n\ndef my_kl_divergence(mu, logvar):\n{body}\n"
            f"    return {KL}\n")


def probes(course: Path, home: Path, port: int, marker: str) -> dict[str, tuple[str, str]]:
    """student: (probe, what the KL test's output must say, or a tuple of alternatives)."""
    other = course / "submitted" / "a_honest" / NAME / f"{NAME}.ipynb"
    gradebook, config = course / "gradebook.db", course / "nbgrader_config.py"
    source = course / "source" / NAME / f"{NAME}.ipynb"
    return {
        "lists_others": (f"import os\nprint(os.listdir({str(course / 'submitted')!r}))",
                         "No such file or directory"),
        "reads_other": (f"print(open({str(other)!r}).read()[:100])", "No such file or directory"),
        "writes_gradebook": (f"import sqlite3\ndb = sqlite3.connect({str(gradebook)!r})\n"
                             f"db.execute('create table pwned (x)')\ndb.commit()",
                             "unable to open database file"),
        "rewrites_score": (f"import sqlite3\ndb = sqlite3.connect({str(gradebook)!r})\n"
                           f"db.execute('update grade set auto_score = 0')\ndb.commit()",
                           "unable to open database file"),
        "appends_config": (f"open({str(config)!r}, 'a').write('\\nraise SystemExit(1)\\n')",
                           "No such file or directory"),
        "reads_ssh": ("import os\nprint(open(os.path.expanduser('~/.ssh/id_rsa')).read())\n"
                      f"print(open({str(home / '.ssh' / 'id_rsa')!r}).read())",
                      "No such file or directory"),
        "connects": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)",
                     "Error"),  # ConnectionRefusedError or OSError: network unreachable
        "fork_bomb": ("import os, time\nfor _ in range(3000):  # bounded, should the limit fail\n"
                      "    if os.fork() == 0:\n        time.sleep(120)\n        os._exit(0)",
                      "Resource temporarily unavailable"),
        "allocates_30gb": ("big = bytearray(30 * 2**30)", "MemoryError"),
        "sleeps_forever": ("import time\ntime.sleep(10**6)", "CellTimeoutError"),
        "deletes_source": (f"import os\nos.remove({str(source)!r})", "No such file or directory"),
        "patches_course_lib": ("import course_lib.grading\n"
                               "open(course_lib.grading.__file__, 'a').write("
                               "'\\ncheck_kl_divergence = lambda fn: None\\n')",
                               ("Read-only file system", "Permission denied")),  # as root/user
        "exits": ("import os\nos._exit(0)", "DeadKernelError"),
    }


DETACHED = "detaches"  # a correct answer that leaves a detached process behind: 4, and killed


def detach(marker: str) -> str:
    return ("import subprocess, sys\nglobal _detached\n"
            "if '_detached' not in globals():\n"
            f"    _detached = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)', {marker!r}], start_new_session=True)")


def submission(release: Path, answer: str):
    notebook = nbformat.read(release, as_version=4)
    for cell in notebook.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "answer_reparameterize_kl":
            cell.source = answer
    return notebook


def submit(course: Path, student: str, notebook) -> None:
    folder = course / "submitted" / student / NAME
    folder.mkdir(parents=True)
    nbformat.write(notebook, folder / f"{NAME}.ipynb")


def digest(root: Path, skip=()) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()
            and "__pycache__" not in path.parts and path.relative_to(root).parts[0] not in skip}


def environment(tmp: Path) -> dict[str, str]:
    """The grader's environment: a copy of course_lib first on the path, a fake home with an
    ssh key, the environment's scripts on the PATH (nbgrader calls alembic)."""
    library = tmp / "lib"
    shutil.copytree(REPO / "course_lib", library / "course_lib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN FAKE KEY-----\n")
    return {**os.environ, "HOME": str(home), "PYTHONPATH": str(library),
            "COURSE_ROOT": str(REPO), "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def grade(course: Path, env: dict, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "course_lib.assignments", "autograde", NAME,
                           "--timeout", str(TIMEOUT), *options], cwd=course, env=env,
                          text=True, capture_output=True, timeout=1500)


def nbgrader(course: Path, env: dict, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                            text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def results(course: Path) -> dict[str, dict[str, float]]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        return {submission.student_id: {
            grade_id: gradebook.find_grade(grade_id, NAME, NAME, submission.student_id).score
            for grade_id in ("test_reparameterize", "test_kl_divergence")}
            for submission in gradebook.find_assignment(NAME).submissions}


def kl_output(course: Path, student: str) -> str:
    path = course / "autograded" / student / NAME / f"{NAME}.ipynb"
    for cell in nbformat.read(path, 4).cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "test_kl_divergence":
            return str(cell.outputs)
    raise AssertionError(f"no test_kl_divergence cell in {path}")


def processes_with(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


@pytest.fixture(scope="module")
def bwrap():
    try:
        return sandbox.check_sandbox()
    except sandbox.SandboxUnavailable as error:
        pytest.skip(f"needs a working bubblewrap (Debian package {sandbox.PACKAGE}): {error}")


class Listener:
    """A TCP listener on 127.0.0.1 (a free port) that counts the connections it accepts."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                connection, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            self.accepted += 1
            connection.close()

    def close(self):
        self.running = False
        self.thread.join(timeout=10)
        self.server.close()


@pytest.fixture(scope="module")
def graded(bwrap, tmp_path_factory):
    """The sandboxed run: honest students first and last, every probe between."""
    tmp = tmp_path_factory.mktemp("sandbox")
    env = environment(tmp)
    course = assignments.init_course(tmp / "course", [NAME], timeout=TIMEOUT)
    nbgrader(course, env, "generate_assignment", NAME)
    release = course / "release" / NAME / f"{NAME}.ipynb"
    listener, marker = Listener(), f"gdm-detached-{uuid.uuid4().hex}"
    table = probes(course, Path(env["HOME"]), listener.port, marker)
    submit(course, "a_honest", submission(release, probe_answer("pass")))
    for student, (probe, _) in table.items():
        submit(course, student, submission(release, probe_answer(probe)))
    submit(course, DETACHED, submission(release, probe_answer(detach(marker))))
    submit(course, "z_honest", submission(release, probe_answer("pass")))
    protected = {"course": (course, ("gradebook.db", "autograded", "feedback")),
                 "the grader's course_lib": (tmp / "lib", ())}
    before = {name: digest(root, skip) for name, (root, skip) in protected.items()}
    # processes beyond the default limit let the fork bomb through; the kernel needs ~30 threads
    result = grade(course, env, "--processes", str(max(128, 8 * os.cpu_count())),
                   "--memory-gb", "6")
    listener.close()
    after = {name: digest(root, skip) for name, (root, skip) in protected.items()}
    return {"course": course, "result": result, "table": table, "marker": marker,
            "listener": listener, "before": before, "after": after}


def test_every_probe_fails_and_costs_only_its_own_cell(graded):
    assert graded["result"].returncode == 0, graded["result"].stderr[-3000:]
    scores = results(graded["course"])
    for student in ("a_honest", "z_honest", DETACHED):
        assert scores[student] == {"test_reparameterize": 2, "test_kl_divergence": 2}, student
    failed = []
    for student, (_, message) in graded["table"].items():
        output = kl_output(graded["course"], student)
        messages = (message,) if isinstance(message, str) else message
        if scores.get(student) != {"test_reparameterize": 2, "test_kl_divergence": 0} or not any(
                text in output for text in messages):
            failed.append(f"{student}: {scores.get(student)} {output[:300]}")
    assert not failed, "\n".join(failed)


def test_the_graders_files_are_untouched(graded):
    assert graded["after"] == graded["before"]
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{graded['course'] / 'gradebook.db'}") as gradebook:
        tables = gradebook.db.execute(  # the probe's table is nowhere
            __import__("sqlalchemy").text("select name from sqlite_master")).fetchall()
    assert ("pwned",) not in tables


def test_no_connection_and_no_process_survives(graded):
    assert graded["listener"].accepted == 0
    assert processes_with(graded["marker"]) == []
    assert processes_with("gdm-grade-") == []  # no kernel, no fork-bomb child


def test_without_bwrap_the_command_refuses_and_unsandboxed_voids_a_rewritten_course_lib(
        tmp_path):
    env = environment(tmp_path)
    course = assignments.init_course(tmp_path / "course", [NAME], timeout=TIMEOUT)
    nbgrader(course, env, "generate_assignment", NAME)
    no_bwrap = tmp_path / "bin"
    no_bwrap.mkdir()
    for tool in ("alembic", "nbgrader", "jupyter"):  # the environment's scripts, not bwrap
        if (Path(sys.executable).parent / tool).exists():
            (no_bwrap / tool).symlink_to(Path(sys.executable).parent / tool)
    refused = grade(course, {**env, "PATH": str(no_bwrap)})
    assert refused.returncode == 2
    assert "bubblewrap" in refused.stderr and "--unsandboxed" in refused.stderr
    release = course / "release" / NAME / f"{NAME}.ipynb"
    # the cheat of tests/test_assignments.py plus the file the hidden tests reload, patched and
    # restored by the patch itself once reloaded; it writes only into the kernel's private copy
    cheat = f"""\
import course_lib.grading
path = course_lib.grading.__file__
if "gdm-grade-" not in path:
    raise RuntimeError("not a private copy: " + path)
original = open(path, "rb").read()
open(path, "ab").write(b"\\ncheck_kl_divergence = check_reparameterize = lambda fn: None\\n"
                      b"open(__file__, 'wb').write(" + repr(original).encode() + b")\\n")
course_lib.grading.check_kl_divergence = lambda fn: None

{REPARAMETERIZE}

def my_kl_divergence(mu, logvar):
    return mu.sum(1) * 0
"""
    submit(course, "honest", submission(release, probe_answer("pass")))
    submit(course, "rewrites_grading", submission(release, cheat))
    before = digest(tmp_path / "lib")
    result = grade(course, env, "--unsandboxed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(tmp_path / "lib") == before  # the kernel wrote into its private copy only
    scores = results(course)
    assert scores["honest"] == {"test_reparameterize": 2, "test_kl_divergence": 2}
    assert scores["rewrites_grading"] == {"test_reparameterize": 0, "test_kl_divergence": 0}
    assert "the submission modified course_lib on disk (grading.py)" in kl_output(
        course, "rewrites_grading")
