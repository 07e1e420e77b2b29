"""The DDPM training command under torchrun: 2 CPU processes (gloo) against 1 process with the
same global batch."""
import subprocess
import sys

import pytest
import torch

from course_lib.checkpoint import load_checkpoint
from course_lib.distributed import shard

TINY = ["--model.base", "8", "--model.channel-mults", "1", "2", "--model.attention-resolutions",
        "14"]


def train(tmp_path, name, launcher):
    out, run = tmp_path / f"{name}.pt", tmp_path / name / "train.pt"
    command = [*launcher, "-m", "course_lib.experiments.ddpm", "train", "--steps", "4",
               "--batch-size", "8", *TINY, "--threads", "1", "--out", str(out), "--train-state",
               str(run)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_checkpoint(run)["state"], done.stdout


def test_torchrun_two_processes_match_one_process(tmp_path):
    one, _ = train(tmp_path, "one", [sys.executable])
    two, stdout = train(tmp_path, "two", [sys.executable, "-m", "torch.distributed.run",
                                          "--standalone", "--nproc_per_node=2"])
    assert "(2 process(es))" in stdout  # rank 0 reported, after check_in_sync passed
    assert stdout.count("saved") == 1  # and only rank 0
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(two["history"]["values"]["loss"]),
                               torch.tensor(one["history"]["values"]["loss"]), rtol=1e-4, atol=0)
    assert len(one["history"]["steps"]) == 4


def test_shard_splits_the_global_batch(monkeypatch):
    x = torch.arange(8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in ((0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])):
        monkeypatch.setenv("RANK", str(rank))
        assert shard(x).tolist() == expected
    with pytest.raises(ValueError, match="divisible by 2"):
        shard(torch.arange(7))
