"""Hooks of the `tiny` recipe (recipe.yaml beside this file): the offline demo of SFT -> RM -> PPO.

`setup` builds the tiny base model (pretrained on the task's text, see ppo_cli.tiny) and the "positive
words" data into RUN/tiny/ and points the stages at them, the ppo stage's held-out prompts (eval.prompts)
included: train-ppo ends by evaluating its policy against the SFT policy on them (`ppo-cli evaluate`, into
RUN/ppo/eval.json). `report` reads that evaluation — reward, KL to the SFT policy, EOS rate, diversity,
win rate — adds the task's gold metric on the same samples (ppo_cli.tiny.task.gold_score, which no stage
saw directly: PPO was trained against the reward model) and shows samples side by side. Its numbers also go
to RUN/report.json.

Every key of DEFAULTS can be overridden from the pipeline command line as setup.KEY=VALUE, e.g.
`ppo-cli pipeline recipe=tiny setup.pretrain_steps=100 setup.report_prompts=32`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ppo_cli.errors import UserError
from ppo_cli.tiny.pretrain import DEMO_PRETRAIN_STEPS

# Model/data build arguments (ppo_cli.tiny.cache.build_all) and report settings.
DEFAULTS: dict[str, Any] = {
    "arch": "llama",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "seed": 0,
    "pretrain_steps": DEMO_PRETRAIN_STEPS,
    "vocab_multiple": 64,
    # Held-out prompts (prompts_eval.jsonl) and samples per prompt of the ppo stage's final evaluation
    # (its eval.limit and eval.samples_per_prompt), which the before/after comparison reports.
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
        # train-ppo compares its final policy with the SFT policy on the held-out prompts (eval.json);
        # the report below reads that evaluation rather than sampling again.
        "ppo": [
            f"data.train={_q(data / 'prompts.jsonl')}",
            f"eval.prompts={_q(data / 'prompts_eval.jsonl')}",
            f"eval.limit={settings['report_prompts']}",
            f"eval.samples_per_prompt={settings['report_samples']}",
        ],
    }


# ---------------------------------------------------------------------------------------------
# The before/after report


def _read_evaluation(configs: dict[str, DictConfig]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """train-ppo's held-out evaluation of the PPO policy against the SFT policy: eval.json and its samples."""
    from ppo_cli.evaluation.report import samples_path

    path = Path(configs["ppo"].output_dir) / "eval.json"
    if not path.is_file():
        raise UserError(
            f"the tiny recipe's report reads the ppo stage's held-out evaluation, {path}, which does not exist: "
            "keep ppo.eval.prompts set (the setup hook sets it) and rerun the pipeline to evaluate."
        )
    rows = [json.loads(line) for line in samples_path(path).read_text().splitlines() if line.strip()]
    return json.loads(path.read_text()), rows


def _gold_measures(texts: list[str]) -> dict[str, float]:
    """The task's own measures of completions, which no stage saw directly (PPO was trained against an RM)."""
    from ppo_cli.tiny import task

    flat = [w for t in texts for w in task.words_of(t)]
    positive, negative = set(task.POSITIVE_WORDS), set(task.NEGATIVE_WORDS)
    return {
        "gold_score": sum(task.gold_score(t) for t in texts) / len(texts),
        "positive_share": sum(w in positive for w in flat) / max(1, len(flat)),
        "negative_share": sum(w in negative for w in flat) / max(1, len(flat)),
        "words": len(flat) / len(texts),
    }


# What train-ppo trained with, by ppo.advantage_estimator: the report's name for the trained policy.
METHODS = {"gae": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_plus_plus": "REINFORCE++"}


def method_name(configs: dict[str, DictConfig]) -> str:
    """'PPO' for the tiny recipe, 'GRPO' for tiny-grpo: the ppo stage's estimator."""
    ppo = configs["ppo"].get("ppo") or {}
    return METHODS.get(str(ppo.get("advantage_estimator", "gae")), "PPO")


def evaluate(run_dir: str | Path, configs: dict[str, DictConfig], **args: Any) -> dict[str, Any]:
    """The SFT and PPO policies on held-out prompts: train-ppo's evaluation plus the task's gold measures."""
    _settings(args)
    evaluation, rows = _read_evaluation(configs)
    reward_key = "rm_reward" if "rm" in configs else "reward"
    result: dict[str, Any] = {
        "prompts": evaluation["n"],
        "samples_per_prompt": evaluation["samples_per_prompt"],
        "temperature": evaluation["generation"]["temperature"],
        "win_rate": evaluation["win_rate"],
        "evaluation": str(Path(configs["ppo"].output_dir) / "eval.json"),
    }
    for stage, side in (("sft", "reference"), ("ppo", "policy")):
        measured = evaluation[side]
        result[stage] = {
            **_gold_measures([row[side]["completion"] for row in rows]),
            reward_key: measured["reward_mean"],
            # KL to the SFT policy on each policy's own samples: the SFT policy's is 0 by definition.
            "kl_to_sft": evaluation["kl"] if stage == "ppo" else 0.0,
            "eos_rate": measured["eos_rate"],
            "distinct_2": measured["distinct_2"],
        }
    result["samples"] = [
        {"prompt": row["prompt"], "sft": row["reference"]["completion"], "ppo": row["policy"]["completion"]}
        for row in rows
        if row["sample"] == 0
    ]
    return result


def report(run_dir: str | Path, configs: dict[str, DictConfig], **args: Any) -> dict[str, Any]:
    """Print the before/after table and a few samples side by side; save them to RUN/report.json."""
    from rich.table import Table
    from rich.text import Text

    from ppo_cli.data import prompt_text
    from ppo_cli.logger import make_console, printable

    settings = _settings(args)
    result = evaluate(run_dir, configs, **args)
    method = method_name(configs)
    console = make_console()
    table = Table(
        title=f"tiny recipe: SFT policy vs {method} policy on {result['prompts']} held-out prompts x "
        f"{result['samples_per_prompt']} samples (T={result['temperature']:g}; from {result['evaluation']})"
    )
    for column in ("metric", "SFT", method, "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    labels = {
        "gold_score": "gold score (tiny.gold_score, higher is better)",
        "rm_reward": "reward model score",
        "reward": "reward (the ppo stage's reward_fn)",
        "kl_to_sft": "KL to the SFT policy (nats / sequence)",
        "positive_share": "share of positive words",
        "negative_share": "share of negative words",
        "words": "words per completion",
        "eos_rate": "completions ending with EOS",
        "distinct_2": "distinct word bigrams (diversity)",
    }
    for key, label in labels.items():
        if key not in result["sft"]:
            continue
        before, after = result["sft"][key], result["ppo"][key]
        table.add_row(label, f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    console.print(table)
    console.print(
        f"win rate of the {method} policy over the SFT policy by reward (ties half): {result['win_rate']:.3f}"
    )
    samples = Table(title="samples (same prompt, same seed)", show_lines=True)
    for column in ("prompt", "SFT", method):
        samples.add_column(column, overflow="fold")
    for row in result["samples"][: settings["report_rows"]]:
        # Text, not markup: completions are any text, shown as written.
        samples.add_row(*(Text(printable(t)) for t in (prompt_text(row["prompt"]), row["sft"], row["ppo"])))
    console.print(samples)
    gain = result["ppo"]["gold_score"] - result["sft"]["gold_score"]
    verdict = "improved" if gain > 0 else "did NOT improve"
    console.print(
        f"{method} {verdict} the gold score by {gain:+.3f} (from {result['sft']['gold_score']:.3f})."
    )
    path = Path(run_dir) / "report.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"report saved to {path}")
    return result
