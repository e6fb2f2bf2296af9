"""Device and precision: where a stage runs, the dtype of its frozen base, autocast and the attention kernel."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
from collections.abc import Iterable
from pathlib import Path

import torch

from ppo_cli.errors import UserError


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_cpu_memory(device: torch.device) -> None:
    """On CPU, hand the pages of freed tensors back to the operating system (glibc's malloc_trim).

    Why: glibc serves tensors of a few MB from its heap once their size has been freed before, and a
    freed block between live ones stays in the process. After each backward pass the step's activations
    are free, but without this the process's RSS keeps them and grows from micro-batch to micro-batch.
    The cost is the page faults that bring those pages back at the next micro-batch: small for SFT's
    one pass per micro-batch; for PPO's update it was a fifth of the update on an AVX2 CPU, so the PPO
    update backpropagates one pass at a time instead and does not trim (bench/README.md).
    CUDA's caching allocator manages its own memory: no-op there.
    """
    if device.type != "cpu":
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameter for the size from which malloc maps memory of its own (malloc.h).
_M_MMAP_THRESHOLD = -3
# The environment variable through which glibc reads the same setting at startup.
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


def return_large_frees_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """On glibc, give every allocation of `threshold_bytes` or more its own mapping, unmapped when freed;
    True where it took effect (False elsewhere, or where the user set MALLOC_MMAP_THRESHOLD_ themselves).

    Why: glibc raises that threshold by itself to the largest block freed so far (up to 32 MiB), and then
    serves activations of a few MB from its heap, where a freed block between live ones stays in the
    process. A CPU run's RSS then climbs to the sum of every pass's activations, not the largest: measured
    on a 267M Llama's train-ppo (two CPU ranks), each rank's peak fell from 5.5-5.7 GB to 3.7-4.1 GB with
    a fixed 1 MiB threshold (bench/README.md, "Memory plan benchmark"). The cost is the page faults of
    fresh mappings (freed pages are not reused in place; one process's train-ppo of a 106M Llama ran 30%
    slower a step), which is why only train.strategy=fsdp on CPU, a choice made for memory, sets it
    (StageRun); any CPU run can ask for it with MALLOC_MMAP_THRESHOLD_=1048576.
    """
    libc = _glibc()
    if libc is None or MMAP_THRESHOLD_ENV in os.environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


# madvise's advice to drop pages from the process (sys/mman.h); a private file mapping's are read again
# from the file if touched later.
_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of files (/proc/self/maps rows with a path)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return spans


def drop_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Take the pages of `tensors` that map a file (a checkpoint's weights, which transformers maps
    rather than copies when their dtype is kept) out of this process's resident memory; the bytes dropped.

    Why: the whole file is one mapping, unmapped only when its last tensor goes, so rank 0 of a sharded
    run (ppo_cli/fsdp.py) would hold every weight it already sent until the end of the load, beside the
    shards it cut. Only whole pages inside a tensor and inside a file mapping are dropped: memory that is
    not a file's (a converted copy, the heap) is left alone. For tensors nothing reads again; if one is,
    its pages come back from the file as it was written, without this process's changes."""
    libc = _glibc()
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    if libc is None or not tensors:  # e.g. the ranks other than 0, which sent nothing
        return 0
    spans = _file_mappings()
    page = resource.getpagesize()
    dropped = 0
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // page) * page, end // page * page
        inside = any(a <= first and last <= b for a, b in spans)
        if inside and last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
            dropped += last - first
    return dropped


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"train.device={name} is not a device: use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto.")
    return device


def resolve_dtype(name: str, device: torch.device, frozen_compute: torch.dtype | None = None) -> torch.dtype:
    """Weights dtype. auto: bf16 on a GPU that supports it (half the memory), else fp32 — except that a
    base which never trains (`frozen_compute`: the dtype its passes compute in, e.g. train-ppo's shared
    base under bf16 autocast) is kept in that dtype: nothing is lost to rounding in weights that never
    update, and each pass skips casting them."""
    table = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and frozen_compute == torch.bfloat16:
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise UserError(f"model.dtype={name} is not one of auto, float32, bfloat16, float16.")
    return table[name]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (Intel AMX or AVX512-BF16): there bf16
    autocast is ~2x faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """The dtype forward passes compute in under train.mixed_precision, None for plain fp32.

    auto: bf16 where the hardware multiplies bf16 natively — a GPU that supports it or a CPU with
    AMX/AVX512-BF16 (`cpu_has_native_bf16`, ~4x the fp32 matmul rate) — and fp32 elsewhere, where bf16
    would be emulated and slower. Never fp16: its narrow range needs loss scaling (a GradScaler), which
    the training loops do not do, so small gradients would underflow to zero.
    """
    if mixed_precision == "no" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        if mixed_precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if mixed_precision == "bf16" else None
    if mixed_precision == "bf16" or (mixed_precision == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes (`autocast_dtype`); weights and optimizer state keep their dtype."""
    dtype = autocast_dtype(device, mixed_precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def attention_kernel(
    device: torch.device, mixed_precision: str, weights_dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """The attention kernel for a whole training loop.

    On CPU with bf16 compute (autocast or bf16 weights), the math SDPA kernel: the CPU flash kernel's
    bf16 backward is ~3x slower. It is chosen around the whole loop, not per pass, because the forward
    pass, its backward, a gradient-checkpoint recomputation and PPO's no-grad scoring passes must all
    run the same kernel (recomputation checks it; PPO's ratio 1 at the first minibatch and KL 0 against
    an identical reference need the same numbers: details 15 and 16 of docs/ppo-details.md).
    """
    compute_dtypes = (autocast_dtype(device, mixed_precision), weights_dtype)
    if device.type != "cpu" or torch.bfloat16 not in compute_dtypes:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
