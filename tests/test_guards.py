"""PPO's runtime guards: hand-made batches that show each sign, and batches that must stay quiet."""

from __future__ import annotations

import math

import pytest

from ppo_cli.ppo.guards import BatchSigns, PPOGuards, distinct_n, eos_fall_z, eos_knob, kl_t_statistic


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


def test_eos_collapse_compares_the_first_and_last_three_steps_and_names_the_active_knob():
    # 16 responses a step: 14 ended in each of the first 3 (0.9 -> 14), then 3 (0.2 -> 3): 9 of 48 = 19%.
    steps = [({}, healthy(eos=0.9))] * 3 + [({}, healthy(eos=0.2))] * 3
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    said = run_steps(guards, steps)
    assert len(said) == 1 and said[0].startswith("step 6: only 19% of responses end with EOS"), said
    assert "first 3 steps: 88%" in said[0] and "lower ppo.missing_eos_score" in said[0], said
    penalty = PPOGuards(max_new_tokens=24, kl_warn=None, eos_knob=eos_knob(1.0, -1.0))
    assert "raise ppo.missing_eos_penalty" in run_steps(penalty, steps)[0]
    assert eos_knob(None, None) == "set ppo.missing_eos_score, e.g. -1"


def test_eos_share_of_a_barely_trained_policy_wobbling_is_not_a_collapse():
    """4 responses a step whose ending is a coin with p ~ 0.3: a step with none ending, or three in a row
    with one, is chance (the warning used to fire at step 2 of the untrained tiny model)."""
    shares = [0.5, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.25, 0.0, 0.25]
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    assert run_steps(guards, [({}, healthy(n=4, eos=share)) for share in shares]) == []


def test_eos_fall_z_hand_computed():
    # p0 = 0.5, recent 2 of 16: (2 - 8) / sqrt(16 * 0.25) = -3
    assert eos_fall_z((8, 16), (2, 16)) == pytest.approx(-3.0)
    assert eos_fall_z((8, 16), (9, 16)) == 0.0  # no fall
    assert eos_fall_z((16, 16), (15, 16)) == -math.inf


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


def test_state_round_trip_keeps_the_first_steps():
    guards = PPOGuards(max_new_tokens=24, kl_warn=None)
    run_steps(guards, [({}, healthy(eos=0.9))] * 3 + [({}, healthy(eos=0.1))] * 2)
    restored = PPOGuards(max_new_tokens=24, kl_warn=None)
    restored.load_state_dict(guards.state_dict())
    said = restored.check(6, {"val/ratio": 1.0}, healthy(eos=0.1))
    assert "ppo.missing_eos_score" in said[0] and "first 3 steps: 88%" in said[0], said
