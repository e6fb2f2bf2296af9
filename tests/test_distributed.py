"""Two CPU ranks with torchrun (gloo): SFT and PPO run, ranks stay in sync, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from ppo_cli.dist import DistInfo, check_in_sync

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "ppo_cli",
        *args,
        "logger.progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_two_ranks(tiny, tmp_path):
    out = tmp_path / "sft"
    result = torchrun(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        f"output_dir={out}",
        "train.max_steps=4",
        "train.save_every=2",
        "train.batch_size=4",
        "train.eval_every=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # check_in_sync runs at every checkpoint: reaching final/ means the ranks' weights were identical.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # rank 0 alone writes: one config, one metrics line per logged step, one summary on the console
    assert [m["step"] for m in _metrics(out) if "loss" in m] == [4]
    assert result.stdout.count("train-sft finished") == 1


def test_ppo_two_ranks(tiny, tmp_path):
    out = tmp_path / "ppo"
    result = torchrun(
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        "reward_fn=ppo_cli.tiny:positive_reward",
        f"data.train={tiny['prompts']}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.save_every=1",
        "train.batch_size=4",
        "generation.max_new_tokens=6",
        "sample_every=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    # episodes count prompts over both ranks
    assert metrics[-1]["episode"] == 2 * 4 * 2
    assert metrics[0]["objective/kl"] == 0.0


def test_default_output_dir_is_shared_by_ranks(tiny, tmp_path):
    """Without output_dir, each rank would resolve its own timestamp: rank 0's must win."""
    result = torchrun(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.eval_every=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "sft").iterdir())
    assert len(runs) == 1, runs
    assert (runs[0] / "final").is_dir()


def _sync_worker(rank: int, port: int, same: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        value = 1.0 if same or rank == 0 else 1.5
        params = [torch.nn.Parameter(torch.full((3,), value))]
        try:
            check_in_sync(params, DistInfo(rank=rank, world_size=2))
            results[rank] = "ok"
        except RuntimeError:
            results[rank] = "diverged"
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_check_in_sync_detects_divergence(same):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_sync_worker, args=(_free_port(), same, results), nprocs=2, join=True)
    assert set(results.values()) == ({"ok"} if same else {"diverged"})
