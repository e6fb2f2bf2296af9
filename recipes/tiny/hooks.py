"""Hooks of the `tiny` recipe (recipe.yaml beside this file): the offline demo of SFT -> RM -> PPO.

`setup` builds the tiny base model (pretrained on the task's text, see ppo_cli.tiny) and the "positive
words" data into RUN/tiny/ and points the stages at them. `report` compares the SFT policy with the PPO
policy on held-out prompts: the task's gold metric (ppo_cli.tiny.task.gold_score, which no stage saw
directly: PPO was trained against the reward model), the reward model's score, the KL to the SFT policy,
and samples side by side. Its numbers also go to RUN/report.json.

Every key of DEFAULTS can be overridden from the pipeline command line as setup.KEY=VALUE, e.g.
`ppo-cli pipeline recipe=tiny setup.pretrain_steps=100 setup.report_prompts=32`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError

# Model/data build arguments (ppo_cli.tiny.cache.build_all) and report settings.
DEFAULTS: dict[str, Any] = {
    "arch": "llama",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "seed": 0,
    "pretrain_steps": 300,
    "vocab_multiple": 64,
    # Held-out prompts (prompts_eval.jsonl) and samples per prompt in the before/after comparison.
    "report_prompts": 64,
    "report_samples": 4,
    # Rows of the side-by-side samples table.
    "report_rows": 6,
}
_BUILD_KEYS = ("arch", "hidden_size", "num_layers", "num_heads", "seed", "pretrain_steps", "vocab_multiple")


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise UserError(
            f"unknown setup.* keys for the tiny recipe: {sorted(unknown)}; known: {sorted(DEFAULTS)}."
        )
    return {**DEFAULTS, **args}


def _q(path: Path) -> str:
    """A path as a quoted Hydra override value."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def setup(run_dir: str | Path, build: bool = True, **args: Any) -> dict[str, list[str]]:
    """Build (when `build`) the tiny base + data under RUN/tiny and return each stage's overrides."""
    settings = _settings(args)
    root = (Path(run_dir) / "tiny").absolute()
    if build:
        from ppo_cli.tiny.cache import build_all

        build_args = {k: settings[k] for k in _BUILD_KEYS}
        print(
            f"tiny recipe: building the base model ({build_args['arch']}, hidden {build_args['hidden_size']}, "
            f"{build_args['num_layers']} layers, {build_args['pretrain_steps']} pretraining steps) and the task data "
            f"in {root}"
        )
        build_all(root, **build_args)
    model, data = root / "model", root / "data"
    return {
        "sft": [
            f"model.name_or_path={_q(model)}",
            f"data.train={_q(data / 'sft.jsonl')}",
            f"data.eval={_q(data / 'sft_eval.jsonl')}",
        ],
        "rm": [f"data.train={_q(data / 'prefs.jsonl')}", f"data.eval={_q(data / 'prefs_eval.jsonl')}"],
        "ppo": [f"data.train={_q(data / 'prompts.jsonl')}"],
    }


# ---------------------------------------------------------------------------------------------
# The before/after report


def _model_cfg(stage_cfg: DictConfig) -> DictConfig:
    from ppo_cli.config import CheckpointModelConfig

    return OmegaConf.structured(
        CheckpointModelConfig(
            dtype=stage_cfg.model.dtype,
            trust_remote_code=stage_cfg.model.trust_remote_code,
            attn_implementation=stage_cfg.model.attn_implementation,
        )
    )


def evaluate(run_dir: str | Path, configs: dict[str, DictConfig], **args: Any) -> dict[str, Any]:
    """Sample from the SFT and PPO policies on held-out prompts and measure both; returns the numbers."""
    import torch

    from ppo_cli.data import encode_prompt, load_rows, prompt_of, prompt_text
    from ppo_cli.generate import load_policy, sample, sequence_logprobs
    from ppo_cli.models import resolve_device
    from ppo_cli.reward.sources import build_reward
    from ppo_cli.tiny import task

    settings = _settings(args)
    ppo_cfg = configs["ppo"]
    # A recipe without an rm stage (tiny-grpo, scored by the task's reward function) has no RM score.
    finals = {stage: Path(cfg.output_dir) / "final" for stage, cfg in configs.items()}
    device = resolve_device(ppo_cfg.train.device)
    model_cfg = _model_cfg(configs["sft"])
    prompts_file = Path(run_dir).absolute() / "tiny" / "data" / "prompts_eval.jsonl"
    rows = load_rows(str(prompts_file), "prompts_eval")[: settings["report_prompts"]]
    n = settings["report_samples"]
    temperature, max_new = float(ppo_cfg.generation.temperature), int(ppo_cfg.generation.max_new_tokens)

    policies = {stage: load_policy(str(finals[stage]), model_cfg, device) for stage in ("sft", "ppo")}
    tokenizer = policies["sft"].tokenizer
    prompts = [prompt_of(r) for r in rows for _ in range(n)]
    prompt_ids = [encode_prompt(tokenizer, p, "prompts_eval") for p in prompts]
    texts = [prompt_text(p) for p in prompts]
    scorer = None
    if "rm" in finals:
        scorer = build_reward(str(finals["rm"]), None, model_cfg, device, 32, policy_tokenizer=tokenizer)
    result: dict[str, Any] = {"prompts": len(rows), "samples_per_prompt": n, "temperature": temperature}
    samples = {}
    for stage, policy in policies.items():
        s = sample(policy, prompt_ids, max_new, temperature, batch_size=64, seed=int(ppo_cfg.train.seed))
        samples[stage] = s
        gold = [task.gold_score(t) for t in s.texts]
        own = sequence_logprobs(policy, s.prompt_ids, s.response_ids, temperature, 64)
        ref = sequence_logprobs(policies["sft"], s.prompt_ids, s.response_ids, temperature, 64)
        words = [len(task.words_of(t)) for t in s.texts]
        result[stage] = {
            "gold_score": sum(gold) / len(gold),
            "positive_share": _share(s.texts, task.POSITIVE_WORDS),
            "negative_share": _share(s.texts, task.NEGATIVE_WORDS),
            "kl_to_sft": float((own - ref).mean()),
            "words": sum(words) / len(words),
            "eos_rate": sum(s.finished) / len(s.finished),
        }
        if scorer is not None:
            sequences = [p + r for p, r in zip(s.prompt_ids, s.response_ids)]
            rewards = scorer.score(prompts, s.texts, sequences).tolist()
            result[stage]["rm_reward"] = sum(rewards) / len(rewards)
    result["samples"] = [
        {"prompt": texts[i], "sft": samples["sft"].texts[i], "ppo": samples["ppo"].texts[i]}
        for i in range(0, len(texts), n)
    ]
    del policies, scorer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _share(texts: list[str], vocabulary: tuple[str, ...]) -> float:
    from ppo_cli.tiny.task import words_of

    words = [w for t in texts for w in words_of(t)]
    vocab = set(vocabulary)
    return sum(w in vocab for w in words) / max(1, len(words))


def report(run_dir: str | Path, configs: dict[str, DictConfig], **args: Any) -> dict[str, Any]:
    """Print the before/after table and a few samples side by side; save them to RUN/report.json."""
    from rich.table import Table

    from ppo_cli.logger import make_console

    settings = _settings(args)
    result = evaluate(run_dir, configs, **args)
    console = make_console()
    table = Table(
        title=f"tiny recipe: SFT policy vs PPO policy on {result['prompts']} held-out prompts x "
        f"{result['samples_per_prompt']} samples (T={result['temperature']:g})"
    )
    for column in ("metric", "SFT", "PPO", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    labels = {
        "gold_score": "gold score (tiny.gold_score, higher is better)",
        "rm_reward": "reward model score",
        "kl_to_sft": "KL to the SFT policy (nats / sequence)",
        "positive_share": "share of positive words",
        "negative_share": "share of negative words",
        "words": "words per completion",
        "eos_rate": "completions ending with EOS",
    }
    for key, label in labels.items():
        if key not in result["sft"]:
            continue
        before, after = result["sft"][key], result["ppo"][key]
        table.add_row(label, f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    console.print(table)
    samples = Table(title="samples (same prompt, same seed)", show_lines=True)
    for column in ("prompt", "SFT", "PPO"):
        samples.add_column(column, overflow="fold")
    for row in result["samples"][: settings["report_rows"]]:
        samples.add_row(row["prompt"], row["sft"], row["ppo"])
    console.print(samples)
    gain = result["ppo"]["gold_score"] - result["sft"]["gold_score"]
    verdict = "improved" if gain > 0 else "did NOT improve"
    console.print(f"PPO {verdict} the gold score by {gain:+.3f} (from {result['sft']['gold_score']:.3f}).")
    path = Path(run_dir) / "report.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"report saved to {path}")
    return result
