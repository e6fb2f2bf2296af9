#!/usr/bin/env python
"""`make bench`: PPO seconds per step, per phase, rollout tokens/s and peak memory — ppo-cli and TRL 1.12
side by side on the same ~30M-parameter random Llama, prompts and settings, in one run.

Settings (both): 16 prompts per rollout (16-32 tokens), 24 new tokens, temperature 0.7, 4 PPO epochs,
1 minibatch, LoRA policy r=16 alpha=32 on q_proj/v_proj, reference = the base (adapter disabled),
reward model = the base as a sequence classifier. ppo-cli keeps all four roles on one base (the reward
model is a LoRA adapter + head there); TRL keeps separate reward and value models.

    python bench/run.py [--steps 5] [--warmup 1] [--device cpu|cuda] [--skip-trl] [--out FILE]
    python bench/run.py --against REV [--repeats 2]    # the regression guard (bench/against.py)

The TRL side runs in `--trl-python` (`make trl112-venv` builds one: trl==1.12.0 and peft, with this
environment's torch and transformers), or in this interpreter when `trl==1.12.0` is importable here.
Each side runs in its own process; medians exclude the warmup steps. Rows: each side with its defaults
(ppo-cli's train.mixed_precision=auto is bf16 on a bf16 GPU or a CPU with AMX/AVX512-BF16; TRL runs
fp32 unless bf16=True), then both sides in fp32 and — where the hardware has native bf16 — both in bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS, RESPONSE_LENGTH, EPOCHS, TEMPERATURE = 16, 24, 4, 0.7


def _trl_baseline():
    spec = importlib.util.spec_from_file_location("trl_baseline", HERE / "trl_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_rm_adapter(base_dir: str, out_dir: Path) -> Path:
    """A reward model in ppo-cli's RM format on the bench base: fresh LoRA + small score head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ppo_cli.models import write_product_info
    from ppo_cli.reward.scoring import init_score_head

    if (out_dir / "ppo_cli.json").is_file():
        return out_dir
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    init_score_head(model.score)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="SEQ_CLS", modules_to_save=["score"])
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    write_product_info(out_dir, "rm", base_dir, lora=True, reward_mean=0.0, reward_std=1.0)
    return out_dir


def ppo_cli_command(
    base_dir: str, rm_dir: Path, prompts_file: Path, out: Path, steps: int, device: str, *extra: str
) -> list[str]:
    """The benchmark's `train-ppo` command line (the settings of this file's docstring), plus `extra`."""
    return [
        sys.executable,
        "-m",
        "ppo_cli",
        "train-ppo",
        f"model.name_or_path={base_dir}",
        f"reward_checkpoint={rm_dir}",
        f"data.train={prompts_file}",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        f"train.batch_size={PROMPTS}",
        "train.save_every=0",
        "train.log_every=1",
        f"train.device={device}",
        f"generation.max_new_tokens={RESPONSE_LENGTH}",
        f"generation.temperature={TEMPERATURE}",
        f"ppo.epochs={EPOCHS}",
        "ppo.num_minibatches=1",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.0",
        "sample_every=0",
        "logger.progress=false",
        "ppo.reward_normalization=none",
        *extra,
    ]


def run_ppo_cli(
    base_dir: str,
    rm_dir: Path,
    prompts_file: Path,
    work: Path,
    steps: int,
    device: str,
    precision: str = "auto",
) -> dict:
    out = work / f"ppo-cli-run-{precision}"
    cmd = ppo_cli_command(
        base_dir, rm_dir, prompts_file, out, steps, device, f"train.mixed_precision={precision}"
    )
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise SystemExit(f"ppo-cli run failed:\n{result.stderr[-4000:]}")
    return {int(m["step"]): m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def run_trl(
    model_dir: str,
    steps: int,
    warmup: int,
    device: str,
    work: Path,
    dtype: str = "auto",
    python: str | None = None,
) -> dict | None:
    """TRL's side in `python` (a Python with trl==1.12.0 and peft; default: this one, when it has trl)."""
    if python is None:
        if importlib.util.find_spec("trl") is None:
            return None
        python = sys.executable
    out = work / f"trl-{dtype}.json"
    cmd = [
        python,
        str(HERE / "trl_baseline.py"),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--device",
        device,
        "--model-dir",
        model_dir,
        "--dtype",
        dtype,
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"TRL baseline failed (skipped):\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def step_gflop(base_dir: str, rm_dir: Path, prompts_file: Path, work: Path, device: str) -> dict | None:
    """GFLOP per phase of one step of the benchmark's command with its defaults (bench/flops.py); None
    if counting failed (reported, not fatal: the timings stand without it)."""
    command = ppo_cli_command(base_dir, rm_dir, prompts_file, work / "ppo-cli-flops", 1, device)
    result = subprocess.run(
        [sys.executable, str(HERE / "flops.py"), "--", *command[3:]], capture_output=True, text=True
    )
    if result.returncode != 0:
        print(f"FLOP count failed (skipped):\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_gflop(gflop: dict, row: dict) -> None:
    """Each phase's counted work beside its median time (the default row), and the rate achieved."""
    times = {
        "generate": row["median_generate_s"],
        "score": row["median_score_s"],
        "train": row["median_train_s"],
    }
    parts = [
        f"{phase} {gflop[phase]:.0f} GFLOP ({gflop[phase] / times[phase]:.0f} GFLOP/s)" for phase in times
    ]
    print("work per step (FlopCounterMode, default row): " + ", ".join(parts))


def summarise(metrics: dict, warmup: int) -> dict:
    measured = [metrics[s] for s in sorted(metrics) if s > warmup]

    def median(key: str) -> float:
        return statistics.median(m[key] for m in measured)

    tokens = [m["val/mean_response_length"] * PROMPTS / m["time/generate"] for m in measured]
    return {
        "step_seconds": [round(m["time/step"], 4) for m in measured],
        "median_step_s": median("time/step"),
        "median_generate_s": median("time/generate"),
        "median_score_s": median("time/score"),
        "median_train_s": median("time/train"),
        "rollout_tokens_per_s": statistics.median(tokens),
        "peak_mb": max(m["memory/peak_mb"] for m in measured),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured PPO steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="warmup steps, excluded from the medians")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--skip-trl", action="store_true", help="measure ppo-cli only")
    ap.add_argument(
        "--trl-python", help="a Python with trl==1.12.0 and peft (`make trl112-venv`) for TRL's side"
    )
    ap.add_argument("--cache", default=str(HERE / "results" / "cache"), help="where the bench model is built")
    ap.add_argument(
        "--out", default=None, help="results JSON (default bench/results/latest.json, or against.json)"
    )
    ap.add_argument("--against", metavar="REV", help="ppo-cli at git REV beside the working tree, per phase")
    ap.add_argument("--repeats", type=int, default=2, help="--against: runs of each tree, alternating")
    args = ap.parse_args(argv)
    args.out = args.out or str(HERE / "results" / ("against.json" if args.against else "latest.json"))

    import torch

    from ppo_cli.models import cpu_has_native_bf16

    baseline = _trl_baseline()
    model_dir = baseline.build_bench_model(Path(args.cache) / "llama-30m", seed=0)
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        work = Path(tmp)
        from transformers import AutoTokenizer

        _, texts = baseline.make_prompt_dataset(AutoTokenizer.from_pretrained(model_dir), n_prompts=PROMPTS)
        prompts_file = work / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        rm_dir = build_rm_adapter(model_dir, Path(args.cache) / "llama-30m-rm")
        steps = args.steps + args.warmup
        if args.against:
            from against import run_against

            def command(out: Path) -> list[str]:
                return ppo_cli_command(model_dir, rm_dir, prompts_file, out, steps, args.device)

            return run_against(args.against, args, command)

        def ours(precision: str) -> dict:
            metrics = run_ppo_cli(model_dir, rm_dir, prompts_file, work, steps, args.device, precision)
            return summarise(metrics, args.warmup)

        # Each side with its defaults (ppo-cli: train.mixed_precision=auto, bf16 on a bf16 GPU or a CPU
        # with AMX/AVX512-BF16; TRL: fp32 unless bf16=True), then both in fp32 and both in bf16.
        rows = {"ppo-cli (default)": ours("auto"), "ppo-cli fp32": ours("no")}
        native_bf16 = args.device == "cuda" or cpu_has_native_bf16()
        if native_bf16:
            rows["ppo-cli bf16"] = ours("bf16")
        gflop = step_gflop(model_dir, rm_dir, prompts_file, work, args.device)
        trl = {}
        if not args.skip_trl:
            for dtype in ("fp32", "bf16") if native_bf16 else ("fp32",):
                trl[dtype] = run_trl(
                    model_dir, args.steps, args.warmup, args.device, work, dtype, args.trl_python
                )

    spec = json.loads((Path(model_dir) / "bench_model_spec.json").read_text())
    trl_default = "bf16" if args.device == "cuda" else "fp32"  # what TRL's PPOConfig does unless told
    ratios = {}
    if trl.get(trl_default):
        ratios["default"] = trl[trl_default]["median_step_s"] / rows["ppo-cli (default)"]["median_step_s"]
    for dtype in ("fp32", "bf16"):
        if trl.get(dtype) and f"ppo-cli {dtype}" in rows:
            ratios[dtype] = trl[dtype]["median_step_s"] / rows[f"ppo-cli {dtype}"]["median_step_s"]
    from against import cpu_description, describe_cpu

    cpu = cpu_description()
    result = {
        "machine": describe_cpu(cpu) + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "cpu": cpu,
        "torch": torch.__version__,
        "settings": {
            "model_params": spec["model_params"],
            "prompts": PROMPTS,
            "response_length": RESPONSE_LENGTH,
            "ppo_epochs": EPOCHS,
            "temperature": TEMPERATURE,
            "device": args.device,
            "measured_steps": args.steps,
            "warmup": args.warmup,
        },
        "ppo_cli": rows,
        "trl": trl,
        "speedup_vs_trl": ratios,
        "gflop_per_step": gflop,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(
        f"PPO step on a {spec['model_params'] / 1e6:.1f}M-parameter Llama, {PROMPTS} prompts x {RESPONSE_LENGTH} "
        f"tokens, {EPOCHS} epochs, {args.device} ({result['machine']}), medians of {args.steps} steps"
    )
    print(f"{'':20}{'s/step':>9}{'generate':>10}{'score':>8}{'train':>8}{'tok/s':>8}{'peak MB':>9}")
    for label, row in rows.items():
        print(
            f"{label:20}{row['median_step_s']:9.2f}{row['median_generate_s']:10.2f}{row['median_score_s']:8.2f}"
            f"{row['median_train_s']:8.2f}{row['rollout_tokens_per_s']:8.0f}{row['peak_mb']:9.0f}"
        )
    if gflop:
        print_gflop(gflop, rows["ppo-cli (default)"])
    for dtype, row in trl.items():
        if row:
            peak = row.get("peak_cuda_mb") or row.get("peak_rss_mb") or float("nan")
            label = f"trl 1.12.0 {dtype}" + (" (default)" if dtype == trl_default else "")
            print(f"{label:20}{row['median_step_s']:9.2f}{'':34}{peak:9.0f}")
    if ratios:
        print(
            "TRL s/step divided by ppo-cli s/step: "
            + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items())
            + " (default = each side's defaults)"
        )
    else:
        print("TRL 1.12.0 not installed or --skip-trl: ppo-cli only.")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
