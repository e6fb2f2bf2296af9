#!/usr/bin/env python
"""`make bench-memory`: `ppo-cli plan`'s total against the peak RSS of real short CPU runs.

Configurations: two random-init Llamas built offline with ppo_cli.tiny (the tests' tiny model and a
~106M-parameter one with a 32k vocabulary) x fp32 and bf16 (train.mixed_precision) x train-sft and train-ppo (reward_fn, no SFT
adapter), and the same with a 4-bit base (model.load_in_4bit, fp32 compute) plus one 8-bit row; and a ~267M Llama's
train-ppo with the command's own defaults (default precision and 4-bit), two steps at lr 0. Each run
is a few optimizer steps in its own process; its peak RSS is the ru_maxrss that
the run reports (VmHWM, see `measure`), which is what the plan counts on CPU (process baseline + checkpoint load + the
training peak). The plan is asked with the same overrides. Prints plan, measured and their ratio and
writes bench/results/memory.json; the plan is meant to stay within +-20% of each.

Sharding (issue: several ranks): the ~267M Llama's train-sft and train-ppo with their defaults on two CPU
ranks under torchrun (gloo), train.strategy=ddp beside train.strategy=fsdp: each rank's peak RSS, and the
plan of one rank (`ppo-cli plan ... plan.world_size=2`, its `per_rank` total) beside the busiest rank, and
train-ppo's median s/step. On a machine with two GPUs, `--rows sharding --device cuda --model BASE` gives the
GPU rows: each rank's GPU peak (torch's max_memory_reserved) for a base of your choice, e.g. one that does
not fit one GPU under ddp (that row then records the failure).

    python bench/memory.py [--reuse] [--rows all|single|sharding] [--device cpu|cuda] [--model BASE]
                           [--checkpointing] [--out bench/results/memory.json]

--reuse takes the measurements from the previous --out file and only recomputes the plan (for
calibrating the estimator without re-running the training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = {
    # name -> build_all keyword arguments
    "tiny": {},
    # ~106M parameters, a third of them in a 32k-row embedding and lm_head: the logits count as in real models
    "llama-106m": {"hidden_size": 640, "num_layers": 10, "num_heads": 10, "vocab_multiple": 32000},
    # ~267M parameters: run with train-ppo's own defaults (batch, lengths read from the data), not the
    # short settings of the other rows
    "llama-267m": {"hidden_size": 1024, "num_layers": 12, "num_heads": 16, "vocab_multiple": 32000},
}
# Models whose rows use the command's defaults ("defaults" in the precision column)
DEFAULTS_ONLY = ("llama-267m",)
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
# quantized bases (bitsandbytes; on CPU the checkpoint loads in full precision, then quantizes)
QUANTIZED = {"4bit": "model.load_in_4bit=true", "8bit": "model.load_in_8bit=true"}


def configurations() -> list[tuple[str, str, str, str | None]]:
    """(model, stage, precision, quantization) of every row."""
    short = [m for m in MODELS if m not in DEFAULTS_ONLY]
    rows = [
        (model, stage, precision, None)
        for model in short
        for stage in ("train-sft", "train-ppo")
        for precision in PRECISIONS
    ]
    rows += [(model, stage, "fp32", "4bit") for model in short for stage in ("train-sft", "train-ppo")]
    rows.append(("llama-106m", "train-sft", "fp32", "8bit"))
    rows += [(model, "train-ppo", "defaults", q) for model in DEFAULTS_ONLY for q in (None, "4bit")]
    return rows


# Two-rank rows: (model, stage, extra overrides) x strategy, each with the command's defaults
SHARDED = [("llama-267m", "train-sft", ()), ("llama-267m", "train-ppo", ())]
# --checkpointing: train-sft with gradient checkpointing too, where the weights, not the activations, are
# most of a rank's memory
CHECKPOINTING = [("llama-267m", "train-sft", ("model.gradient_checkpointing=true",))]
STRATEGIES = ("ddp", "fsdp")


def build_models(root: Path) -> dict[str, dict[str, Path]]:
    from ppo_cli.tiny.cache import build_all

    return {name: build_all(root / name, arch="llama", **kwargs) for name, kwargs in MODELS.items()}


def command_of(
    stage: str, paths: dict[str, Path], precision: str, out: Path, quantized: str | None = None
) -> list[str]:
    if precision == "defaults":  # the command's defaults, two steps at lr 0 (the PPO invariants hold)
        data = (
            [f"data.train={paths['sft']}"]
            if stage == "train-sft"
            else [
                f"data.train={paths['prompts']}",
                "reward_fn=ppo_cli.tiny.task:positive_reward",
                "sample_every=0",
            ]
        )
        return [
            stage,
            f"model.name_or_path={paths['model']}",
            *([QUANTIZED[quantized]] if quantized else []),
            f"output_dir={out}",
            *data,
            "train.max_steps=2",
            "train.lr=0",
            "logger.progress=false",
        ]
    common = [
        f"model.name_or_path={paths['model']}",
        *([QUANTIZED[quantized]] if quantized else []),
        f"output_dir={out}",
        "train.device=cpu",
        f"train.mixed_precision={PRECISIONS[precision]}",
        "train.max_steps=2",
        "train.save_every=0",
        "train.eval_every=0",
        "train.log_every=1",
        "logger.progress=false",
    ]
    if stage == "train-sft":
        # every example is longer than 16 tokens: each micro-batch is 32 x 16
        return [
            stage,
            *common,
            f"data.train={paths['sft']}",
            "data.eval_fraction=0",
            "data.max_length=16",
            "train.batch_size=32",
        ]
    return [
        stage,
        *common,
        f"data.train={paths['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        # prompts truncated to their last 8 tokens; a random model rarely stops before 32 new tokens
        "data.max_length=8",
        "generation.max_new_tokens=32",
        "train.batch_size=16",
        "ppo.epochs=1",
        "sample_every=0",
    ]


# The run reports its own peak (each rank its own file, under torchrun): ru_maxrss of a child started from
# this (large) Python process would start at this process's peak (Linux carries it across fork and exec), while VmHWM is the peak RSS of the
# child's own address space: what ru_maxrss reports for the same command started from a shell.
_RUN_AND_REPORT = """
import atexit, os, sys
out = sys.argv[1] + os.environ.get("RANK", "")
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(out, "w").write(line.split()[1])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a GPU run: the device's peak too
        open(out + ".cuda", "w").write(str(torch.cuda.max_memory_reserved()))
atexit.register(report)
sys.argv = ["ppo-cli", *sys.argv[2:]]
from ppo_cli.cli import main
main()
"""


def measure(args: list[str]) -> int:
    """Peak RSS in bytes of `ppo-cli ARGS` (VmHWM, which Linux reports in KiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        result = subprocess.run(
            [sys.executable, "-c", _RUN_AND_REPORT, str(peak), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0 or not peak.is_file():
            raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}")
        return int(peak.read_text()) * 1024


def measure_ranks(args: list[str], ranks: int = 2) -> list[int]:
    """Each rank's peak in bytes of `ppo-cli ARGS` started by torchrun on `ranks` processes: the GPU's
    (torch's max_memory_reserved) on a GPU run, else the process's RSS (VmHWM)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        script, peak = Path(tmp) / "run.py", Path(tmp) / "peak"
        script.write_text(_RUN_AND_REPORT)
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
             f"--master_port={29500 + os.getpid() % 1000}", str(script), str(peak), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False,
        )  # fmt: skip
        files = [Path(f"{peak}{rank}") for rank in range(ranks)]
        if result.returncode != 0 or not all(f.is_file() for f in files):
            raise SystemExit(
                f"torchrun {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
            )
        gpu = [Path(f"{f}.cuda") for f in files]
        if all(f.is_file() for f in gpu):
            return [int(f.read_text()) for f in gpu]
        return [int(f.read_text()) * 1024 for f in files]


def median_step_seconds(run_dir: Path) -> float | None:
    """The median of a run's logged step times (train-ppo's time/step), None where it logs none."""
    import statistics

    path = run_dir / "metrics.jsonl"
    times = (
        [json.loads(line).get("time/step") for line in path.read_text().splitlines()]
        if path.is_file()
        else []
    )
    times = [t for t in times if t is not None]
    return round(statistics.median(times), 3) if times else None


def sharded_rows(
    models: dict,
    tmp: Path,
    previous: dict,
    device: str = "cpu",
    model: str | None = None,
    configurations: list[tuple[str, str, tuple[str, ...]]] = SHARDED,
) -> list[dict]:
    """DDP beside FSDP on two ranks: each rank's peak and the plan of one rank. `model`: another base for
    these rows (a local directory or a Hub id, e.g. one that does not fit one GPU under ddp) instead of
    the ~267M Llama; `device`: cuda on a machine with two GPUs (the plan is then a GPU's)."""
    rows = []
    for model_name, stage, extra in configurations:
        paths = dict(models[model_name], **({"model": model} if model else {}))
        for strategy in STRATEGIES:
            name = (
                f"{model or model_name} {stage}"
                + (" checkpointing" if extra else "")
                + f" 2 ranks {strategy}"
            )
            name += " cuda" if device == "cuda" else ""
            out = tmp / name.replace(" ", "-").replace("/", "_")
            args = [*command_of(stage, paths, "defaults", out), *extra, f"train.strategy={strategy}"]
            try:
                measured = previous.get(name) or measure_ranks(args)
            except SystemExit as failure:  # e.g. out of GPU memory under ddp: the row says so
                print(f"{name}: failed\n{str(failure)[-1500:]}", flush=True)
                rows.append({"name": name, "command": args, "failed": str(failure)[-1500:]})
                continue
            plan_args = [a for a in args[1:] if not a.startswith("output_dir=")]
            plan_args += [f"plan.device={device}"] if device != "cpu" else []
            plan = plan_of([args[0], *plan_args, "plan.world_size=2"])["per_rank"]
            ratio = plan["total_bytes"] / max(measured)
            rows.append(
                {
                    "name": name,
                    "command": args,
                    "measured_bytes": measured,  # per rank
                    "plan_bytes": plan["total_bytes"],
                    "ratio": round(ratio, 3),  # against the busiest rank
                    "parts": plan["parts"],
                    "median_step_s": median_step_seconds(out),
                }
            )
            peaks = " / ".join(f"{m / 2**20:7.1f}" for m in measured)
            print(
                f"{name:<40} plan {plan['total_bytes'] / 2**20:8.1f} MiB  measured (rank 0 / 1) {peaks} MiB  "
                f"ratio {ratio:.2f}",
                flush=True,
            )
    return rows


def plan_of(args: list[str]) -> dict:
    """`ppo-cli plan ARGS --json` on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ppo_cli", "plan", *args, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"ppo-cli plan {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--reuse", action="store_true", help="reuse the measurements in --out")
    parser.add_argument(
        "--rows", choices=("all", "single", "sharding"), default="all", help="one process, two ranks, or both"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the two-rank rows' device")
    parser.add_argument("--model", default=None, help="the two-rank rows' base (default: the ~267M Llama)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="two-rank train-sft rows with gradient checkpointing too"
    )
    opts = parser.parse_args()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    previous = {}
    if opts.reuse and opts.out.is_file():
        saved = json.loads(opts.out.read_text())
        previous = {r["name"]: r["measured_bytes"] for r in saved["runs"] + saved.get("sharding", [])}
    models = build_models(HERE / "results" / "memory-models")
    rows, sharding = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.rows in ("all", "sharding"):
            configurations = SHARDED + (CHECKPOINTING if opts.checkpointing else [])
            sharding = sharded_rows(models, Path(tmp), previous, opts.device, opts.model, configurations)
        for model_name, stage, precision, quantized in configurations() if opts.rows != "sharding" else []:
            name = f"{model_name} {stage} {precision}" + (f" {quantized}" if quantized else "")
            args = command_of(
                stage, models[model_name], precision, Path(tmp) / name.replace(" ", "-"), quantized
            )
            measured = previous.get(name) or measure(args)
            plan = plan_of(args[:1] + [a for a in args[1:] if not a.startswith("output_dir=")])
            ratio = plan["total_bytes"] / measured
            rows.append(
                {
                    "name": name,
                    "command": args,
                    "measured_bytes": measured,
                    "plan_bytes": plan["total_bytes"],
                    "ratio": round(ratio, 3),
                    "parts": plan["parts"],
                }
            )
            print(
                f"{name:<33} plan {plan['total_bytes'] / 2**20:8.1f} MiB  measured "
                f"{measured / 2**20:8.1f} MiB  ratio {ratio:.2f}",
                flush=True,
            )
    if opts.rows != "all" and opts.out.is_file():  # keep the other rows of the previous file
        saved = json.loads(opts.out.read_text())
        rows, sharding = rows or saved.get("runs", []), sharding or saved.get("sharding", [])
    worst = max(abs(r["ratio"] - 1) for r in rows + sharding if "ratio" in r)
    report = {"runs": rows, "sharding": sharding, "worst_relative_error": round(worst, 3)}
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"worst |plan/measured - 1| = {worst:.2f}; wrote {opts.out}")


if __name__ == "__main__":
    main()
