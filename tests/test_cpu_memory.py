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
    common = ["train.device=cpu", "train.max_steps=2", "logger.progress=false", f"output_dir={tmp_path}"]
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
