"""Freed tensors go back to the operating system on CPU after each backward pass (glibc's malloc_trim), so a
run's peak RSS is its live tensors, not every micro-batch's freed activations kept in the heap."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import run_cli_in_process

from ppo_cli.models import devices

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or devices._glibc() is None, reason="glibc only"
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_freed_holes_in_the_heap_are_returned():
    """4 MB tensors come from glibc's heap once a 4 MB block has been freed (its mmap threshold grows);
    freeing every other one leaves holes between live blocks that the heap keeps until trimmed."""
    size = 1 << 20  # fp32 elements: 4 MB
    first = torch.ones(size)
    del first  # raises glibc's mmap threshold above 4 MB
    blocks = [torch.ones(size) for _ in range(64)]
    del blocks[::2]  # 128 MB of holes between live blocks
    before = rss_bytes()
    devices.release_freed_cpu_memory(torch.device("cpu"))
    released = before - rss_bytes()
    assert released > 64 * 2**20, f"released only {released / 2**20:.0f} MiB of 128 MiB freed"
    del blocks


def test_it_is_a_no_op_off_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "_glibc", lambda: calls.append(1))
    devices.release_freed_cpu_memory(torch.device("meta"))
    assert not calls


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_sft_releases_after_every_backward_and_ppo_never(tiny, tmp_path, monkeypatch, stage):
    """SFT: once per micro-batch's backward pass (2 accumulation steps x 2 steps). PPO: never — its update
    backpropagates one pass at a time instead (PPOUpdate.train_micro), which keeps the peak where trimming
    kept it, while trimming after each backward cost a fifth of the update's time in page faults on the
    next micro-batch (bench/README.md)."""
    calls = []

    class Glibc:  # every trim, whichever module asked for it
        def malloc_trim(self, pad: int) -> None:
            calls.append(pad)

    monkeypatch.setattr(devices, "_glibc", Glibc)
    common = [
        "train.device=cpu",
        "train.max_steps=2",
        "logger.progress=false",
        "logger.plots=false",
        f"output_dir={tmp_path}",
    ]
    if stage == "sft":
        args = ["train-sft", f"model.name_or_path={tiny['model']}", f"data.train={tiny['sft']}",
                "data.eval_fraction=0", "train.batch_size=2", "train.grad_accum_steps=2"]  # fmt: skip
    else:
        args = ["train-ppo", f"model.name_or_path={tiny['model']}", f"data.train={tiny['prompts']}",
                "reward_fn=ppo_cli.tiny.task:positive_reward", "generation.max_new_tokens=4",
                "train.batch_size=4", "ppo.num_minibatches=2", "train.grad_accum_steps=2",
                "ppo.epochs=1", "sample_every=0"]  # fmt: skip
    result = run_cli_in_process(*args, *common)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert calls == ([0] * 4 if stage == "sft" else [])


_HOLES_AFTER_FREE = """
import sys, torch
from ppo_cli.models import devices
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
applied = devices.return_large_frees_to_os() if sys.argv[1] == "set" else None
first = torch.ones(1 << 20)
del first  # without the fixed threshold: glibc's own grows above 4 MB, and 4 MB tensors come from its heap
blocks = [torch.ones(1 << 20) for _ in range(64)]
before = rss()
del blocks[::2]  # 128 MB freed between live blocks
print(applied, (before - rss()) // 2**20)
"""


def holes_returned(mode: str) -> tuple[str, int]:
    """(whether the threshold was set, MiB the process gave back when 128 MB between live blocks were freed),
    in a fresh process: the setting is process-wide."""
    import os
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", _HOLES_AFTER_FREE, mode],
        capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k != devices.MMAP_THRESHOLD_ENV},
    )  # fmt: skip
    applied, released = result.stdout.split()
    return applied, int(released)


def test_a_fixed_mmap_threshold_returns_freed_blocks_at_once():
    """train.strategy=fsdp on CPU (StageRun): blocks of 1 MiB and more are unmapped when freed, so freed
    activations leave the process without a trim."""
    _, kept_by_default = holes_returned("default")
    if kept_by_default > 64:
        pytest.skip("this glibc returns the freed blocks without the setting")
    applied, released = holes_returned("set")
    assert applied == "True"
    assert released > 120, f"gave back {released} MiB of 128 MiB freed (default: {kept_by_default} MiB)"


def test_the_users_own_glibc_setting_wins(monkeypatch):
    """glibc read MALLOC_MMAP_THRESHOLD_ at startup: the run leaves it as the user set it."""
    calls = []

    class Glibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(devices, "_glibc", Glibc)
    monkeypatch.setenv(devices.MMAP_THRESHOLD_ENV, str(64 << 20))
    assert devices.return_large_frees_to_os() is False and calls == []
    monkeypatch.delenv(devices.MMAP_THRESHOLD_ENV)
    assert devices.return_large_frees_to_os() is True and calls == [(-3, 1 << 20)]


def test_a_mapped_files_pages_are_dropped_and_other_memory_is_left_alone(tmp_path):
    """fsdp's rank 0 drops the file pages of each weight it has sent (models/devices.py drop_file_pages):
    a tensor that maps a file leaves the resident memory, and reads back from the file if touched again;
    a tensor of the process's own memory is not touched."""
    import mmap

    path = tmp_path / "weights.bin"
    values = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        mapped_file = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like transformers' load
    mapped = torch.frombuffer(mapped_file, dtype=torch.float32)
    assert mapped.sum() == values.sum()  # every page resident
    own = values.clone()
    before = rss_bytes()
    dropped = devices.drop_file_pages([mapped, own])
    assert dropped >= (64 << 20) - 4096  # the mapped tensor's whole pages, none of `own`'s
    assert before - rss_bytes() > 56 << 20
    assert torch.equal(own, values) and torch.equal(mapped, values)  # read back from the file
    del mapped
    mapped_file.close()
