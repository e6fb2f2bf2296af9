"""The speed regression guard: `python bench/run.py --against REV` (and `make bench`, against the merge base).

Runs bench/run.py's train-ppo command (the same model, prompts and settings) from two trees side by side on
this machine: REV, checked out in a temporary git worktree, and the working tree. The runs alternate
(REV, working, REV, working, ...) so that a machine that slows down or speeds up during the benchmark
moves both alike. Per phase — generate, score, train, the whole step, and start-up (the command's wall
time less its steps: imports, model loading, teardown) — it prints the median over every measured step of
every repeat, and the ratio REV / working tree (above 1: the working tree is faster).

Both trees run in this interpreter's environment: a REV that needs other packages is not comparable.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = {
    "generate": "time/generate",
    "score": "time/score",
    "train": "time/train",
    "step": "time/step",
}


def cpu_description() -> dict[str, str | int | bool]:
    """The CPU model, the matmul-relevant flags, torch's version and thread count: every figure names them,
    as the same code is 4x apart between CPUs with and without bf16 matmuls."""
    import torch

    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu": model,
        "cores": os.cpu_count() or 0,
        "amx": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx2": "avx2" in flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def describe_cpu(info: dict) -> str:
    flags = [name for name in ("amx", "avx512_bf16", "avx2") if info.get(name)]
    return (
        f"{info['cpu']} ({info['cores']} cores; {', '.join(flags) or 'no AVX2'}), torch {info['torch']}, "
        f"{info['threads']} threads"
    )


def worktree(rev: str, parent: Path) -> Path:
    """REV checked out (detached) under `parent`; the caller removes it with `remove_worktree`."""
    path = parent / "against"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), rev],
        check=True,
        capture_output=True,
        text=True,
    )
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def timed_run(cmd: list[str], tree: Path, out: Path) -> dict:
    """One train-ppo run of `tree`'s code: its metrics per step and the command's wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"train-ppo failed in {tree}:\n{result.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "metrics": [m for m in metrics if "time/step" in m]}


def phase_medians(runs: list[dict], warmup: int) -> dict[str, float]:
    """Median of each phase over the measured steps of every run; start-up: the median over runs of the
    wall time less the steps' time; peak_mb: the largest peak memory."""
    out = {}
    for phase, key in PHASES.items():
        out[phase] = statistics.median(m[key] for r in runs for m in r["metrics"][warmup:])
    out["start-up"] = statistics.median(r["wall"] - sum(m["time/step"] for m in r["metrics"]) for r in runs)
    out["peak_mb"] = max(m["memory/peak_mb"] for r in runs for m in r["metrics"])
    return out


def compare(
    rev: str, command: Callable[[Path], list[str]], repeats: int, warmup: int, work: Path
) -> dict[str, dict[str, float]]:
    """{"rev": phases, "working tree": phases, "ratio": REV / working tree per phase}."""
    tree = worktree(rev, work)
    try:
        runs: dict[str, list[dict]] = {"rev": [], "working tree": []}
        for i in range(repeats):
            for side, root in (("rev", tree), ("working tree", REPO)):
                out = work / f"{side.replace(' ', '-')}-{i}"
                runs[side].append(timed_run(command(out), root, out))
                print(f"  {side} run {i + 1}/{repeats}: {runs[side][-1]['wall']:.1f} s", file=sys.stderr)
    finally:
        remove_worktree(tree)
    result = {side: phase_medians(r, warmup) for side, r in runs.items()}
    result["ratio"] = {k: result["rev"][k] / result["working tree"][k] for k in result["rev"]}
    return result


def print_comparison(rev: str, label: str, result: dict, info: dict) -> None:
    print(f"{label}: {rev} beside the working tree on {describe_cpu(info)}")
    print(f"{'phase':12}{rev[:12]:>14}{'working tree':>14}{'ratio':>8}")
    for phase in (*PHASES, "start-up", "peak_mb"):
        unit = " MB" if phase == "peak_mb" else " s"
        a, b, r = result["rev"][phase], result["working tree"][phase], result["ratio"][phase]
        print(f"{phase:12}{a:12.2f}{unit:2}{b:12.2f}{unit:2}{r:7.2f}x")
    print("ratio = REV / working tree: above 1, the working tree is faster (or smaller)")


def run_against(rev: str, args, command: Callable[[Path], list[str]]) -> dict:
    """bench/run.py --against REV: the comparison, printed and written to args.out."""
    info = cpu_description()
    with tempfile.TemporaryDirectory(prefix="ppo-bench-against-") as tmp:
        result = compare(rev, command, args.repeats, args.warmup, Path(tmp))
    result["machine"] = info
    result["rev"]["name"] = rev
    print_comparison(rev, "train-ppo per phase, medians", result, info)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    return result
