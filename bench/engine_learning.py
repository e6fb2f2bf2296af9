#!/usr/bin/env python
"""Does PPO learn as well from vLLM's rollouts as from transformers'? The learning curve of `train-ppo`
with `generation.engine=vllm` (with and without `ppo.sampler_correction=tis`) beside `generation.engine=hf`,
on a full-precision and on a 4-bit training base, several seeds.

The task is the tiny recipe's (recipes/tiny): its pretrained 2-layer Llama (with 2 attention heads of 32
instead of 4 of 16: vLLM's CPU attention has no head size 16), an SFT adapter trained with the
recipe's SFT settings, and PPO with the recipe's PPO settings (lr 5e-4, fixed KL coefficient 0.1, 4 epochs,
2 minibatches, 32 prompts x 24 new tokens at T = 1.0), against the task's gold reward function
(`ppo_cli.tiny.task:positive_reward`) instead of the recipe's reward model, so that the score PPO climbs
is the gold score. Each run ends with train-ppo's own held-out evaluation (eval.json: the policy against
the SFT policy on the held-out prompts, gold reward and KL).

Per row: the training score (`objective/scores`) averaged over the first and the last tenth of the steps,
the held-out gold lift (the final policy's mean gold score minus the SFT policy's) and KL, and the sampler gap (`rollout/sampler_logprob_gap`,
mean over steps) and capped share (`rollout/sampler_capped_share`) of the vLLM rows. Rows are the mean
over seeds with the range (min..max).

    .venv-vllm/bin/python bench/engine_learning.py [--steps 50] [--seeds 0,1] [--out FILE]

Runs in an interpreter with vllm (make vllm-venv); one thread per run, one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "engine-learning"

# The tiny recipe's SFT and PPO settings (recipes/tiny/sft.yaml, ppo.yaml), as overrides.
SFT = ["lora.r=16", "lora.alpha=32", "lora.dropout=0", "lora.target_modules=all-linear", "data.max_length=64",
       "train.max_steps=150", "train.batch_size=32", "train.lr=2e-3", "train.warmup_ratio=0.05",
       "train.device=cpu", "train.mixed_precision=no"]  # fmt: skip
PPO = ["data.max_length=32", "generation.max_new_tokens=24", "generation.temperature=1.0", "ppo.kl_coef=0.1",
       "ppo.kl_controller=fixed", "ppo.epochs=4", "ppo.num_minibatches=2", "ppo.missing_eos_penalty=1.0",
       "train.batch_size=32", "train.lr=5e-4", "train.device=cpu", "train.mixed_precision=no",
       "reward_fn=ppo_cli.tiny.task:positive_reward", "sample_every=0", "train.save_every=0",
       "eval.limit=64", "eval.samples_per_prompt=2"]  # fmt: skip
CONFIGS = {
    "hf": [],
    "vllm": ["generation.engine=vllm"],
    "vllm + tis": ["generation.engine=vllm", "ppo.sampler_correction=tis"],
    "4-bit hf": ["model.load_in_4bit=true"],
    "4-bit vllm + tis": ["model.load_in_4bit=true", "generation.engine=vllm", "ppo.sampler_correction=tis"],
}


def cli(args: list[str], log: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "WANDB_MODE": "disabled",
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "ppo_cli", *args, "logger.progress=false"],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False,
        ).returncode  # fmt: skip
    if rc != 0:
        raise SystemExit(f"ppo-cli {' '.join(args)} failed ({rc}); log {log}")


def tiny_task(root: Path) -> dict[str, Path]:
    from ppo_cli.tiny.cache import build_all
    from ppo_cli.tiny.pretrain import DEMO_PRETRAIN_STEPS

    # The recipe's pretrained 2-layer Llama, with 2 heads of 32 (vLLM's CPU attention has no head size 16).
    paths = build_all(root / "tiny", arch="llama", hidden_size=64, num_layers=2, num_heads=2,
                      pretrain_steps=DEMO_PRETRAIN_STEPS, vocab_multiple=64)  # fmt: skip
    sft = root / "sft"
    if not (sft / "final" / "adapter_config.json").is_file():
        cli(["train-sft", f"model.name_or_path={paths['model']}", f"data.train={paths['sft']}",
             f"data.eval={paths['sft_eval']}", *SFT, f"output_dir={sft}", "resume=never"], root / "logs" / "sft.log")  # fmt: skip
    return {**paths, "sft_adapter": sft / "final"}


def run(name: str, overrides: list[str], seed: int, task: dict[str, Path], steps: int, root: Path) -> Path:
    out = root / "runs" / f"{name.replace(' ', '').replace(',', '_').replace('+', '-')}-seed{seed}"
    if not (out / "eval.json").is_file():
        cli(["train-ppo", f"model.name_or_path={task['model']}", f"sft_checkpoint={task['sft_adapter']}",
             f"data.train={task['prompts']}", f"eval.prompts={task['prompts_eval']}", *PPO, *overrides,
             f"train.max_steps={steps}", f"train.seed={seed}", f"output_dir={out}", "resume=never"],
            root / "logs" / f"{out.name}.log")  # fmt: skip
    return out


def summarise(out: Path) -> dict[str, float | None]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "objective/scores" in m]
    tenth = max(1, len(steps) // 10)

    def mean(key: str, rows: list[dict]) -> float | None:
        values = [m[key] for m in rows if m.get(key) is not None]
        return statistics.fmean(values) if values else None

    held_out = json.loads((out / "eval.json").read_text())
    return {
        "score_first": mean("objective/scores", steps[:tenth]),
        "score_last": mean("objective/scores", steps[-tenth:]),
        "train_kl_last": mean("objective/kl", steps[-tenth:]),
        "gap": mean("rollout/sampler_logprob_gap", steps),
        "capped": mean("rollout/sampler_capped_share", steps),
        "s_per_step": mean("time/step", steps),
        **{f"eval/{k}": v for k, v in flat(held_out).items() if isinstance(v, int | float)},
    }


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    text = format(statistics.fmean(values), fmt)
    return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from: {', '.join(CONFIGS)}")
    parser.add_argument("--root", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default ROOT/results.json)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    task = tiny_task(args.root)
    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            out = run(name, CONFIGS[name], seed, task, args.steps, args.root)
            results.setdefault(name, []).append(summarise(out))
            print(f"{name}, seed {seed}: {results[name][-1]}", flush=True)
    keys = sorted({k for rows in results.values() for r in rows for k in r if k.startswith("eval/")})
    print(f"\n{args.steps} steps, seeds {args.seeds}; held-out keys: {', '.join(keys)}\n")
    print(
        "| rollouts | training score, first tenth | last tenth | held-out gold lift | held-out KL | "
        "sampler gap | capped share | s/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        cells = [
            spread([r["score_first"] for r in rows], "+.3f"),
            spread([r["score_last"] for r in rows], "+.3f"),
            spread([r["eval/policy/reward_mean"] - r["eval/reference/reward_mean"] for r in rows], "+.3f"),
            spread([r["eval/kl"] for r in rows], ".2f"),
            spread([r["gap"] for r in rows], ".4f"),
            spread([r["capped"] for r in rows], ".4f"),
            spread([r["s_per_step"] for r in rows], ".2f"),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = args.out or args.root / "results.json"
    out.write_text(json.dumps({"steps": args.steps, "seeds": seeds, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
