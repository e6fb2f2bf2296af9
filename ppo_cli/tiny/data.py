"""The task's JSONL files (TRL column conventions): SFT rows, preference pairs and prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ppo_cli.tiny.task import all_prompts, gold_score, sample_completion

N_EVAL_ROWS = 200  # rows of sft_eval / prefs_eval / sft_messages


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as one JSON object per line."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _sft_rows(n: int, rng: random.Random, prompts: list[str]) -> list[dict[str, str]]:
    """Prompt/completion rows with mixed completions (format, not preference)."""
    return [{"prompt": rng.choice(prompts), "completion": sample_completion(rng)} for _ in range(n)]


def _pref_rows(n: int, rng: random.Random, prompts: list[str]) -> list[dict[str, str]]:
    """Prompt/chosen/rejected rows: two completions per prompt, the higher gold score is chosen, ties skipped."""
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        prompt, a, b = rng.choice(prompts), sample_completion(rng), sample_completion(rng)
        score_a, score_b = gold_score(a), gold_score(b)
        if score_a == score_b:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _split_prompts(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint train/eval prompt lists when the pool allows it; otherwise they cycle through the pool."""
    pool = all_prompts()
    rng.shuffle(pool)
    if n_train + n_eval <= len(pool):
        return pool[:n_train], pool[n_train : n_train + n_eval]
    # Not enough distinct prompts: keep eval disjoint from as much of train as possible, then repeat.
    train = [pool[i % len(pool)] for i in range(n_train)]
    eval_ = [pool[(len(pool) - 1 - i) % len(pool)] for i in range(n_eval)]
    return train, eval_


def write_task_data(
    out_dir: str | Path,
    n_sft: int = 2000,
    n_pref: int = 2000,
    n_prompts: int = 256,
    n_eval_prompts: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the task's JSONL files (TRL column conventions) to `out_dir`; return {name: path}.

    sft / sft_eval: prompt, completion; prefs / prefs_eval: prompt, chosen, rejected; prompts / prompts_eval:
    prompt; sft_messages: messages (user + assistant), for chat-format tests. Each split has its own RNG stream,
    so e.g. changing n_sft does not change prefs.jsonl.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = all_prompts()

    def rng(split: str) -> random.Random:
        return random.Random(f"{seed}-{split}")  # str seeds are hashed deterministically (no PYTHONHASHSEED)

    train_prompts, eval_prompts = _split_prompts(rng("prompts"), n_prompts, n_eval_prompts)
    messages = [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                # In chat form the turn boundary already separates the answer: no leading space.
                {"role": "assistant", "content": row["completion"].strip()},
            ]
        }
        for row in _sft_rows(N_EVAL_ROWS, rng("sft_messages"), pool)
    ]
    files: dict[str, list[dict[str, Any]]] = {
        "sft": _sft_rows(n_sft, rng("sft"), pool),
        "sft_eval": _sft_rows(N_EVAL_ROWS, rng("sft_eval"), pool),
        "prefs": _pref_rows(n_pref, rng("prefs"), pool),
        "prefs_eval": _pref_rows(N_EVAL_ROWS, rng("prefs_eval"), pool),
        "prompts": [{"prompt": p} for p in train_prompts],
        "prompts_eval": [{"prompt": p} for p in eval_prompts],
        "sft_messages": messages,
    }
    return {name: _write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in files.items()}
