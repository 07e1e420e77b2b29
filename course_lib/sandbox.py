"""Autograding untrusted submissions: every submission's kernel in a bubblewrap sandbox.

``nbgrader autograde`` runs a student's code with the grader's permissions: a submission can
read the other submissions, rewrite ``gradebook.db``, append to ``nbgrader_config.py``, patch
``course_lib`` and leave processes running. ``python -m course_lib.assignments autograde
ASSIGNMENT`` (:func:`autograde`) is nbgrader's own autograder, with one change: its ``Execute``
step is :class:`SandboxedExecute`, whose kernels :class:`SandboxedKernelManager` starts inside
`bubblewrap <https://github.com/containers/bubblewrap>`_ (``bwrap``, Debian's ``bubblewrap``).

Only the kernel is sandboxed. nbgrader itself (sanitizing the submission, restoring the test
cells from the gradebook, reading the executed cells' outputs, recording the scores, writing
``autograded/``) runs outside, in the grader's process, and talks to the kernel over Unix
sockets in a folder of their own. The kernel sees:

- read-only: ``/usr``, ``/etc``, the Python installation and its environment, the ``course_lib``
  package the grader imported, the course's ``data/`` (checkpoints) and ``$COURSE_DATA_DIR``;
- writable: a scratch copy of its own submission folder (``/submission``, the working
  directory), an empty ``/tmp`` and an empty home (``$HOME`` = ``/home/student``), both size-capped
  tmpfs;
- nothing else: no other submission, no ``gradebook.db``, no ``nbgrader_config.py``, no home
  directory of the grader's, no network (a network namespace with only its own loopback), no
  other process (a PID namespace);

with resource limits set inside the sandbox before the kernel starts (:class:`Limits`): address
space (RLIMIT_AS), processes and threads (RLIMIT_NPROC, counted per user namespace since Linux
5.14; when the grader is root, RLIMIT_NPROC does not bind root, so each kernel runs as a user id
of its own, and its processes are killed by that id afterwards), file size
and no core dumps; and a wall-time cap per submission after which the sandbox is killed. When the
kernel ends, the sandbox's PID namespace ends with it (``--die-with-parent``): no process a
submission started, detached or not, outlives its grading. A cell past ``Execute.timeout`` is
interrupted and scores 0, as with nbgrader; a submission past the wall-time cap, or one whose
kernel dies (``os._exit``, out of memory), keeps the points of the cells that ran before, and
every cell after gets an error that says why.

``--unsandboxed`` grades without isolation, for submissions one trusts, but still gives each
kernel a private copy of ``course_lib`` and checks it afterwards (:func:`fingerprint`: content,
inode and change time of every file, so a file rewritten and restored counts too): a submission
that modified it scores 0 on every test cell, so rewriting ``course_lib/grading.py`` cannot pass
the hidden tests. Nothing else is protected there.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import DeadKernelError
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute
from nbgrader.utils import is_grade, is_solution
from traitlets import Float, Integer, Unicode

import course_lib
from course_lib.runtime import REPO_ROOT

PACKAGE = "bubblewrap"
INSTALL = (f"install the {PACKAGE} package: `apt-get install {PACKAGE}` (Debian, Ubuntu), "
           f"`dnf install {PACKAGE}` (Fedora, RHEL), `pacman -S {PACKAGE}` (Arch), "
           f"`zypper install {PACKAGE}` (openSUSE); macOS and Windows have no bubblewrap: grade "
           f"on Linux (a VM or WSL 2)")
UNSANDBOXED = ("or, only for submissions you trust, grade without isolation: add --unsandboxed")
HOME = "/home/student"
SUBMISSION = "/submission"
UIDS = (2_000_000_000, 100_000_000)  # root grader: each kernel gets a user id of its own here

# Run inside the sandbox (``python -I -c``): set the rlimits, drop root, exec the kernel.
_LIMIT_AND_EXEC = """\
import json, os, resource, sys
settings = json.loads(sys.argv[1])
for name, value in settings["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if settings["uid"] is not None and os.getuid() == 0:
    os.setgroups([])
    os.setgid(settings["uid"])
    os.setuid(settings["uid"])
os.execv(sys.argv[2], sys.argv[2:])
"""


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot create its namespaces here; the message says what to do."""


@dataclass(frozen=True)
class Limits:
    """What one submission's kernel may use: ``memory_gb`` of address space (torch with its
    libraries maps about 2 GB before any tensor), ``processes`` (threads count: keep it above
    the kernel's thread pools, about 2 per core), ``wall`` seconds for the whole notebook, files
    up to ``file_mb``, and ``tmp_mb`` for each of /tmp and the home directory."""

    memory_gb: float = 8.0
    processes: int = 512
    wall: int = 1800
    file_mb: int = 1024
    tmp_mb: int = 512

    def rlimits(self) -> dict[str, int]:
        return {"RLIMIT_AS": int(self.memory_gb * 2 ** 30), "RLIMIT_NPROC": self.processes,
                "RLIMIT_FSIZE": self.file_mb * 2 ** 20, "RLIMIT_CORE": 0}


def _python_roots() -> list[Path]:
    """The folders the kernel's Python needs: the environment and the installation it runs on."""
    roots = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots.add(Path(os.path.realpath(sys.executable)).parent.parent)
    return sorted(roots)


def _package_dir() -> Path:
    """The course_lib package the grader imported (the editable clone's, or an installed one)."""
    return Path(course_lib.__file__).resolve().parent


def bwrap_arguments(submission: Path, sockets: Path, limits: Limits) -> list[str]:
    """bwrap's options (everything before the command) for a kernel whose working directory is
    ``submission`` (bound writable at /submission) and whose Unix sockets live in ``sockets``
    (bound at the same path, where the grader connects)."""
    args = ["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:  # no user namespace: the kernel drops to a user id of its own
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    args += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = Path("/", name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    args += ["--ro-bind", "/etc", "/etc", "--ro-bind-try", "/sys/devices/system/cpu",
             "/sys/devices/system/cpu", "--proc", "/proc", "--dev", "/dev"]
    size = str(limits.tmp_mb * 2 ** 20)
    args += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp",
             "--perms", "0777", "--size", size, "--tmpfs", HOME]
    read_only = [*_python_roots(), _package_dir()]
    data = REPO_ROOT / "data"
    if data.is_dir():
        read_only.append(data)
    if os.environ.get("COURSE_DATA_DIR"):
        read_only.append(Path(os.environ["COURSE_DATA_DIR"]).expanduser().resolve())
    bound, made = [Path("/usr"), Path("/etc")], {Path("/"), Path("/tmp"), Path(HOME)}

    def bind(option: str, source: Path, target: Path) -> list[str]:
        # bwrap makes missing parent folders 0700: a kernel not running as root could not pass
        parents = [parent for parent in reversed(target.parents) if parent not in made
                   and not any(b == parent or b in parent.parents for b in bound)]
        made.update(parents)
        bound.append(target)
        return [*(arg for parent in parents for arg in ("--perms", "0755", "--dir", str(parent))),
                option, str(source), str(target)]

    for path in read_only:
        args += bind("--ro-bind", path, path)
    args += [*bind("--bind", submission, Path(SUBMISSION)), *bind("--bind", sockets, sockets),
             "--chdir", SUBMISSION, "--clearenv"]
    for name, value in _kernel_environment().items():
        args += ["--setenv", name, value]
    return args


def _kernel_environment() -> dict[str, str]:
    """The sandboxed kernel's whole environment: nbgrader's and the course's switches, the
    course_lib the grader uses first on the path, and nothing of the grader's (no tokens)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
           "HOME": HOME, "USER": "student", "LOGNAME": "student", "TMPDIR": "/tmp",
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(_package_dir().parent), "COURSE_ROOT": str(REPO_ROOT),
           "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    for name in ("NBGRADER_EXECUTION", "NBGRADER_VALIDATING", "COURSE_QUICK", "COURSE_DATA_DIR",
                 "COURSE_DEVICE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND",
                 "TQDM_DISABLE", "PYTHONHASHSEED"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def sandbox_uid() -> int | None:
    """A fresh user id for one sandboxed kernel when the grader is root (None otherwise): the
    process limit counts per user, and a kernel's dying processes must not count against the
    next one."""
    return UIDS[0] + secrets.randbelow(UIDS[1]) if os.geteuid() == 0 else None


def limited_command(command: list[str], limits: Limits, uid: int | None) -> list[str]:
    """``command`` started through :data:`_LIMIT_AND_EXEC`: the rlimits, then, as root, the
    user id ``uid`` (None: keep the user)."""
    settings = {"rlimits": limits.rlimits(), "uid": uid}
    return [sys.executable, "-I", "-c", _LIMIT_AND_EXEC, json.dumps(settings), *command]


_checked: dict[str, str] = {}


def check_sandbox() -> str:
    """The path of a bwrap that works here, after a trial run of the sandbox the kernels get
    (namespaces, mounts, limits, no network); raises SandboxUnavailable saying what to do."""
    if "bwrap" in _checked:
        return _checked["bwrap"]
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"sandboxed grading needs bubblewrap (bwrap), which is not on "
                                 f"the PATH: {INSTALL}; {UNSANDBOXED}.")
    probe = ("import socket, ipykernel\n"
             "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
             "except OSError:\n    print('isolated')\n")
    with tempfile.TemporaryDirectory(prefix="gdm-sandbox-check-") as folder:
        uid = sandbox_uid()
        submission, sockets = _scratch_folders(Path(folder), uid)
        command = [bwrap, *bwrap_arguments(submission, sockets, Limits()),
                   *limited_command([sys.executable, "-c", probe], Limits(), uid)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise SandboxUnavailable(f"a trial run of {bwrap} did not finish in 300 s; "
                                     f"{UNSANDBOXED}.") from None
    if result.returncode != 0 or result.stdout.strip() != "isolated":
        raise SandboxUnavailable(
            f"{bwrap} is installed but cannot run the sandbox here (exit {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-600:]}). bubblewrap needs user "
            f"namespaces: enable unprivileged ones (sysctl kernel.unprivileged_userns_clone=1 "
            f"on Debian; on Ubuntu 24.04 the bwrap AppArmor profile), or in a container grant "
            f"them (docker run --security-opt seccomp=unconfined --cap-add SYS_ADMIN); "
            f"{UNSANDBOXED}.")
    _checked["bwrap"] = bwrap
    return bwrap


def _scratch_folders(root: Path, uid: int | None) -> tuple[Path, Path]:
    """root/submission and root/sockets, writable by the kernel's user ``uid`` (None: the
    grader's) and reachable by bwrap."""
    submission, sockets = root / "submission", root / "sockets"
    for folder in (submission, sockets):
        folder.mkdir(exist_ok=True)
    root.chmod(0o711)
    if uid is not None:
        for folder in (submission, sockets):
            os.chown(folder, uid, uid)
    return submission, sockets


def kill_user(uid: int, patience: float = 30.0) -> None:
    """SIGKILL every process of user ``uid`` until none is left (``patience`` seconds at most):
    the sandbox's PID namespace is torn down by the kernel in the background, and grading goes
    on only once it is gone."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                lines = status.read_text().splitlines()
            except OSError:
                continue
            uids = next((line.split()[1:] for line in lines if line.startswith("Uid:")), [])
            if str(uid) in uids:
                found.append(int(status.parent.name))
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: (inode, change time, size, sha256 of a file's
    bytes). The change time (ctime) cannot be set back, so a file rewritten and restored, or
    replaced by a copy, has a different fingerprint."""
    found = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = (info.st_ino, info.st_ctime_ns, info.st_size, digest)
    return found


class SandboxedKernelManager(AsyncKernelManager):
    """Starts the kernel in bubblewrap (``bwrap`` set) or, unsandboxed (``bwrap`` empty), with a
    private copy of course_lib; in both cases with the :class:`Limits`, in a scratch copy of the
    notebook's folder, and killed after ``wall`` seconds. Afterwards ``stopped_by`` says why the
    grader ended the kernel ("" if it did not) and ``tampered`` lists the files of the private
    course_lib the submission modified (unsandboxed; always empty in the sandbox, where
    course_lib is read-only)."""

    bwrap = Unicode("", help="bwrap's path; empty: no sandbox").tag(config=True)
    memory_gb = Float(Limits.memory_gb, help="address space of a kernel, GB").tag(config=True)
    processes = Integer(Limits.processes, help="processes and threads of a kernel").tag(
        config=True)
    wall = Integer(Limits.wall, help="seconds a submission may take in all").tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scratch = Path(tempfile.mkdtemp(prefix="gdm-grade-"))
        self.uid = sandbox_uid() if self.bwrap else None
        self.submission, sockets = _scratch_folders(self.scratch, self.uid)
        self.transport = "ipc"  # Unix sockets: the kernel has no network to listen on
        self.ip = str(sockets / "kernel")
        self.connection_file = str(sockets / "kernel.json")
        self.stopped_by = ""
        self.tampered: list[str] = []
        self._timer: threading.Timer | None = None
        self._private: tuple[Path, dict] | None = None

    @property
    def limits(self) -> Limits:
        return Limits(memory_gb=self.memory_gb, processes=self.processes, wall=self.wall)

    async def _async_pre_start_kernel(self, **kwargs):
        folder = Path(kwargs.get("cwd") or Path.cwd())
        shutil.copytree(folder, self.submission, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.ipynb"))  # the notebook is sent cell by cell
        if self.uid is not None:
            for path in [self.submission, *self.submission.rglob("*")]:
                os.lchown(path, self.uid, self.uid)
        env = dict(kwargs.get("env") or os.environ)
        if self.bwrap:
            # SIGINT to the kernel's process group would stop bwrap: interrupt by message
            self.kernel_spec.interrupt_mode = "message"
        else:
            library = self.scratch / "lib"
            shutil.copytree(_package_dir(), library / "course_lib",
                            ignore=shutil.ignore_patterns("__pycache__"))
            self._private = (library / "course_lib", fingerprint(library / "course_lib"))
            env["PYTHONPATH"] = os.pathsep.join(
                [str(library), *filter(None, [env.get("PYTHONPATH")])])
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            env.setdefault("COURSE_ROOT", str(REPO_ROOT))
        # ipykernel prints a banner to stdout; the kernel's stderr stays the grader's
        kwargs.update(cwd=str(self.submission), env=env, stdout=subprocess.DEVNULL)
        command, kwargs = await super()._async_pre_start_kernel(**kwargs)
        if self.uid is not None:  # written 0600 for root
            os.chown(self.connection_file, self.uid, self.uid)
        return command, kwargs

    def format_kernel_cmd(self, extra_arguments=None):
        kernel = limited_command(super().format_kernel_cmd(extra_arguments), self.limits,
                                 self.uid)
        if not self.bwrap:
            return kernel
        return [self.bwrap, *bwrap_arguments(self.submission, Path(self.ip).parent,
                                             self.limits), *kernel]

    async def _async_launch_kernel(self, kernel_cmd, **kwargs):
        await super()._async_launch_kernel(kernel_cmd, **kwargs)
        self._timer = threading.Timer(self.wall, self._stop, [
            f"grading stopped: the submission ran past the wall-time cap of {self.wall} s"])
        self._timer.daemon = True
        self._timer.start()

    def _stop(self, reason: str) -> None:
        """Kill the kernel's process group (bwrap, and with it the sandbox's PID namespace)."""
        self.stopped_by = reason
        try:
            os.killpg(self.provisioner.pgid, signal.SIGKILL)
        except (AttributeError, ProcessLookupError, PermissionError, TypeError):
            pass

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        if restart or not self.scratch.exists():
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.uid is not None:
            kill_user(self.uid)
        if self._private is not None:
            library, before = self._private
            after = fingerprint(library)
            self.tampered = sorted(name for name in before.keys() | after.keys()
                                   if before.get(name) != after.get(name))
        shutil.rmtree(self.scratch, ignore_errors=True)

    cleanup_resources = _async_cleanup_resources


def _error(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                        traceback=[f"{ename}: {evalue}"])


class SandboxedExecute(Execute):
    """nbgrader's Execute with kernels from :class:`SandboxedKernelManager`. A kernel that dies
    or is stopped (wall-time cap) ends the run without failing the submission: the cells that
    ran keep their outputs, each later code cell gets an error that says why, and nbgrader
    scores what is there. Unsandboxed, a submission that modified its private course_lib gets
    an error in every test cell."""

    def __init__(self, **kwargs):
        kwargs.setdefault("kernel_manager_class", SandboxedKernelManager)
        super().__init__(**kwargs)
        self._manager: SandboxedKernelManager | None = None
        self._stopped = ""

    def create_kernel_manager(self):
        self._manager = super().create_kernel_manager()
        return self._manager

    def preprocess(self, nb, resources=None, km=None):
        self._stopped = ""
        nb, resources = super().preprocess(nb, resources, km)
        if self._manager is not None and self._manager.tampered:
            reason = (f"the submission modified course_lib on disk "
                      f"({', '.join(self._manager.tampered[:5])}): no points for any test")
            for cell in nb.cells:
                if is_grade(cell) and not is_solution(cell):
                    cell.outputs.append(_error("TamperingError", reason))
        return nb, resources

    def preprocess_cell(self, cell, resources, index):
        if self._stopped:
            if cell.cell_type == "code":
                cell.outputs = [_error("NotRun", f"not run: {self._stopped}")]
            return cell, self.resources
        try:
            return super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._stopped = (self._manager and self._manager.stopped_by) or (
                "the kernel died (the submission ended its own process, e.g. with os._exit, "
                "or it was killed for exceeding a limit)")
            cell.outputs.append(_error("DeadKernelError", self._stopped))
            return cell, self.resources


def autograde(assignment: str, student: str | None = None, sandboxed: bool = True,
              timeout: int | None = None, limits: Limits = Limits(), force: bool = False) -> None:
    """``nbgrader autograde ASSIGNMENT [--student STUDENT] [--force]`` in the current folder
    (the course directory), with :class:`SandboxedExecute` in place of nbgrader's Execute, its
    kernels sandboxed (``sandboxed``; SandboxUnavailable where bwrap cannot run) or not, and
    ``timeout`` seconds per cell in place of the course's ``c.Execute.timeout``."""
    from nbgrader.apps import AutogradeApp
    from nbgrader.converters import Autograde
    from traitlets.config import Config

    config = Config()
    config.SandboxedKernelManager.bwrap = check_sandbox() if sandboxed else ""
    config.SandboxedKernelManager.memory_gb = limits.memory_gb
    config.SandboxedKernelManager.processes = limits.processes
    config.SandboxedKernelManager.wall = limits.wall
    steps = Autograde.class_traits()["autograde_preprocessors"].default()
    config.Autograde.autograde_preprocessors = [SandboxedExecute if step is Execute else step
                                                for step in steps]
    if timeout is not None:
        config.Execute.timeout = timeout
    argv = [assignment, *([f"--student={student}"] if student else []),
            *(["--force"] if force else [])]
    app = AutogradeApp()
    app.initialize(argv)
    app.update_config(config)
    app.start()
