#!/usr/bin/env python
"""`make gpu-check`: every GPU claim of the README checked by one offline command on one GPU, in under 8
minutes, into one table (gpu-check.json and gpu-check.md in --out).

Why one prepared command: GPU time is scarce and the machines often have no internet. Everything is built
here (random-init models of Qwen2.5-0.5B's and ~1.5B's shape, the tiny task's data), nothing comes from the
Hub, and the project's missing dependencies come from `wheelhouse/` (`make wheelhouse`, on a machine with
internet). The machine's own CUDA torch is used.

Parts (each run has a time budget; no run starts or goes on past --budget seconds from the start):

- cuda-tests: `pytest -m cuda` (tests/test_cuda.py): bf16 on CUDA (mixed_precision=auto), trainable weights
  fp32, a 4-bit base on CUDA, the CUDA RNG state in checkpoints (resume bit-exact), NCCL with one rank.
- memory: `ppo-cli plan ... --json` against the peak of the same run (torch.cuda.max_memory_allocated, read
  when the run's process exits) for train-sft / train-rm / train-ppo at 0.5B, bf16 and 4-bit, and train-ppo at
  1.5B; the bound is +-20%.
- vllm (when vLLM is importable): new tokens/s of hf and vLLM with a LoRA policy at 0.5B (the goal: vLLM
  >= 5x hf), vLLM's logprobs of its samples against the training model's before and after a sleep/wake
  cycle (the adapter must still apply), and train-ppo with generation.engine=vllm (the sampler gap).
- speed: train-ppo s/step against TRL 1.12's PPOTrainer on the same 0.5B model and settings (bench/run.py's),
  and train-ppo with ppo.advantage_estimator=grpo.

Correctness rows gate the exit status (1 when one fails, errs or runs out of time); speed rows are reported,
never failures. `--device cpu --tiny` is the dry run (`make gpu-check DEVICE=cpu`): the same parts at tiny
sizes on CPU; what needs CUDA or vLLM says "skipped", the CPU stand-ins run and report (plan against peak RSS,
s/step), and nothing measured there gates except the dry run's own plumbing.

    python bench/gpu_check.py [--device cuda|cpu] [--tiny] [--out DIR] [--parts cuda-tests,memory,vllm,speed]
                              [--budget 470] [--cache DIR] [--no-install] [--inject-failure]

Only the standard library is imported before the dependencies are checked (and installed from the wheelhouse).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELHOUSE = REPO / "wheelhouse"
PARTS = ("cuda-tests", "memory", "vllm", "speed")
# Import names of what ppo-cli and this check need; all but torch come from the wheelhouse when missing.
NEEDED_MODULES = (
    "torch",
    "transformers",
    "peft",
    "hydra",
    "omegaconf",
    "rich",
    "datasets",
    "safetensors",
    "tokenizers",
    "bitsandbytes",
    "matplotlib",
    "tensorboard",
    "wandb",
    "pytest",
)
MEMORY_BOUND = 0.20  # |plan / peak - 1|
VLLM_SPEED_GOAL = 5.0  # vLLM's new tokens/s over hf's, ~0.5B model with a LoRA policy
LOGPROB_BOUND = 0.05  # nats per token, bf16 engine against the bf16 training model
TRL_VERSION = "1.12.0"
MIN_JOB_SECONDS = 5.0  # a run that would get less is not started


# -------------------------------------------------------------------------------------------------
# Rows, the clock and child processes


@dataclass
class Row:
    """One figure of the table. `gating`: a correctness check, whose fail, error or timeout fails the run."""

    part: str
    name: str
    value: float | str | None
    unit: str
    bound: str
    status: str  # pass, fail, measured, skipped, error, timeout
    gating: bool
    note: str = ""


def skipped(part: str, names: list[str], reason: str) -> list[Row]:
    """Rows for checks that cannot run here (no CUDA, no vLLM, no TRL): said, never counted as failures."""
    return [Row(part, name, None, "", "", "skipped", False, reason) for name in names]


def judged(ok: bool) -> str:
    """A bound's verdict in the table's words."""
    return "pass" if ok else "fail"


class Clock:
    """The whole check's deadline: every run gets at most its own budget and never more than what is left."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def timeout(self, job_budget: float) -> float:
        return max(0.0, min(job_budget, self.budget - self.elapsed()))


def child_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """Offline, quiet children that import ppo_cli from this tree whether or not it is installed."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> int | None:
    """Run `cmd` in the repository with its output in `log`; its exit code, or None when it ran past
    `timeout`. A run out of time loses its whole process group: torchrun and vLLM start children."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def last_line(log: Path) -> str:
    """The last non-empty line of a log: what a failed run said last, for the table's note."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300]


def failed_run(part: str, name: str, rc: int | None, log: Path, gating: bool) -> Row:
    """A run that crashed or ran out of time: its last words and its log's name, so that the table says
    where to look."""
    status = "timeout" if rc is None else "error"
    note = "ran out of its time budget" if rc is None else f"exit {rc}: {last_line(log)}"
    return Row(part, name, None, "", "", status, gating, f"{note} (log: {log.name})")


def fresh(run_dir: Path) -> Path:
    """`run_dir` emptied: a run directory left by an earlier check would be resumed (resume=auto)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl: what ppo-cli itself measured (s/step, the sampler gap)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@dataclass
class Job:
    """One run of a part: `run(timeout)` returns its rows; `names` are the rows it stands for when it cannot
    start (out of time) or raises."""

    part: str
    names: list[str]
    budget_s: float  # 0: runs nothing (e.g. says why it is skipped), needs no time
    run: Callable[[float], list[Row]]
    gating: bool = True


def execute(job: Job, clock: Clock) -> list[Row]:
    """A job under the deadline: not started with under MIN_JOB_SECONDS left, an exception is an error row."""
    timeout = clock.timeout(job.budget_s)
    if job.budget_s and timeout < MIN_JOB_SECONDS:  # a check that never ran is not a pass
        note = "not started: the whole check's budget was spent"
        return [Row(job.part, name, None, "", "", "timeout", job.gating, note) for name in job.names]
    try:
        return job.run(timeout)
    except Exception as exc:  # noqa: BLE001 - one job's failure is one row, the others still run
        note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return [Row(job.part, name, None, "", "", "error", job.gating, note[:300]) for name in job.names]


def run_jobs(jobs: list[Job], clock: Clock, workers: int) -> list[Row]:
    """Jobs side by side (`workers` at a time), rows in the jobs' order. Only what is not timed shares the
    device; timed runs go one at a time (workers=1)."""
    if workers <= 1:
        return [row for job in jobs for row in execute(job, clock)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda job: execute(job, clock), jobs))
    return [row for rows in results for row in rows]


# -------------------------------------------------------------------------------------------------
# Dependencies: the wheelhouse


def missing_modules() -> list[str]:
    """What of NEEDED_MODULES cannot be imported, found without importing anything (nothing is loaded yet)."""
    importlib.invalidate_caches()
    return [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]


def ensure_installed(wheelhouse: Path) -> str:
    """Install the project and its missing dependencies from `wheelhouse` (no index: the GPU machine may have
    no internet) unless all are importable already; torch is never installed, the machine's CUDA build is."""
    missing = missing_modules()
    if not missing:
        return "dependencies already importable: nothing installed"
    if "torch" in missing:
        raise SystemExit("gpu-check: torch is not installed; it uses the machine's own CUDA build of torch.")
    if not wheelhouse.is_dir():
        raise SystemExit(
            f"gpu-check: {', '.join(missing)} missing and no {wheelhouse}: run `make wheelhouse` on a machine "
            "with internet and copy wheelhouse/ here."
        )
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse)]
    result = subprocess.run([*cmd, "-e", str(REPO), "pytest"], capture_output=True, text=True)
    still = missing_modules()
    if result.returncode != 0 or still:
        raise SystemExit(
            f"gpu-check: installing from {wheelhouse} failed ({still}):\n{result.stderr[-3000:]}"
        )
    return f"installed from {wheelhouse.name}/: {', '.join(missing)}"


def version_of(dist: str) -> str | None:
    """An installed distribution's version for the table, without importing it (vLLM's import takes
    seconds)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------------
# Sizes and models


@dataclass
class Sizes:
    """What a mode runs: the models of the memory rows, the runs' batch sizes and lengths, PPO steps."""

    memory_models: tuple[str, ...]
    sft_batch: int
    rm_batch: int
    ppo_batch: int
    new_tokens: int
    speed_warmup: int
    speed_steps: int
    workers: int  # runs side by side where nothing is timed
    threads: int | None  # OMP_NUM_THREADS of each child (CPU: the cores shared by the runs side by side)


FULL = Sizes(("0.5B", "1.5B"), 16, 8, 16, 64, 1, 3, 4, None)
TINY = Sizes(("tiny",), 8, 4, 4, 8, 1, 1, 2, 1)


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    out: Path
    cache: Path
    cuda: bool
    vllm: bool
    models: dict[str, str] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(self.sizes.threads, **extra)


def build_shaped_model(spec_file: Path, out_dir: Path, tokenizer_dir: str, device: str) -> str:
    """A random-init Qwen2 of the shape in `spec_file` (bf16), with the bench tokenizer; built once. Its
    weights are drawn on `device` (a GPU draws 1.5B parameters in a second; a CPU takes far longer)."""
    spec = json.loads(spec_file.read_text())
    stamp = out_dir / "gpu_check_spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return str(out_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        **spec,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp.write_text(json.dumps(spec))  # written last: marks the build complete
    return str(out_dir)


def with_pad_token(model_dir: Path) -> str:
    """The tiny model's tokenizer given a pad token in a spare embedding row (TRL's PPOTrainer pads with it
    and needs one; the tiny tokenizer has none on purpose), as Qwen's real tokenizers have."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def build_models(ctx: Context) -> None:
    """Every model and file the parts need, built locally: the tiny Llama and its task data (--tiny), or
    bench/engines.py's Qwen2.5-0.5B-shaped model and a ~1.5B one (bench/configs/) on the bench tokenizer."""
    if not {"memory", "vllm", "speed"} & set(ctx.args.parts):  # the cuda tests build their own
        return
    from bench.run import build_rm_adapter
    from bench.trl_baseline import make_prompt_dataset
    from ppo_cli.tiny.data import write_task_data

    if ctx.args.tiny:
        from ppo_cli.tiny.cache import build_all

        paths = build_all(ctx.cache / "tiny", arch="llama", vocab_multiple=64)
        ctx.models = {"tiny": with_pad_token(paths["model"])}
        ctx.data = {name: paths[name] for name in ("sft", "prefs", "prompts")}
        speed_model = ctx.models["tiny"]
    else:
        from bench.engines import build_qwen_05b
        from bench.trl_baseline import build_bench_model

        tokenizer_dir = build_bench_model(ctx.cache / "llama-30m", seed=0)
        ctx.models = {"0.5B": build_qwen_05b(ctx.cache / "qwen2-0.5b-shape", tokenizer_dir)}
        if "1.5B" in ctx.sizes.memory_models and "memory" in ctx.args.parts:
            spec = HERE / "configs" / "qwen2.5-1.5b-shape.json"
            ctx.models["1.5B"] = build_shaped_model(
                spec, ctx.cache / "qwen2-1.5b-shape", tokenizer_dir, ctx.device
            )
        ctx.data = write_task_data(ctx.cache / "task-data")
        speed_model = ctx.models["0.5B"]
    ctx.extra["speed_model"] = Path(speed_model)
    if "speed" in ctx.args.parts:
        from transformers import AutoTokenizer

        _, texts = make_prompt_dataset(AutoTokenizer.from_pretrained(speed_model), n_prompts=16)
        ctx.extra["speed_prompts"] = ctx.out / "speed-prompts.jsonl"
        ctx.extra["speed_prompts"].write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        ctx.extra["rm"] = build_rm_adapter(speed_model, ctx.cache / f"{Path(speed_model).name}-rm")
    if "vllm" in ctx.args.parts and ctx.cuda and ctx.vllm and not ctx.args.tiny:
        from bench.gpu_check_vllm import build_strong_adapter

        ctx.extra["vllm_adapter"] = build_strong_adapter(
            ctx.models["0.5B"], ctx.cache / "qwen2-0.5b-shape-strong-lora", ctx.device
        )


# -------------------------------------------------------------------------------------------------
# Part: cuda-tests


def cuda_test_rows(xml_file: Path) -> list[Row]:
    """One row per test of pytest's JUnit XML (a skip keeps its reason, e.g. "no CUDA")."""
    rows = []
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        seconds = round(float(case.get("time", 0.0)), 1)
        if outcome is None:
            rows.append(Row("cuda-tests", name, seconds, "s", "passes", "pass", True))
            continue
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        note = (message[0] if message else outcome.tag)[:300]
        if outcome.tag == "skipped":
            rows.append(
                Row("cuda-tests", name, None, "", "passes", "skipped", False, note.removeprefix("Skipped: "))
            )
        else:
            rows.append(Row("cuda-tests", name, seconds, "s", "passes", "fail", True, note))
    return rows


def cuda_tests_job(ctx: Context) -> Job:
    """tests/test_cuda.py (the tests marked cuda) in its own pytest process, one row per test."""

    def run(timeout: float) -> list[Row]:
        xml_file = ctx.out / "cuda-tests.xml"
        xml_file.unlink(missing_ok=True)
        log = ctx.logs / "cuda-tests.log"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
        rc = run_logged([*cmd, f"--junitxml={xml_file}", "tests/test_cuda.py"], log, timeout, ctx.env())
        if rc is None or not xml_file.is_file():
            return [failed_run("cuda-tests", "pytest -m cuda", rc, log, True)]
        rows = cuda_test_rows(xml_file)
        if rc not in (0, 1) or not rows:  # 1: tests failed (their rows say so); else pytest itself failed
            rows.append(failed_run("cuda-tests", "pytest -m cuda", rc, log, True))
        return rows

    return Job("cuda-tests", ["pytest -m cuda"], 150, run)


# -------------------------------------------------------------------------------------------------
# Part: memory (the plan against the measured peak)

# The run reports its own peak when its process exits: max_memory_allocated on CUDA (what the plan counts
# there), VmHWM on CPU (the peak RSS of the process's own address space, what the plan counts there).
_RUN_AND_REPORT = """
import atexit, json, sys
out = sys.argv[1]
def report():
    peak = {}
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak["rss_bytes"] = int(line.split()[1]) * 1024
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated()
    open(out, "w").write(json.dumps(peak))
atexit.register(report)
sys.argv = ["ppo-cli", *sys.argv[2:]]
from ppo_cli.cli import main
main()
"""


def stage_args(ctx: Context, stage: str, model: str, quant: bool) -> list[str]:
    """A short run of `stage` (two optimizer steps) on `model`, the precision train.mixed_precision=auto
    picks (bf16 on a bf16 GPU), optionally on a 4-bit base; the plan is asked with the same overrides."""
    s = ctx.sizes
    common = [
        f"model.name_or_path={model}",
        *(["model.load_in_4bit=true"] if quant else []),
        f"train.device={ctx.device}",
        "train.mixed_precision=auto",
        "train.max_steps=2",
        "train.save_every=0",
        "train.eval_every=0",
        "train.log_every=1",
        "logger.progress=false",
        "logger.plots=false",  # matplotlib is not in the plan: it would only add to the measured peak
    ]
    if stage == "train-sft":
        data = [f"data.train={ctx.data['sft']}", "data.eval_fraction=0", f"train.batch_size={s.sft_batch}"]
    elif stage == "train-rm":
        data = [f"data.train={ctx.data['prefs']}", "data.eval_fraction=0", f"train.batch_size={s.rm_batch}"]
    else:
        data = [
            f"data.train={ctx.data['prompts']}",
            "reward_fn=ppo_cli.tiny.task:positive_reward",
            f"train.batch_size={s.ppo_batch}",
            f"generation.max_new_tokens={s.new_tokens}",
            "ppo.epochs=1",
            "sample_every=0",
        ]
    return [*common, *data]


def memory_configurations(ctx: Context) -> list[tuple[str, str, bool]]:
    """(model, stage, 4-bit) of each row: every stage at the small size, bf16 and 4-bit; train-ppo at 1.5B."""
    small = ctx.sizes.memory_models[0]
    rows = [
        (small, stage, quant) for stage in ("train-sft", "train-rm", "train-ppo") for quant in (False, True)
    ]
    if ctx.args.tiny:  # the dry run's stand-ins: each stage once (its time is mostly the processes' start-up)
        rows = [r for r in rows if not r[2]]
    rows += [(m, "train-ppo", quant) for m in ctx.sizes.memory_models[1:] for quant in (False, True)]
    return rows


def plan_total(stage: str, overrides: list[str]) -> int:
    """`ppo-cli plan STAGE OVERRIDES --json`'s total, through the command's own code, in this process."""
    from ppo_cli.plan.command import main as plan_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            plan_main([stage, *overrides, "--json"])
        except SystemExit as exc:
            raise RuntimeError(f"ppo-cli plan {stage} exited {exc.code}") from None
    return int(json.loads(buffer.getvalue())["total_bytes"])


def memory_job(ctx: Context, model: str, stage: str, quant: bool) -> Job:
    """One run measured against its plan (computed now, in this process, before the runs start)."""
    precision = "bf16" if ctx.cuda else "auto precision"
    gating = ctx.cuda and not ctx.args.tiny  # at tiny sizes fixed overheads dominate: reported only
    name = f"{model} {stage} {'4-bit' if quant else precision}: plan / peak"
    args = stage_args(ctx, stage, ctx.models[model], quant)
    try:
        plan = plan_total(stage, args)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        plan, plan_error = None, f"{type(exc).__name__}: {exc}"

    def run(timeout: float) -> list[Row]:
        if plan is None:
            return [Row("memory", name, None, "", "", "error", gating, plan_error[:300])]
        slug = name.split(":")[0].replace(" ", "-")
        peak_file, log = ctx.out / f"peak-{slug}.json", ctx.logs / f"memory-{slug}.log"
        cmd = [sys.executable, "-c", _RUN_AND_REPORT, str(peak_file), stage, *args]
        out = fresh(ctx.out / "runs" / slug)
        rc = run_logged([*cmd, f"output_dir={out}"], log, timeout, ctx.env())
        if rc != 0 or not peak_file.is_file():
            return [failed_run("memory", name, rc, log, gating)]
        peak = json.loads(peak_file.read_text())
        measured = peak["cuda_bytes"] if ctx.cuda else peak["rss_bytes"]
        ratio = plan / measured
        what = "torch.cuda.max_memory_allocated" if ctx.cuda else "peak RSS, the CPU stand-in"
        what += "" if gating else ": reported, not gating"
        note = f"plan {plan / 1e9:.3f} GB, measured {measured / 1e9:.3f} GB ({what})"
        bound = f"{1 - MEMORY_BOUND:.2f}-{1 + MEMORY_BOUND:.2f}"
        verdict = judged(abs(ratio - 1) <= MEMORY_BOUND)
        return [Row("memory", name, round(ratio, 3), "x", bound, verdict, gating, note)]

    return Job("memory", [name], 120, run, gating=gating)


def memory_jobs(ctx: Context) -> list[Job]:
    """One job per row of `memory_configurations`, their plans computed here, one after the other (Hydra's
    composition is global state)."""
    return [memory_job(ctx, model, stage, quant) for model, stage, quant in memory_configurations(ctx)]


# -------------------------------------------------------------------------------------------------
# Part: speed (train-ppo against TRL 1.12's PPOTrainer, and GRPO)


def with_overrides(cmd: list[str], *overrides: str) -> list[str]:
    """`cmd` with each key=value of `overrides` replacing the same key's earlier value."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [c for c in cmd if c.split("=", 1)[0] not in keys] + list(overrides)


def ppo_speed_job(ctx: Context, name: str, slug: str, *overrides: str) -> Job:
    """bench/run.py's train-ppo (16 prompts, 24 new tokens, 4 epochs, LoRA r=16, a LoRA RM) on the speed
    model with the command's defaults (bf16 on a bf16 GPU), median s/step after the warmup."""
    from bench.run import ppo_cli_command, summarise

    s = ctx.sizes

    def run(timeout: float) -> list[Row]:
        out, log = fresh(ctx.out / "runs" / slug), ctx.logs / f"speed-{slug}.log"
        steps = s.speed_warmup + s.speed_steps
        base = ppo_cli_command(
            str(ctx.extra["speed_model"]), ctx.extra["rm"], ctx.extra["speed_prompts"], out, steps, ctx.device
        )
        rc = run_logged(with_overrides(base, *overrides), log, timeout, ctx.env())
        if rc != 0:
            return [failed_run("speed", name, rc, log, False)]
        metrics = {int(m["step"]): m for m in read_metrics(out) if "time/step" in m}
        summary = summarise(metrics, s.speed_warmup)
        (ctx.out / f"speed-{slug}.json").write_text(json.dumps(summary, indent=2))
        note = (
            f"generate {summary['median_generate_s']:.2f} s, train {summary['median_train_s']:.2f} s, "
            f"peak {summary['peak_mb']:.0f} MB; median of {s.speed_steps} measured step(s) after {s.speed_warmup} "
            "warmup"
        )
        return [Row("speed", name, round(summary["median_step_s"], 3), "s", "", "measured", False, note)]

    return Job("speed", [name], 120, run, gating=False)


def trl_python(ctx: Context) -> tuple[list[str] | None, dict[str, str], str]:
    """(command prefix, extra env, why not) for TRL 1.12: the installed one, or the wheelhouse's installed
    without its dependencies into a folder of the cache (they are ppo-cli's own), so nothing here changes."""
    if (version_of("trl") or "").startswith("1.12."):
        return [sys.executable], {}, ""
    target = ctx.cache / f"trl-{TRL_VERSION}"
    wheels = sorted(WHEELHOUSE.glob(f"trl-{TRL_VERSION}-*.whl"))
    if not (target / "trl").is_dir() and wheels:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(target)]
        subprocess.run([*cmd, str(wheels[0])], capture_output=True, check=False)
    if not (target / "trl").is_dir():
        return None, {}, f"trl {TRL_VERSION} not installed and not in wheelhouse/"
    return [sys.executable], {"PYTHONPATH": os.pathsep.join((str(target), str(REPO)))}, ""


def trl_speed_job(ctx: Context) -> Job:
    """TRL 1.12's PPOTrainer (bench/trl_baseline.py, its defaults: bf16 on CUDA) on the same model, prompts
    and settings as ppo-cli's row."""
    name = TRL_ROW
    prefix, env, why_not = trl_python(ctx)
    if prefix is None:
        return Job("speed", [name], 0, lambda _: skipped("speed", [name], why_not), gating=False)
    s = ctx.sizes

    def run(timeout: float) -> list[Row]:
        result_file, log = ctx.out / "speed-trl.json", ctx.logs / "speed-trl.log"
        cmd = [*prefix, str(HERE / "gpu_check_trl.py"), "--steps", str(s.speed_steps)]
        cmd += ["--warmup", str(s.speed_warmup), "--device", ctx.device]
        cmd += ["--model-dir", str(ctx.extra["speed_model"]), "--out", str(result_file)]
        rc = run_logged(cmd, log, timeout, ctx.env(**env))
        if rc != 0:
            return [failed_run("speed", name, rc, log, False)]
        trl = json.loads(result_file.read_text())
        peak = trl.get("peak_cuda_mb") or trl.get("peak_rss_mb")
        note = f"{trl['dtype']}, peak {peak:.0f} MB"
        return [Row("speed", name, trl["median_step_s"], "s", "", "measured", False, note)]

    return Job("speed", [name], 150, run, gating=False)


PPO_ROW = "train-ppo s/step, ppo-cli (defaults)"
GRPO_ROW = "train-ppo s/step, ppo.advantage_estimator=grpo (4 prompts x 4 samples)"
TRL_ROW = "train-ppo s/step, TRL 1.12 PPOTrainer (defaults)"
RATIO_ROW = "TRL s/step / ppo-cli s/step"


def speed_jobs(ctx: Context) -> list[Job]:
    """ppo-cli's train-ppo, TRL's, and ppo-cli with GRPO (4 prompts x 4 samples: the same 16 sequences)."""
    grpo = ("ppo.advantage_estimator=grpo", "generation.samples_per_prompt=4", "train.batch_size=4")
    return [
        ppo_speed_job(ctx, PPO_ROW, "ppo-cli"),
        trl_speed_job(ctx),
        ppo_speed_job(ctx, GRPO_ROW, "ppo-cli-grpo", *grpo),
    ]


def compare_speed(rows: list[Row]) -> list[Row]:
    """Once every speed run is in: TRL's s/step over ppo-cli's, and GRPO's against GAE's, both reported
    against their bound, never failures."""
    by_name = {r.name: r for r in rows if r.part == "speed"}
    ppo, trl, grpo = by_name.get(PPO_ROW), by_name.get(TRL_ROW), by_name.get(GRPO_ROW)
    measured = [r is not None and r.status == "measured" for r in (ppo, trl, grpo)]
    if measured[0] and measured[2]:
        grpo.bound, grpo.status = f"< gae's {ppo.value:.3f} s", judged(grpo.value < ppo.value)
    if measured[0] and measured[1]:
        ratio = trl.value / ppo.value
        note = "reported, not a failure; 2.37x on the 2-core CPU with the 30M Llama (README)"
        bound = ">= 1 (ppo-cli faster)"
        return [*rows, Row("speed", RATIO_ROW, round(ratio, 2), "x", bound, judged(ratio >= 1), False, note)]
    why = "no TRL s/step" if not measured[1] else "no ppo-cli s/step"
    return [*rows, *skipped("speed", [RATIO_ROW], why)]


# -------------------------------------------------------------------------------------------------
# Part: vllm


VLLM_NAMES = [
    "new tokens/s, hf (generate)",
    "new tokens/s, vLLM",
    "vLLM tokens/s / hf tokens/s",
    "vLLM logprobs vs training model, before sleep",
    "vLLM logprobs vs training model, after sleep(level=1) + wake_up: adapter applies",
    "same samples from the same seeds before and after sleep/wake",
]
VLLM_PPO_NAME = "train-ppo engine=vllm: max |rollout/sampler_logprob_gap| (sleeps during updates)"


def logprob_row(name: str, check: dict) -> Row:
    """vLLM's logprobs of its samples against the training model's: close to the policy's (bf16 apart) and
    far closer to it than to the base without the adapter, which is what a lost adapter would match."""
    ok = check["policy_gap"] <= LOGPROB_BOUND and check["policy_gap"] < check["base_gap"] / 4
    note = (
        "mean |sequence logprob difference| per token, against the policy; against the base without the "
        f"adapter {check['base_gap']:.4f}; {check['tokens']} tokens"
    )
    bound = f"<= {LOGPROB_BOUND} and < base gap / 4"
    return Row("vllm", name, round(check["policy_gap"], 5), "nats/token", bound, judged(ok), True, note)


def vllm_rows(result: dict) -> list[Row]:
    """The table's rows from bench/gpu_check_vllm.py's JSON."""
    hf, vl = result["hf"]["tokens_per_s"], result["vllm"]["tokens_per_s"]
    ratio, same = vl / hf, result["same_samples_after_wake"]
    goal = f">= {VLLM_SPEED_GOAL:g} (goal)"
    after = logprob_row(VLLM_NAMES[4], result["after_wake"])
    after.note += f"; the sleep freed {result['sleep_freed_gb']:.1f} GB of GPU memory"
    return [
        Row("vllm", VLLM_NAMES[0], round(hf, 1), "tokens/s", "", "measured", False, result["hf"]["note"]),
        Row("vllm", VLLM_NAMES[1], round(vl, 1), "tokens/s", "", "measured", False, result["vllm"]["note"]),
        Row(
            "vllm",
            VLLM_NAMES[2],
            round(ratio, 2),
            "x",
            goal,
            judged(ratio >= VLLM_SPEED_GOAL),
            False,
            "reported",
        ),
        logprob_row(VLLM_NAMES[3], result["before_sleep"]),
        after,
        Row("vllm", VLLM_NAMES[5], "yes" if same else "no", "", "yes", judged(same), False, "reported"),
    ]


def vllm_jobs(ctx: Context) -> list[Job]:
    """The sampling worker (one engine: tokens/s, then the sleep/wake check) and train-ppo with vLLM."""
    names = [*VLLM_NAMES, VLLM_PPO_NAME]
    if not ctx.cuda:
        return [Job("vllm", names, 0, lambda _: skipped("vllm", names, "no CUDA"), gating=False)]
    if not ctx.vllm or ctx.args.tiny:
        why = "--tiny (the vLLM part runs at 0.5B only)" if ctx.vllm else "vLLM not importable"
        return [Job("vllm", names, 0, lambda _: skipped("vllm", names, why), gating=False)]
    adapter = ctx.extra["vllm_adapter"]

    def worker(timeout: float) -> list[Row]:
        result_file, log = ctx.out / "vllm.json", ctx.logs / "vllm.log"
        cmd = [sys.executable, str(HERE / "gpu_check_vllm.py"), f"--adapter={adapter}"]
        cmd += [f"--prompts-file={ctx.data['prompts']}", f"--out={result_file}"]
        rc = run_logged(cmd, log, timeout, ctx.env())
        if rc != 0:
            return [failed_run("vllm", name, rc, log, True) for name in VLLM_NAMES]
        return vllm_rows(json.loads(result_file.read_text()))

    def ppo(timeout: float) -> list[Row]:
        out, log = fresh(ctx.out / "runs" / "vllm-ppo"), ctx.logs / "vllm-ppo.log"
        cmd = [sys.executable, "-m", "ppo_cli", "train-ppo", f"sft_checkpoint={adapter}", f"output_dir={out}"]
        cmd += [f"data.train={ctx.data['prompts']}", "reward_fn=ppo_cli.tiny.task:positive_reward"]
        cmd += [
            "train.max_steps=3",
            "train.batch_size=16",
            "generation.max_new_tokens=32",
            "train.save_every=0",
        ]
        cmd += ["generation.engine=vllm", "generation.vllm.enforce_eager=true", "train.device=cuda"]
        rc = run_logged(
            [*cmd, "logger.progress=false", "logger.plots=false", "sample_every=0"], log, timeout, ctx.env()
        )
        if rc != 0:
            return [failed_run("vllm", VLLM_PPO_NAME, rc, log, True)]
        gaps = [
            m["rollout/sampler_logprob_gap"] for m in read_metrics(out) if "rollout/sampler_logprob_gap" in m
        ]
        worst = max(abs(g) for g in gaps)
        note = f"per step: {', '.join(f'{g:.4f}' for g in gaps)}; a lost adapter shows the base's gap (row above)"
        return [
            Row(
                "vllm",
                VLLM_PPO_NAME,
                round(worst, 5),
                "nats/token",
                f"<= {LOGPROB_BOUND}",
                judged(worst <= LOGPROB_BOUND),
                True,
                note,
            )
        ]

    return [Job("vllm", VLLM_NAMES, 240, worker), Job("vllm", [VLLM_PPO_NAME], 150, ppo)]


# -------------------------------------------------------------------------------------------------
# The report


def environment(ctx: Context, install_note: str) -> dict:
    """Device, driver-side versions and the library versions the figures depend on."""
    import torch

    from bench.against import cpu_description, describe_cpu

    cpu = describe_cpu(cpu_description()).split(", torch ")[0]  # torch's version has its own field
    info = {
        "device": f"{torch.cuda.get_device_name()}; host {cpu}" if ctx.cuda else f"CPU: {cpu}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if ctx.cuda else None,
        "bf16_supported": bool(ctx.cuda and torch.cuda.is_bf16_supported()),
        "python": platform.python_version(),
        "install": install_note,
    }
    for dist in ("transformers", "peft", "bitsandbytes", "vllm", "trl"):
        info[dist] = version_of(dist)
    return info


RESULT_WORDS = {
    "pass": "pass",
    "fail": "FAIL",
    "measured": "measured",
    "error": "ERROR",
    "timeout": "TIMEOUT",
}


def result_cell(row: Row) -> str:
    """The result column: a skip says why; a miss of a speed goal says it is not a failure."""
    if row.status == "skipped":
        return f"skipped: {row.note}"
    word = RESULT_WORDS.get(row.status, row.status)
    if row.status == "fail" and not row.gating:
        return "below bound (reported, not a failure)"
    return word


def markdown(report: dict) -> str:
    """gpu-check.md: the header lines, then one table row per figure."""
    env = report["environment"]
    lines = [
        f"# gpu-check, {report['date']} ({report['mode']})",
        "",
        f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}, Python "
        f"{env['python']}; transformers {env['transformers']}, peft {env['peft']}, bitsandbytes "
        f"{env['bitsandbytes']}, vLLM {env['vllm']}, TRL {env['trl']}. {env['install']}.",
        "",
        f"Result: **{'PASS' if report['passed'] else 'FAIL'}** ({report['failed']} correctness checks failed), "
        f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget. Correctness rows gate the exit "
        "status; speed rows (and the CPU stand-ins of a dry run) are reported, not failures.",
        "",
        "| part | check | value | bound | result | note |",
        "|---|---|---:|---|---|---|",
    ]
    for row in report["rows"]:
        r = Row(**row)
        value = "" if r.value is None else f"{r.value} {r.unit}".strip()
        note = r.note if r.status != "skipped" else ""
        cells = [r.part, r.name, value, r.bound, result_cell(r), note]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, rows: list[Row], clock: Clock, install_note: str) -> dict:
    """gpu-check.json and gpu-check.md in the output folder; the report's dict."""
    failed = [r for r in rows if r.gating and r.status in ("fail", "error", "timeout")]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "dry run, tiny sizes" if ctx.args.tiny else "full",
        "device": ctx.device,
        "environment": environment(ctx, install_note),
        "parts": list(ctx.args.parts),
        "wall_s": round(clock.elapsed(), 1),
        "budget_s": ctx.args.budget,
        "passed": not failed,
        "failed": len(failed),
        "rows": [asdict(r) for r in rows],
    }
    (ctx.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (ctx.out / "gpu-check.md").write_text(markdown(report))
    return report


# -------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the dry run (with --device cpu)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu-check")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "cache", help="where models are built")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole check (hard)")
    ap.add_argument("--no-install", action="store_true", help="never install from wheelhouse/")
    ap.add_argument(
        "--inject-failure",
        action="store_true",
        help="add a failing correctness check (tests the exit status)",
    )
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))}; each of {', '.join(PARTS)}")
    return args


def run_parts(ctx: Context, clock: Clock) -> list[Row]:
    """Correctness first, side by side where nothing is timed (tests and memory runs; vLLM alone, as its
    start-up measures the device's free memory); then the timed runs, one at a time."""
    workers = ctx.sizes.workers
    parts = ctx.args.parts
    rows: list[Row] = []
    shared = [
        *([cuda_tests_job(ctx)] if "cuda-tests" in parts else []),
        *(memory_jobs(ctx) if "memory" in parts else []),
    ]
    rows += run_jobs(shared, clock, workers)
    if "vllm" in parts:
        rows += run_jobs(vllm_jobs(ctx), clock, 1)
    if "speed" in parts:
        rows = compare_speed(rows + run_jobs(speed_jobs(ctx), clock, workers if ctx.args.tiny else 1))
    order = {part: i for i, part in enumerate(PARTS)}
    return sorted(rows, key=lambda r: order.get(r.part, len(order)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget)
    install_note = "install skipped (--no-install)" if args.no_install else ensure_installed(WHEELHOUSE)
    sys.path.insert(0, str(REPO))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here; `make gpu-check DEVICE=cpu` is the CPU dry run.", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    vllm = cuda and importlib.util.find_spec("vllm") is not None
    ctx = Context(args, TINY if args.tiny else FULL, args.out, args.cache, cuda, vllm)
    try:
        build_models(ctx)
        rows = run_parts(ctx, clock)
    except Exception as exc:  # noqa: BLE001 - the table still says what happened
        rows = [
            Row(
                "setup",
                "build the models and data",
                None,
                "",
                "",
                "error",
                True,
                f"{type(exc).__name__}: {exc}"[:300],
            )
        ]
    if args.inject_failure:
        rows.append(
            Row("injected", "a deliberately failing check (--inject-failure)", None, "", "", "fail", True)
        )
    report = write_report(ctx, rows, clock, install_note)
    print((args.out / "gpu-check.md").read_text())
    print(f"written to {args.out / 'gpu-check.json'} and gpu-check.md")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
