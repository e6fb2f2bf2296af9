"""torch.distributed in one place: one process per GPU (or CPU rank) launched by torchrun.

Single-process runs never touch torch.distributed. Under torchrun (WORLD_SIZE > 1) every rank joins a
process group (nccl on GPU, gloo on CPU); rank 0 alone writes files and prints. The rest of the package
talks to the group only through the helpers here, which send tensors on the device the backend serves
(DistInfo.device) whatever device the caller's tensors are on.

Teardown: a process that joined a group leaves it (`shutdown`) while the interpreter is still whole.
gloo runs collectives on worker threads, and a worker that releases a finished collective's tensors takes
the GIL to drop their Python objects. Should the main thread begin finalizing the interpreter meanwhile,
CPython (< 3.14) ends that worker with pthread_exit, whose unwinding reaches a noexcept C++ destructor:
the rank aborts with "terminate called without an active exception" (pytorch/pytorch#190489).
destroy_process_group joins the workers, provided it really frees the group: nothing else may still hold
it (see the torch.distributed.nn import below, and `shutdown`'s gc.collect). The command calls
`shutdown()` once it returned (ppo_cli/cli.py); any other exit (an error, Ctrl-C, the graceful stop's
SystemExit) goes through the atexit hook that init_distributed registers, which Python runs before it
finalizes.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

# torch.distributed.nn.functional binds `group.WORLD` as the default argument of its functions when first
# imported. transformers imports it lazily (its FSDP integration, on the first model or config load), after
# the group exists: those defaults would then hold the group for good, destroy_process_group could not free
# it, and its gloo threads would live on into interpreter finalization (module docstring). Imported here,
# before any group exists, the defaults are None. (A torch built without distributed support has neither.)
if tdist.is_available():
    import torch.distributed.nn  # noqa: F401

# Per-rank seeds are seed + rank * SEED_STRIDE (a large prime): ranks sample differently while the
# data order, seeded with the plain seed, is shared (docs/ppo-details.md, detail 18).
SEED_STRIDE = 1_000_003


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Where the backend takes tensors: nccl serves only CUDA tensors (a CPU one fails with "No backend
    # type associated with device type cpu"), gloo the CPU's. Every collective below sends tensors here.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

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
    if use_cuda:
        # Before the group exists: nccl's object collectives and barrier run on the current device, which
        # would otherwise be GPU 0 for every rank.
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # Whatever way the process ends, the group goes before the interpreter finalizes (module
        # docstring). Unregistered first: a second init in the same process must not add a second hook.
        atexit.unregister(_shutdown_at_exit)
        atexit.register(_shutdown_at_exit)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=backend_device(local_rank))


def backend_device(local_rank: int) -> torch.device:
    """The device whose tensors the running process group's backend takes."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` on every rank (e.g. the run directory, so all ranks agree on it)."""
    if not info.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank (e.g. each rank's RNG state)."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    tdist.all_gather_object(gathered, value)
    return gathered


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each metric over ranks (metrics are logged once, by rank 0)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    tdist.all_reduce(tensor)
    tensor /= info.world_size
    return dict(zip(keys, tensor.tolist()))


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise sum over ranks, on `tensor`'s device (e.g. sums and counts for global statistics)."""
    if not info.enabled:
        return tensor
    total = tensor.to(info.device, copy=True)
    tdist.all_reduce(total)
    return total.to(tensor.device)


def all_gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all ranks) concatenated in rank order, on `tensor`'s device."""
    if not info.enabled:
        return tensor
    local = tensor.to(info.device).contiguous()
    gathered = [torch.empty_like(local) for _ in range(info.world_size)]
    tdist.all_gather(gathered, local)
    return torch.cat(gathered).to(tensor.device)


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank raised the flag (e.g. a stop request)."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=info.device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        # nccl's barrier is a collective on a device: name this rank's rather than let it guess.
        tdist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group (module docstring): destroy_process_group, which joins gloo's threads once
    nothing else holds the group. Nothing to do without a group, or once it is gone.

    No barrier first. A training command's last collective already is one (its final checkpoint's), after
    which rank 0 alone may work on for long (final/, plots, train-ppo's final evaluation): a second barrier
    would hold the other ranks all that time, past nccl's watchdog timeout, which takes a waiting rank down
    and torchrun the whole run with it. On the way out of an error one rank
    may still be inside a collective, which a barrier would meet there (gloo pairs collectives by their
    order, not their kind: a hang or corrupt data). Leaving without one is safe: a rank past its last
    collective has nothing in flight, and what it sent still arrives after it closes its connections."""
    if not tdist.is_available() or not tdist.is_initialized():
        return
    # destroy_process_group drops torch's own references; the group, and its gloo threads, go with the
    # last one. A DDP model caught in a reference cycle (a trainer and its loop) holds one until the cycle
    # collector happens to run, possibly only during finalization: collect it now.
    gc.collect()
    tdist.destroy_process_group()


def _shutdown_at_exit() -> None:
    """atexit hook of init_distributed (see `shutdown`)."""
    # The process is exiting: its own error, if any, is already out; a failed teardown adds nothing.
    with contextlib.suppress(Exception):
        shutdown()


def _in_place(tensor: torch.Tensor, info: DistInfo, collective) -> None:
    """Run an in-place collective on `tensor` through the backend's device, writing the result back."""
    if tensor.device == info.device:
        collective(tensor)
        return
    moved = tensor.to(info.device)
    collective(moved)
    tensor.copy_(moved)


def _replicated(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters every rank holds whole. An FSDP shard (a DTensor: train.strategy=fsdp) is left to
    FSDP: it was cut from rank 0's weights, and FSDP's reduce-scatter averages its gradient already
    (all-reducing the ranks' different shards would mix them)."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)]


def broadcast_parameters(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Start every rank from rank 0's trainable weights (DDP does this itself; PPO syncs by hand)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for p in _replicated(params):
            broadcast_from_rank0(p.data, info)


def broadcast_from_rank0(tensor: torch.Tensor, info: DistInfo) -> None:
    """tensor <- rank 0's tensor (in place, through the backend's device): broadcast_parameters' step, and
    how train.strategy=fsdp sends the weights only rank 0 read, one tensor at a time."""
    if info.enabled:
        _in_place(tensor, info, lambda t: tdist.broadcast(t, src=0))


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace each gradient by its mean over ranks (a parameter without one counts as zeros)."""
    if not info.enabled:
        return
    for p in _replicated(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _in_place(p.grad, info, tdist.all_reduce)
        p.grad /= info.world_size


def check_in_sync(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Fail loudly if the ranks' trainable weights drifted apart (they must stay identical)."""
    if not info.enabled:
        return
    with torch.no_grad():
        fingerprint = torch.stack(
            [p.detach().double().sum() + p.detach().double().abs().sum() for p in params]
        ).to(info.device)
    low, high = fingerprint.clone(), fingerprint.clone()
    tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks' trainable weights differ: gradients were not synchronised")
