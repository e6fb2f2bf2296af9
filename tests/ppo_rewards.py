"""Reward functions for the PPO CLI tests: `reward_fn=ppo_rewards:NAME`, with tests/ on PYTHONPATH.

Kept free of heavy imports: train-ppo imports this module in the CLI process.
"""

from __future__ import annotations

_calls = {"explode_from_third_call": 0}


def letters(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of the completion's characters that are lowercase ASCII letters (e2e learning test).

    The tiny random-init policy samples almost uniformly from its 513 tokens, which scores about 0.67;
    a policy that prefers word pieces such as ' good' or 'er' approaches 1.
    """
    del prompts
    return [sum("a" <= ch <= "z" for ch in c) / max(1, len(c)) for c in completions]


def raises(prompts: list[str], completions: list[str]) -> list[float]:
    raise RuntimeError("reward server unreachable")


def wrong_length(prompts: list[str], completions: list[str]) -> list[float]:
    return [0.0] * (len(completions) + 1)


def nan(prompts: list[str], completions: list[str]) -> list[float]:
    return [float("nan")] * len(completions)


def explode_from_third_call(prompts: list[str], completions: list[str]) -> list[float]:
    """Finite but huge scores from the third PPO step on: the losses overflow to inf there."""
    _calls["explode_from_third_call"] += 1
    value = 1e30 if _calls["explode_from_third_call"] >= 3 else 0.0
    return [value + i for i in range(len(completions))]


def record_rows(prompts: list[str], completions: list[str]) -> list[float]:
    """letters(), and each call's row count appended to $PPO_TEST_ROWS_LOG.<rank> (two-rank tests)."""
    import os

    with open(f"{os.environ['PPO_TEST_ROWS_LOG']}.{os.environ.get('RANK', '0')}", "a") as log:
        log.write(f"{len(completions)}\n")
    return letters(prompts, completions)
