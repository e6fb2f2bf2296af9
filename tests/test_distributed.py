"""Two CPU ranks with torchrun (gloo): SFT and PPO run, ranks stay in sync, rank 0 alone writes."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from ppo_helpers import cli_env

from ppo_cli import dist
from ppo_cli.dist import DistInfo, check_in_sync

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    *args: str,
    cwd: Path,
    env: dict | None = None,
    timeout: float = 600,
    entry: tuple[str, ...] = ("-m", "ppo_cli"),
) -> subprocess.CompletedProcess:
    """`ppo-cli ARGS` on two CPU ranks (`entry`: what torchrun starts, e.g. a script that runs ppo_cli). On
    timeout (e.g. ranks stuck in unmatched collectives) the whole process group goes, workers included,
    and the test fails."""
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
        *entry,
        *args,
        "logger.progress=false",
        "logger.plots=false",
    ]
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _first_rows(path: Path, n: int, dest: Path) -> Path:
    dest.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return dest


def test_sft_two_ranks(tiny, tmp_path):
    out = tmp_path / "sft"
    # 9 examples, 4 per rank: each epoch's second global batch has 1 example left, which a short batch
    # would hand to rank 0 alone (rank 1's slice empty).
    data = _first_rows(tiny["sft"], 9, tmp_path / "sft9.jsonl")
    result = torchrun(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={data}",
        "data.eval_fraction=0",
        f"output_dir={out}",
        "train.max_steps=4",
        "train.save_every=2",
        "train.batch_size=4",
        "train.eval_every=0",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # check_in_sync runs at every checkpoint: reaching final/ means the ranks' weights were identical.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # rank 0 alone writes: one config, one metrics line per logged step, one summary on the console
    assert [m["step"] for m in _metrics(out) if "loss" in m] == [4]
    assert result.stdout.count("train-sft finished") == 1


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_two_ranks(tiny, tmp_path, estimator):
    """GAE-PPO, and GRPO with 2 samples per prompt (no critic: only the policy's gradients are averaged)."""
    out = tmp_path / "ppo"
    samples = 1 if estimator == "gae" else 2
    result = torchrun(
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        f"data.train={tiny['prompts']}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.save_every=1",
        "train.batch_size=4",
        "generation.max_new_tokens=6",
        f"ppo.advantage_estimator={estimator}",
        f"generation.samples_per_prompt={samples}",
        "sample_every=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    # episodes count responses over both ranks
    assert metrics[-1]["episode"] == 2 * 4 * samples * 2
    assert metrics[0]["objective/kl"] == 0.0


def test_ppo_two_ranks_cross_an_epoch_boundary_with_equal_rows(tiny, tmp_path):
    """25 prompts, 8 per rank: step 2 ends the data epoch with 9 prompts. Every rank must still roll out 8
    rows, or the ranks run different numbers of minibatches and their collectives no longer match."""
    data = _first_rows(tiny["prompts"], 25, tmp_path / "prompts25.jsonl")
    rows_log = tmp_path / "rows"
    result = torchrun(
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        "reward_fn=ppo_rewards:record_rows",
        f"data.train={data}",
        f"output_dir={tmp_path / 'ppo'}",
        "train.max_steps=3",
        "train.save_every=0",
        "train.batch_size=8",
        "ppo.num_minibatches=2",
        "ppo.epochs=1",
        "generation.max_new_tokens=4",
        "sample_every=0",
        cwd=tmp_path,
        env=cli_env(PPO_TEST_ROWS_LOG=str(rows_log)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {rank: Path(f"{rows_log}.{rank}").read_text().split() for rank in (0, 1)}
    assert rows == {0: ["8", "8", "8"], 1: ["8", "8", "8"]}, rows


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


# ------------------------------------------------------------------------------------------- teardown
# Every rank leaves its process group before the interpreter finalizes (ppo_cli/dist.py): a gloo worker
# thread still alive then may take the GIL to drop a finished collective's tensor, which CPython answers
# with pthread_exit inside a C++ destructor, and the rank aborts with "terminate called without an active
# exception" (seen once in CI, in test_ppo_two_ranks_cross_an_epoch_boundary_with_equal_rows).

# In the scripts below, registered before ppo_cli.dist's hook: each process reports its threads after the
# teardown (atexit runs its callbacks last-registered first).
_REPORT_THREADS_AT_EXIT = """
import atexit, os, sys

def _threads_at_exit():
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    print("threads at exit:", sorted(names), file=sys.stderr, flush=True)

atexit.register(_threads_at_exit)
"""

_EXIT_PATHS = (
    """
import atexit, os, sys

how, rank = sys.argv[1], int(os.environ["RANK"])
if how == "collective_in_flight" and rank == 1:
    import ctypes

    # Registered first, so the last thing before finalization, holding the GIL throughout (a PyDLL call
    # never releases it): a gloo worker that finishes meanwhile can only take the GIL once the
    # interpreter is finalizing. Without ppo_cli.dist's teardown, this run aborted every time.
    atexit.register(ctypes.PyDLL(None).usleep, 3_000_000)
"""
    + _REPORT_THREADS_AT_EXIT
    + """
import time

import torch
import torch.distributed as tdist

from ppo_cli import dist

info = dist.init_distributed("cpu")
dist.check_in_sync([torch.nn.Parameter(torch.ones(3))], info)  # a checkpoint's collectives
dist.barrier(info)
if how == "command_returns":  # what ppo_cli/cli.py does once the command returned, on every rank
    dist.shutdown()
elif how == "graceful_stop":  # the loop's stop: a checkpoint (ending in a barrier), then SystemExit
    raise SystemExit(130)
elif how == "one_rank_fails":  # rank 1 fails (its atexit hook leaves the group), rank 0 completes
    if rank == 1:
        raise RuntimeError("rank 1 failed after the last collective")
    dist.shutdown()
elif how == "collective_in_flight":  # rank 1 leaves with an all_reduce running; rank 0 joins it late
    if rank == 0:
        time.sleep(0.5)
        tdist.all_reduce(torch.ones(4))
    else:
        tensor = torch.ones(4)
        tdist.all_reduce(tensor, async_op=True)
        del tensor  # now owned by the gloo work alone
"""
)


def _gloo_threads_at_exit(stderr: str) -> list[str]:
    """The gloo threads (pt_gloo_runloop, gloo_tcp_loop) in a process's `threads at exit:` report."""
    line = next(line for line in stderr.splitlines() if "threads at exit:" in line)
    return [t for t in ast.literal_eval(line.split("threads at exit:", 1)[1].strip()) if "gloo" in t]


def _two_ranks(script: Path, *args: str, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """`python SCRIPT ARGS` as ranks 0 and 1 of a gloo group (torchrun's environment), run to the end of
    each process: not torch.multiprocessing, whose children leave with os._exit, skipping finalization.
    Each rank's output (stdout and stderr, into a file: a full pipe would stall the ranks) is its
    CompletedProcess's stderr."""
    env = {**cli_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    logs = [script.parent / f"rank{rank}.log" for rank in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), *args],
                    cwd=script.parent,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return [
        subprocess.CompletedProcess(proc.args, code, "", log.read_text())
        for proc, code, log in zip(procs, codes, logs, strict=True)
    ]


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names in /proc")


@needs_proc
@pytest.mark.parametrize(
    ("how", "exit_codes"),
    [
        ("command_returns", [0, 0]),
        ("graceful_stop", [130, 130]),
        ("one_rank_fails", [0, 1]),
        ("collective_in_flight", [0, 0]),
    ],
)
def test_every_exit_leaves_the_group_before_the_interpreter_finalizes(tmp_path, how, exit_codes):
    """Both ranks exit right after their last collective, along each way out of a command: no gloo
    thread is left when the interpreter finalizes, and no rank aborts."""
    script = tmp_path / "exit_paths.py"
    script.write_text(_EXIT_PATHS)
    ranks = _two_ranks(script, how)
    assert [r.returncode for r in ranks] == exit_codes, [r.stderr[-3000:] for r in ranks]
    for rank in ranks:
        assert "terminate called" not in rank.stderr, rank.stderr[-3000:]
        assert _gloo_threads_at_exit(rank.stderr) == [], rank.stderr[-3000:]


@needs_proc
def test_train_command_leaves_no_gloo_thread_to_the_interpreter_finalization(tiny, tmp_path):
    """The real command on two ranks (train-sft: transformers, DDP). destroy_process_group alone left the
    gloo threads running here: the group stayed referenced by torch.distributed.nn's default arguments
    (imported by transformers once the group existed) and by the DDP model (in a reference cycle)."""
    wrapper = tmp_path / "ppo_cli_reporting_threads.py"
    wrapper.write_text(
        _REPORT_THREADS_AT_EXIT
        + "import runpy\n"
        + "sys.argv = ['ppo_cli', *sys.argv[1:]]\n"
        + "runpy.run_module('ppo_cli', run_name='__main__', alter_sys=True)\n"
    )
    result = torchrun(
        "train-sft",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['sft']}",
        f"output_dir={tmp_path / 'sft'}",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.eval_every=0",
        cwd=tmp_path,
        entry=(str(wrapper),),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stderr.splitlines() if "threads at exit:" in line]
    assert len(reports) == 2, result.stderr[-3000:]
    assert [_gloo_threads_at_exit(line) for line in reports] == [[], []], reports


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


# ------------------------------------------------------------------------- collectives and devices
# nccl serves only CUDA tensors: a CPU tensor in a collective fails there ("No backend type associated
# with device type cpu") although gloo takes it. So every collective goes through ppo_cli.dist, whose
# helpers move tensors to DistInfo.device; these tests hold both halves of that rule without a GPU.

PACKAGE = Path(dist.__file__).parent
TENSOR_COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
}


def _uses_torch_distributed(tree: ast.AST) -> list[int]:
    """Lines that import or name torch.distributed (DDP, from torch.nn.parallel, does not count)."""

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            return [f"{node.module}.{a.name}" for a in node.names]
        return [ast.unparse(node)] if isinstance(node, ast.Attribute) else []

    return [
        node.lineno
        for node in ast.walk(tree)
        if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names(node))
    ]


# ppo_cli/fsdp.py shards with FSDP2 (torch.distributed.fsdp, device_mesh, tensor): its collectives are
# FSDP's and DTensor's own, on the mesh's device, and it sends no tensor through torch.distributed itself.
MAY_USE_TORCH_DISTRIBUTED = {"dist.py", "fsdp.py"}


def test_only_dist_module_talks_to_torch_distributed():
    offenders = {
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in PACKAGE.rglob("*.py")
        if str(path.relative_to(PACKAGE)) not in MAY_USE_TORCH_DISTRIBUTED
        for line in _uses_torch_distributed(ast.parse(path.read_text()))
    }
    assert not offenders, f"torch.distributed used outside ppo_cli/dist.py (use its helpers): {offenders}"


def test_fsdp_module_issues_no_collective_of_its_own():
    """fsdp.py may name torch.distributed's FSDP and DTensor APIs, never a collective: those go through
    dist.py's helpers, which send tensors on the backend's device."""
    from ppo_cli import fsdp

    source = Path(fsdp.__file__).read_text()
    called = {
        node.func.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not called & TENSOR_COLLECTIVES, called & TENSOR_COLLECTIVES


class _Reached(Exception):
    """Raised by the stand-in collectives: the helper got as far as talking to the process group."""


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _helper_calls(info: DistInfo) -> dict:
    def params():
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        return [p]

    return {
        "all_reduce_mean": lambda: dist.all_reduce_mean({"loss": 1.0}, info),
        "any_flag": lambda: dist.any_flag(True, info),
        "all_reduce_sum": lambda: dist.all_reduce_sum(torch.ones(3, dtype=torch.float64), info),
        "all_gather_cat": lambda: dist.all_gather_cat(torch.ones(3), info),
        "broadcast_parameters": lambda: dist.broadcast_parameters(params(), info),
        "broadcast_from_rank0": lambda: dist.broadcast_from_rank0(torch.ones(3), info),
        "average_gradients": lambda: dist.average_gradients(params(), info),
        "check_in_sync": lambda: dist.check_in_sync(params(), info),
    }


def test_every_helper_collective_sends_tensors_on_the_backend_device(monkeypatch):
    """A non-CPU DistInfo.device (meta stands in for cuda here): each helper's first collective must get
    its tensors there, never on the CPU where they were made."""
    seen: dict[str, set] = {}

    def stand_in(name):
        def collective(*args, **kwargs):
            seen[name] = {t.device for t in _tensors([*args, *kwargs.values()])}
            raise _Reached

        return collective

    for name in TENSOR_COLLECTIVES:
        monkeypatch.setattr(tdist, name, stand_in(name), raising=False)
    info = DistInfo(rank=1, world_size=2, device=torch.device("meta"))
    for helper, call in _helper_calls(info).items():
        seen.clear()
        with pytest.raises(_Reached):
            call()
        assert seen and all(devices == {info.device} for devices in seen.values()), (helper, seen)


def test_every_collective_in_dist_is_a_helper_under_test():
    """A new helper in dist.py that issues a tensor collective must join the device test above."""
    tree = ast.parse(Path(dist.__file__).read_text())
    issuing = {
        fn.name
        for fn in tree.body
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Attribute)
        and node.attr in TENSOR_COLLECTIVES
        and isinstance(node.value, ast.Name)
        and node.value.id == "tdist"
    }
    assert issuing and issuing <= set(_helper_calls(DistInfo())), issuing - set(_helper_calls(DistInfo()))


def _device_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    info = dist.init_distributed("cpu")
    try:
        grads = [torch.nn.Parameter(torch.zeros(2))]
        grads[0].grad = torch.full((2,), float(rank))
        dist.average_gradients(grads, info)
        results[rank] = {
            "device": str(info.device),
            "mean": dist.all_reduce_mean({"x": float(rank)}, info)["x"],
            "flag": dist.any_flag(rank == 1, info),
            "sum": dist.all_reduce_sum(torch.tensor([1.0, rank]), info).tolist(),
            "cat": dist.all_gather_cat(torch.tensor([float(rank)]), info).tolist(),
            "grad": grads[0].grad.tolist(),
            "whitened_as_one_process": _whitening_matches_one_process(info),
        }
    finally:
        dist.shutdown()


def _whitening_matches_one_process(info: DistInfo) -> bool:
    """PPO's advantage whitening over two ranks' rows equals whitening all rows in one process."""
    from ppo_cli.ppo.step import whiten_advantages
    from ppo_cli.rlhf import masked_whiten

    adv = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    mine = whiten_advantages(adv[info.rank :: 2], mask[info.rank :: 2], info)
    return torch.allclose(mine, masked_whiten(adv, mask)[info.rank :: 2], atol=1e-6)


def test_helpers_on_two_gloo_ranks():
    """The helpers' results on a real (gloo) group, and the device init_distributed picked for it."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_device_worker, args=(_free_port(), results), nprocs=2, join=True)
    expected = {
        "device": "cpu",
        "mean": 0.5,
        "flag": True,
        "sum": [2.0, 1.0],
        "cat": [0.0, 1.0],
        "grad": [0.5, 0.5],
        "whitened_as_one_process": True,
    }
    assert dict(results) == {0: expected, 1: expected}


def test_init_on_gpus_sets_each_rank_device_before_the_nccl_group(monkeypatch):
    """nccl's object collectives (broadcast_object) and barrier run on the current CUDA device: it must be
    the rank's own before the group starts, and DistInfo.device must name it. (No GPU needed: the CUDA and
    process-group calls are recorded, not made.)"""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(tdist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(tdist, "get_backend", lambda: "nccl")
    info = dist.init_distributed("auto")
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert info == DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
