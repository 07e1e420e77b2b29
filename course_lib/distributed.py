"""Data-parallel training under ``torchrun`` (PyTorch DistributedDataParallel).

    torchrun --nproc_per_node=4 -m course_lib.diffusion train      # 4 processes, one node
    python -m course_lib.diffusion train                           # the same code, 1 process

torchrun starts N copies of the command and tells each its ``RANK`` and ``WORLD_SIZE``. Every
rank builds the same model from the same seed and draws the same *global* batch (the same
images, diffusion steps and noise); :func:`shard` keeps its 1/N slice. DDP averages the
gradients over the ranks after ``backward``, so each rank takes the optimizer step a single
process would take on the whole batch, and the weights stay identical everywhere. Only rank 0
shows progress and writes checkpoints. Backend: NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that logs and saves (rank 0, or the only process)."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group torchrun set up (nothing to do in a single process). Each rank
    uses GPU ``LOCAL_RANK`` on a multi-GPU node."""
    if world_size() == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU under torchrun, else ``device``."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else unchanged."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous 1/N of a global batch [B, ...] (B divisible by N)."""
    n = world_size()
    if len(x) % n:
        raise ValueError(f"the global batch of {len(x)} does not split evenly over {n} "
                         f"processes; choose a batch size divisible by {n}")
    size = len(x) // n
    return x[rank() * size:(rank() + 1) * size]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over the ranks (the loss of the global batch, for logging)."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def check_in_sync(model: nn.Module) -> None:
    """Raise unless every rank holds bit-identical weights (compared by an all-gathered
    checksum of the parameters)."""
    if world_size() == 1:
        return
    vector = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    checksum = torch.stack([vector.sum(), (vector * torch.arange(len(vector),
                                                                 device=vector.device)).sum()])
    gathered = [torch.empty_like(checksum) for _ in range(world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"the ranks' weights differ after training: checksums "
                           f"{[g.tolist() for g in gathered]}")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
