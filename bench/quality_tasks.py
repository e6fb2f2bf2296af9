"""The quality benchmark's view of the local tasks of bench/tasks.py: gold scorers as PPO reward
functions, and prompt files for PPO (training prompts) and for the judge (held-out prompts).

`ppo-cli train-ppo reward_fn=bench.quality_tasks:gold_sentiment` (run from the repository root) trains
against the gold scorer itself; the task's reward model is trained on pairs the same gold labelled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import tasks as task_builders  # noqa: E402  (bench/tasks.py, next to this file)


def _scorer(gold_name: str):
    gold = task_builders.GOLDS[gold_name]

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        del prompts  # every gold of these tasks is a function of the answer's text alone
        return [gold(c) for c in completions]

    reward.__name__ = f"gold_{gold_name}"
    return reward


# reward_fn=bench.quality_tasks:gold_<gold name> (a task's gold is TASKS[name].gold).
gold_sentiment = _scorer("sentiment")
gold_letter = _scorer("letter")
gold_format = _scorer("format")
gold_long_answer = _scorer("long_answer")


def is_built(task: str, root: Path) -> bool:
    """Whether bench/tasks.py's cache holds a complete build of `task` from the current code."""
    info = task_builders.task_paths(root, task)["info"]
    spec = task_builders.TASKS[task]
    return info.is_file() and json.loads(info.read_text()).get("stamp") == task_builders._stamp(spec)


def reward_fn_spec(task: str) -> str:
    return f"bench.quality_tasks:gold_{task_builders.TASKS[task].gold}"


def prompt_files(task: str, root: Path) -> dict[str, Path]:
    """{"train": prompts PPO trains on, "eval": held-out prompts} as {"prompt"} JSONL rows: the same split
    as the task's preference pairs (no held-out prompt is in a training pair or a PPO batch)."""
    spec = task_builders.TASKS[task]
    train, held_out = task_builders.split_prompts(spec.model_seed)
    out = Path(root) / task
    paths = {"train": out / "prompts_train.jsonl", "eval": out / "prompts_eval.jsonl"}
    for key, prompts in (("train", train), ("eval", held_out)):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        if not paths[key].is_file() or paths[key].read_text() != text:
            paths[key].write_text(text)
    return paths
