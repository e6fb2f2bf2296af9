"""PPO's runtime guards: hand-made batches that show each sign, and batches that must stay quiet."""

from __future__ import annotations

import math

import pytest

from ppo_cli.ppo.guards import BatchSigns, PPOGuards, distinct_n, kl_t_statistic


def test_distinct_n_hand_computed():
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert distinct_n(["good good good good"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""], 2) == 1.0  # no bigram at all


def test_kl_t_statistic_hand_computed():
    # mean -1, sample std 1 (values -2, -1, 0), n = 3: t = -1 / (1 / sqrt 3)
    assert kl_t_statistic([-2.0, -1.0, 0.0]) == pytest.approx(-math.sqrt(3))
    assert kl_t_statistic([0.5]) == 0.0
    assert kl_t_statistic([0.0, 0.0]) == 0.0


def healthy(n: int = 16, kl: list[float] | None = None, completions=None, eos=1.0, capped=0.0):
    words = ["calm river flows", "bright sun shines", "old tree stands", "soft wind blows"]
    return BatchSigns(
        kl_per_sequence=kl if kl is not None else [0.1 * ((-1) ** i) for i in range(n)],
        completions=completions or [words[i % 4] + f" {i}" for i in range(n)],
        eos_share=eos,
        capped_share=capped,
    )


def run_steps(guards: PPOGuards, steps: list[tuple[dict, BatchSigns]]) -> list[str]:
    said = []
    for step, (metrics, signs) in enumerate(steps, 1):
        said += guards.check(step, {"val/ratio": 1.0, "objective/kl": 0.0, **metrics}, signs)
    return said


def test_a_healthy_run_is_quiet():
    guards = PPOGuards(max_new_tokens=24, kl_warn=20.0)
    assert run_steps(guards, [({}, healthy())] * 10) == []


def test_noise_around_zero_kl_is_not_an_alarm():
    # +-0.2 nats around zero, slightly negative on average, as at a tiny learning rate
    noisy = [0.2 * math.sin(7 * i) - 0.02 for i in range(32)]
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    assert run_steps(guards, [({"objective/kl": sum(noisy) / 32}, healthy(kl=noisy))] * 6) == []


def test_significantly_negative_kl_warns_once_after_three_steps():
    negative = [-0.5 + 0.05 * (i % 3) for i in range(32)]
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    said = run_steps(guards, [({"objective/kl": -0.45}, healthy(kl=negative))] * 5)
    assert len(said) == 1 and "significantly negative for 3 steps" in said[0]


def test_eos_collapse_names_the_penalty():
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    said = run_steps(guards, [({}, healthy(eos=0.9)), ({}, healthy(eos=0.6)), ({}, healthy(eos=0.2))])
    assert len(said) == 1 and "ppo.missing_eos_penalty" in said[0] and "20%" in said[0]


def test_responses_pinned_at_the_cap():
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    said = run_steps(guards, [({}, healthy(eos=0.9)), ({}, healthy(eos=0.9, capped=0.95))])
    assert any("generation.max_new_tokens=24" in s for s in said)


def test_kl_beyond_the_ceiling_and_again_after_clearing():
    guards = PPOGuards(max_new_tokens=24, kl_warn=10.0)
    steps = [({"objective/kl": kl}, healthy()) for kl in (2.0, 12.0, 14.0, 5.0, 11.0)]
    said = run_steps(guards, steps)
    assert len(said) == 2 and all("ppo.kl_coef" in s for s in said)


def test_degenerate_text_with_rising_score():
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    repeat = ["good good good good good"] * 16
    steps = [
        ({"objective/scores_normalized": 0.0}, healthy()),
        ({"objective/scores_normalized": 1.5}, healthy(completions=repeat)),
    ]
    said = run_steps(guards, steps)
    assert len(said) == 1 and "repeat themselves" in said[0]
    # the same text without a rising score is not called reward hacking
    quiet = PPOGuards(max_new_tokens=24, kl_warn=None)
    assert run_steps(quiet, [({}, healthy()), ({}, healthy(completions=repeat))]) == []


def test_ratio_out_of_band():
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    assert "val/ratio=3.000" in guards.check(1, {"val/ratio": 3.0, "objective/kl": 0.0}, healthy())[0]


def test_state_round_trip_keeps_the_first_batch():
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    run_steps(guards, [({}, healthy(eos=0.9))])
    restored = PPOGuards(max_new_tokens=24, kl_warn=None)
    restored.load_state_dict(guards.state_dict())
    assert "ppo.missing_eos_penalty" in restored.check(2, {"val/ratio": 1.0}, healthy(eos=0.1))[0]
