"""Checkpoints attacked as in issue 19: ``kill -9`` at random moments of a save and after each
of its steps, SIGTERM during ``fit(checkpoint_every=1)`` then resuming, and two processes saving
one path while a third loads it in a loop. The save protocol they attack is in the docstring of
:mod:`course_lib.checkpoint`. Child processes are forked (no interpreter start-up per trial), and
every wait is bounded."""
import multiprocessing
import os
import random
import signal
import time

import torch
from test_train import make_run

from course_lib import checkpoint
from course_lib.checkpoint import load_checkpoint, read_manifest, save_checkpoint, sha256_of
from course_lib.train import fit

FORK = multiprocessing.get_context("fork")
KILLS = int(os.environ.get("COURSE_CRASH_TRIALS", "40"))  # random kill -9 trials
SIGTERMS = 8  # fit runs stopped with SIGTERM
STEPS = 300  # steps of each of those runs
WRITES = 15  # saves per racing writer
JOIN = 60  # seconds a child may take to end after it was told to


def fork(target, *args):
    """Start a forked child running ``target(*args)`` on one thread: torch's OpenMP pool does not
    survive a fork, and a child using it would hang."""
    child = FORK.Process(target=_one_thread, args=(target, *args))
    child.start()
    return child


def _one_thread(target, *args):
    torch.set_num_threads(1)
    target(*args)


def blob(step):
    """A 4 MiB state whose every value is its step: a save takes tens of milliseconds."""
    return {"w": torch.full((1 << 20,), float(step))}


def save_blob(path, step):
    save_checkpoint(path, blob(step), arch="blob", config={}, step=step)


def loaded_step(path):
    """Load ``path``; its content must be the state saved with its step."""
    payload = load_checkpoint(path, arch="blob")
    assert torch.equal(payload["state"]["w"], blob(payload["step"])["w"])
    return payload["step"]


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_settled(path):
    """File and manifest agree, no save is half done, nothing temporary is left."""
    entry = read_manifest(path.parent)[path.name]
    assert entry["sha256"] == sha256_of(path) and "replaces" not in entry
    assert entry["step"] == loaded_step(path)
    assert temporaries(path.parent) == []


def save_forever(path, first):
    for step in range(first, first + 10**6):
        save_blob(path, step)


def kill(child):
    os.kill(child.pid, signal.SIGKILL)
    child.join(JOIN)
    assert child.exitcode == -signal.SIGKILL


def test_kill_9_at_random_moments_of_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    save_blob(path, 0)
    rng, last, outcomes = random.Random(0), 0, {"tmp left": 0, "mid-switch": 0}
    for _ in range(KILLS):
        child = fork(save_forever, path, last + 1)
        time.sleep(rng.uniform(0.0, 0.25))
        kill(child)
        step = loaded_step(path)  # never an unloadable or mixed file
        assert step >= last
        last = step
        outcomes["tmp left"] += bool(temporaries(tmp_path))
        outcomes["mid-switch"] += "replaces" in read_manifest(tmp_path)["run.pt"]
    assert last > 0  # the children did save
    save_blob(path, last + 1)  # the next save settles the manifest and deletes the leftovers
    assert_settled(path)
    print(f"{KILLS} kills: all loadable, last step {last}; {outcomes}")


def save_and_die_at(path, step, event):
    """Save, but die (as kill -9 would: no clean-up) just before the save's ``event``-th call
    of os.fsync or os.replace."""
    calls = [0]

    def hook(real):
        def call(*args):
            calls[0] += 1
            if calls[0] == event:
                os._exit(9)
            return real(*args)
        return call

    checkpoint.os.fsync, checkpoint.os.replace = hook(os.fsync), hook(os.replace)
    save_blob(path, step)
    os._exit(0)


def test_a_save_killed_before_each_of_its_disk_operations(tmp_path, monkeypatch):
    """Every instant that matters: before each fsync and rename of a save (9 of them), the old
    checkpoint or the new one loads, and the next save cleans up."""
    path = tmp_path / "run.pt"
    save_blob(path, 0)
    count = [0]
    for name in ("fsync", "replace"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real: count.__setitem__(0, count[0] + 1)
                            or real(*a))
    save_blob(path, 1)
    monkeypatch.undo()
    events, seen = count[0], []
    assert events >= 6  # file fsync, two manifest writes and the rename, each made durable
    for event in range(1, events + 2):  # events + 1: the save completes
        child = fork(save_and_die_at, path, 100 + event, event)
        child.join(JOIN)
        assert child.exitcode == (0 if event > events else 9)
        seen.append(loaded_step(path))
    assert seen[0] == 1 and seen[-1] == 100 + events + 1  # the old one, ..., the new one
    save_blob(path, 1000)
    assert_settled(path)


def train(path):
    model, opt, batches, step = make_run("cpu")
    fit(step, batches, STEPS, modules={"model": model, "opt": opt}, checkpoint=path,
        arch="mlp", checkpoint_every=1, resume=True, live_plot=False)


def test_fit_stopped_with_sigterm_resumes_to_the_uninterrupted_weights(tmp_path):
    reference, opt, batches, step = make_run("cpu")
    fit(step, batches, STEPS, modules={"model": reference, "opt": opt}, live_plot=False)
    rng, stopped_at = random.Random(1), []
    for trial in range(SIGTERMS):
        path = tmp_path / f"run{trial}.pt"
        child = fork(train, path)
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(child.pid, signal.SIGTERM)
        child.join(JOIN)
        assert child.exitcode is not None
        stopped_at.append(load_checkpoint(path)["step"] if path.exists() else 0)
        model, opt, batches, step = make_run("cpu")
        fit(step, batches, STEPS, modules={"model": model, "opt": opt}, checkpoint=path,
            arch="mlp", checkpoint_every=1, resume=True, live_plot=False)
        for a, b in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert read_manifest(tmp_path)[path.name]["step"] == STEPS
    assert any(0 < step < STEPS for step in stopped_at), stopped_at  # some stopped mid-run
    print(f"SIGTERM after steps {stopped_at}: all resumed to the uninterrupted weights")


def write(path, writer):
    for i in range(WRITES):
        save_blob(path, 1000 * writer + i)


def poll(path, stop, results):
    loads, errors = 0, []
    while not stop.is_set():
        try:
            loaded_step(path)
            loads += 1
        except Exception as e:  # noqa: BLE001 (each is reported; none expected)
            errors.append(f"{type(e).__name__}: {e}")
    results.put((loads, errors))


def test_racing_writers_and_a_polling_reader(tmp_path):
    path = tmp_path / "run.pt"
    save_blob(path, 0)
    stop, results = FORK.Event(), FORK.Queue()
    reader = fork(poll, path, stop, results)
    writers = [fork(write, path, writer) for writer in (1, 2)]
    try:
        for child in writers:
            child.join(JOIN * 2)
            assert child.exitcode == 0
    finally:
        stop.set()
        loads, errors = results.get(timeout=JOIN)
        reader.join(JOIN)
    assert errors == [] and loads > 0
    assert loaded_step(path) in (1000 + WRITES - 1, 2000 + WRITES - 1)  # one writer's last
    assert_settled(path)
    print(f"2 writers x {WRITES} saves, reader: {loads} loads, {len(errors)} errors")
