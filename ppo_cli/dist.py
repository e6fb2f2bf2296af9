"""torch.distributed in one place: one process per GPU (or CPU rank) launched by torchrun.

Single-process runs never touch torch.distributed. Under torchrun (WORLD_SIZE > 1) every rank joins a
process group (nccl on GPU, gloo on CPU); rank 0 alone writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

# Per-rank seeds are seed + rank * SEED_STRIDE (a large prime): ranks sample differently while the
# data order, seeded with the plain seed, is shared (PPO_CHECKLIST row 18).
SEED_STRIDE = 1_000_003


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not tdist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` on every rank (e.g. the run directory, so all ranks agree on it)."""
    if not info.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each metric over ranks (metrics are logged once, by rank 0)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    tdist.all_reduce(tensor)
    tensor /= info.world_size
    return dict(zip(keys, tensor.tolist()))


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank raised the flag (e.g. a stop request)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0])
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def broadcast_parameters(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Start every rank from rank 0's trainable weights (DDP does this itself; PPO syncs by hand)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for p in params:
            tdist.broadcast(p.data, src=0)


def check_in_sync(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Fail loudly if the ranks' trainable weights drifted apart (they must stay identical)."""
    if not info.enabled:
        return
    with torch.no_grad():
        fingerprint = torch.stack(
            [p.detach().double().sum() + p.detach().double().abs().sum() for p in params]
        ).cpu()
    low, high = fingerprint.clone(), fingerprint.clone()
    tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks' trainable weights differ: gradients were not synchronised")
