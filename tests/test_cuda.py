"""What only a GPU shows: bf16 on CUDA, fp32 trainable weights there, a 4-bit base on CUDA, the CUDA RNG state
in checkpoints, and NCCL. `make gpu-check` runs these (`pytest -m cuda`); without CUDA every test is skipped.

The stages run on the session's tiny Llama, a few steps each, on the first GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli_in_process
from omegaconf import OmegaConf
from ppo_helpers import assert_never_moved, assert_resumed_identically, kill_and_resume, tiny_adapters

from ppo_cli import checkpoint as ckpt
from ppo_cli import models

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

CUDA = torch.device("cuda")
ON_CUDA = ["train.device=cuda", "logger.progress=false", "logger.plots=false"]


def first_rows(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def run(*args: str) -> None:
    result = run_cli_in_process(*args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def stage_commands(tiny: dict, root: Path, *extra: str) -> dict[str, list[str]]:
    """SFT (2 steps), the RM from it (2 steps) and PPO from both at train.lr=0 (2 steps) on CUDA, with
    `extra` overrides on every stage, writing into root/<stage>."""
    sft, prefs = (
        first_rows(tiny["sft"], 16, root / "sft.jsonl"),
        first_rows(tiny["prefs"], 16, root / "prefs.jsonl"),
    )
    stages = {
        "sft": ["train-sft", f"model.name_or_path={tiny['model']}", f"data.train={sft}", "data.eval_fraction=0",
                "train.batch_size=4"],
        "rm": ["train-rm", f"sft_checkpoint={root / 'sft' / 'final'}", f"data.train={prefs}",
               "data.eval_fraction=0", "train.batch_size=4"],
        "ppo": ["train-ppo", f"sft_checkpoint={root / 'sft' / 'final'}", f"data.train={tiny['prompts']}",
                f"reward_checkpoint={root / 'rm' / 'final'}", "train.lr=0", "train.batch_size=4",
                "generation.max_new_tokens=6", "ppo.epochs=2", "ppo.num_minibatches=2", "sample_every=0"],
    }  # fmt: skip
    common = ["train.max_steps=2", *ON_CUDA, *extra]
    return {stage: [*args, *common, f"output_dir={root / stage}"] for stage, args in stages.items()}


def trainable_dtypes(output_dir: Path) -> set[torch.dtype]:
    _, path = ckpt.list_checkpoints(output_dir)[-1]
    trainable = ckpt.load_checkpoint(path).trainable
    assert trainable
    return {t.dtype for t in trainable.values()}


def ppo_metrics(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "objective/kl" in m]


# ---------------------------------------------------------------------------------------------
# bf16: what mixed_precision=auto and model.dtype=auto pick on a GPU, and what trains


def test_auto_precision_is_bf16_on_a_bf16_gpu():
    """auto means bf16 autocast and a bf16 frozen base on a GPU that multiplies bf16 natively."""
    assert torch.cuda.is_bf16_supported(), torch.cuda.get_device_name()
    assert models.autocast_dtype(CUDA, "auto") == torch.bfloat16
    assert models.resolve_dtype("auto", CUDA) == torch.bfloat16


@pytest.fixture(scope="module")
def bf16_runs(tiny, tmp_path_factory) -> dict:
    """The three stages with their defaults on CUDA (mixed_precision=auto, model.dtype=auto), recording per
    stage the dtypes its autocasts asked for."""
    root = tmp_path_factory.mktemp("bf16")
    asked: list[torch.dtype | None] = []
    real = models.devices.autocast_dtype

    def spy(device, setting):
        asked.append(real(device, setting))
        return asked[-1]

    autocasts = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.devices, "autocast_dtype", spy)
        for stage, args in stage_commands(tiny, root).items():
            run(*args)
            autocasts[stage], asked[:] = list(asked), []
    return {"root": root, "autocast": autocasts}


def test_every_stage_runs_under_bf16_autocast_with_fp32_trainable_weights(bf16_runs):
    """Every stage's passes ran under bf16 autocast, and what the optimizer stepped (each stage's
    checkpoint: adapters, the RM's score head, PPO's value head) is fp32."""
    for stage in ("sft", "rm", "ppo"):
        assert torch.bfloat16 in bf16_runs["autocast"][stage], (stage, bf16_runs["autocast"][stage])
        run_dir = bf16_runs["root"] / stage
        assert OmegaConf.load(run_dir / "config.yaml").train.mixed_precision == "auto"
        assert trainable_dtypes(run_dir) == {torch.float32}, stage


def test_ppo_lr0_never_moves_under_bf16_on_cuda(bf16_runs):
    """Ratio 1 and KL 0 exactly at every step with bf16 autocast on a bf16 base (docs/ppo-details.md,
    details 15 and 16), on the GPU's kernels."""
    metrics = ppo_metrics(bf16_runs["root"] / "ppo")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_never_moved(metrics)
    assert all(
        0 < m["memory/peak_mb"] < torch.cuda.get_device_properties(0).total_memory / 2**20 for m in metrics
    )


# ---------------------------------------------------------------------------------------------
# 4-bit


def test_every_stage_trains_on_a_4bit_base_on_cuda(tiny, tmp_path):
    """model.load_in_4bit on CUDA (bitsandbytes' GPU kernels): SFT, RM and PPO train fp32 adapters, and
    PPO at lr 0 never moves through the 4-bit layers."""
    for args in stage_commands(tiny, tmp_path, "model.load_in_4bit=true").values():
        run(*args)
    for stage in ("sft", "rm", "ppo"):
        assert OmegaConf.load(tmp_path / stage / "config.yaml").model.load_in_4bit is True
        assert trainable_dtypes(tmp_path / stage) == {torch.float32}, stage
    metrics = ppo_metrics(tmp_path / "ppo")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_never_moved(metrics, first_ratio=False)


# ---------------------------------------------------------------------------------------------
# The CUDA RNG state in checkpoints


def test_a_killed_ppo_run_on_cuda_resumes_bit_exact(tiny, tmp_path, monkeypatch):
    """Rollouts sample from the CUDA generator, so a run killed (SIGKILL) after its step-2 checkpoint (of 6
    steps: a GPU runs a tiny step in a fraction of a second, and the kill must come before the end) and
    resumed ends with exactly the uninterrupted run's adapters, value head and metrics only if the
    checkpoint restores the CUDA RNG state, which it holds. Deterministic cuBLAS and eager attention keep
    kernel nondeterminism from hiding the RNG's part."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    adapters = tiny_adapters(tiny)
    common = [
        f"data.train={tiny['prompts']}", f"sft_checkpoint={adapters['sft']}",
        f"reward_checkpoint={adapters['rm']}", "train.max_steps=6", "train.save_every=2", "train.lr=3e-3",
        "train.batch_size=4", "generation.max_new_tokens=6", "ppo.epochs=2", "ppo.missing_eos_score=null",
        "model.attn_implementation=eager", "sample_every=0", *ON_CUDA,
    ]  # fmt: skip
    args = {name: ["train-ppo", *common, f"output_dir={tmp_path / name}"] for name in ("A", "B")}
    runs = kill_and_resume(args["A"], args["B"], tmp_path, deadline_s=300)
    _, path = ckpt.list_checkpoints(tmp_path / "A")[0]
    loaded = ckpt.load_checkpoint(path)
    rng = ckpt.rank_rng(loaded.state, loaded.objects, 0)
    assert rng["cuda"] and rng["cuda"][0].numel() > 0, "no CUDA RNG state in the checkpoint"
    assert_resumed_identically(runs)


# ---------------------------------------------------------------------------------------------
# NCCL

# torchrun with one process: WORLD_SIZE=1, where ppo-cli itself never joins a group. The worker joins an
# nccl group as init_distributed would, then runs every collective helper of ppo_cli.dist through it, with
# tensors on the CPU (the helpers move them to the backend's device and back).
_NCCL_WORKER = """
import torch, torch.distributed as tdist
from ppo_cli import dist

torch.cuda.set_device(0)
tdist.init_process_group(backend="nccl")
assert tdist.get_backend() == "nccl" and tdist.get_world_size() == 1
device = dist.backend_device(0)
assert device == torch.device("cuda", 0), device


class OneRank(dist.DistInfo):
    enabled = property(lambda self: True)  # the helpers skip their collectives for a single rank otherwise


info = OneRank(rank=0, world_size=1, local_rank=0, device=device)
values = torch.arange(4.0)
assert dist.all_reduce_mean({"a": 2.0, "b": -1.0}, info) == {"a": 2.0, "b": -1.0}
total = dist.all_reduce_sum(values, info)
assert torch.equal(total, values) and total.device.type == "cpu"
assert torch.equal(dist.all_gather_cat(values, info), values)
assert dist.any_flag(True, info) and not dist.any_flag(False, info)
assert dist.broadcast_object({"run": "dir"}, info) == {"run": "dir"}
assert dist.all_gather_object(7, info) == [7]
param = torch.nn.Parameter(torch.ones(3))
param.grad = torch.full((3,), 2.0)
dist.average_gradients([param], info)
assert torch.equal(param.grad, torch.full((3,), 2.0))
dist.broadcast_parameters([param], info)
dist.check_in_sync([param], info)
dist.barrier(info)
dist.shutdown()
assert not tdist.is_initialized()
print("NCCL", ".".join(map(str, torch.cuda.nccl.version())), "collectives ok")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_collectives_with_one_rank(tmp_path):
    """One torchrun rank in an nccl group: the backend is nccl and every helper's collective runs on the GPU
    and hands CPU tensors back on the CPU."""
    worker = tmp_path / "nccl_worker.py"
    worker.write_text(_NCCL_WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += ["--master_port", str(_free_port()), str(worker)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "collectives ok" in result.stdout
