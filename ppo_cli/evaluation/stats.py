"""evaluate's numbers: means with 95% intervals over prompts, per-prompt win rates, distinct-n."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def mean_interval(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and its 95% interval (normal approximation; None with fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(var / n)
    return mean, [mean - half, mean + half]


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """Distinct word n-grams over all word n-grams of `texts` (None when there is none)."""
    grams = [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None


def per_prompt(values: list[float], n: int, k: int) -> list[float]:
    """Means over the k samples of each prompt; `values` are sample-major (index s * n + i)."""
    return [sum(values[s * n + i] for s in range(k)) / k for i in range(n)]


def model_report(rewards: list[float], lengths: list[int], eos: list[bool], texts: list[str], n: int, k: int):
    mean, ci = mean_interval(per_prompt(rewards, n, k))
    return {
        "reward_mean": mean,
        "reward_ci95": ci,
        "length_mean": sum(lengths) / len(lengths),
        "eos_rate": sum(eos) / len(eos),
        "distinct_2": distinct_n(texts, 2),
    }


def win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0
