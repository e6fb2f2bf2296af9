"""Tests for ppo_cli.rlhf with hand-computed expectations.

Every expected number below is written out (worked in the comment next to it), never produced by
calling the formula under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppo_cli.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    entropy_from_logits,
    first_true_indices,
    gae,
    has_eos,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    normalize_scores,
    pairwise_reward_loss,
    policy_loss,
    position_ids_from_mask,
    replace_missing_eos_score,
    run_kl_horizon,
    shape_rewards,
    truncate_after_eos,
    value_loss,
)


def close(actual, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(torch.as_tensor(actual).float(), expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# Positions / EOS
# ------------------------------------------------------------------------------------------------


def test_position_ids_under_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    # cumsum - 1 = [-1,-1,0,1,2] -> clamp -> [0,0,0,1,2]
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    out = position_ids_from_mask(mask)
    assert out.dtype == torch.long
    assert torch.equal(out, expected)
    assert torch.equal(position_ids_from_mask(mask.bool()), expected)


def test_first_true_indices():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert torch.equal(first_true_indices(bools), torch.tensor([1, 3, 0]))


def test_truncate_after_eos_single_id():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [2, 5, 6, 7],  # EOS at start -> only the EOS is kept
            [5, 6, 2, 7],  # EOS in the middle
            [5, 6, 7, 8],  # no EOS -> whole row kept
            [5, 2, 6, 2],  # several EOS -> cut at the first
        ]
    )
    out, mask = truncate_after_eos(ids, eos, pad)
    assert torch.equal(out, torch.tensor([[2, 0, 0, 0], [5, 6, 2, 0], [5, 6, 7, 8], [5, 2, 0, 0]]))
    assert mask.dtype == torch.bool
    assert torch.equal(mask.long(), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(last_token_index(mask), torch.tensor([0, 2, 3, 1]))
    assert has_eos(out, mask, eos).tolist() == [True, True, False, True]
    # input untouched
    assert ids[0, 1].item() == 5


def test_truncate_after_eos_list_of_ids_and_pad_none():
    ids = torch.tensor([[5, 9, 2, 6], [5, 6, 7, 2], [9, 2, 2, 2], [1, 1, 1, 1]])
    out, mask = truncate_after_eos(ids, [2, 9], pad_token_id=0)
    assert torch.equal(out, torch.tensor([[5, 9, 0, 0], [5, 6, 7, 2], [9, 0, 0, 0], [1, 1, 1, 1]]))
    assert torch.equal(mask.long(), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]))
    assert has_eos(out, mask, (2, 9)).tolist() == [True, True, True, False]
    # pad_token_id=None falls back to the first EOS id (2)
    out2, _ = truncate_after_eos(ids, (2, 9), pad_token_id=None)
    assert out2[0].tolist() == [5, 9, 2, 2]


def test_has_eos_empty_row_is_false():
    ids = torch.tensor([[2, 2]])
    assert has_eos(ids, torch.tensor([[0, 0]]), 2).tolist() == [False]


def test_missing_eos_penalty_only_hits_rows_without_eos():
    scores = torch.tensor([1.0, 2.0, 3.0])
    eos = torch.tensor([True, False, True])
    out = apply_missing_eos_penalty(scores, eos, 1.5)
    close(out, [1.0, 0.5, 3.0])  # 2.0 - 1.5 = 0.5 on the row without EOS only
    close(scores, [1.0, 2.0, 3.0])  # input not modified
    for p in (None, 0, 0.0):
        same = apply_missing_eos_penalty(scores, eos, p)
        close(same, [1.0, 2.0, 3.0])
        assert same is not scores
    with pytest.raises(ValueError):
        apply_missing_eos_penalty(scores, eos, -1.0)


# ------------------------------------------------------------------------------------------------
# Log-probs / entropy
# ------------------------------------------------------------------------------------------------


def test_logprobs_with_temperature_hand_computed():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    labels = torch.tensor([[2]])
    # T=2: z = [0.5, 1.0, 1.5]; log p(2) = 1.5 - logsumexp(z)
    #      = -log(1 + e^-0.5 + e^-1) = -log(1 + 0.6065307 + 0.3678794) = -log(1.9744101) = -0.6802697
    close(logprobs_from_logits(logits, labels, temperature=2.0), [[-0.6802697]])
    # T=1: -log(1 + e^-1 + e^-2) = -log(1.5032147) = -0.4076059
    close(logprobs_from_logits(logits, labels), [[-0.4076059]])


def test_logprobs_equal_log_softmax_of_scaled_logits_and_are_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    for temp in (1.0, 0.7, 1.3):
        expected = torch.log_softmax(logits / temp, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        close(logprobs_from_logits(logits, labels, temperature=temp), expected)
    out = logprobs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, temperature=0.0)


def test_entropy_hand_computed():
    # uniform over 4 -> log 4 = 1.3862944
    # p = [0.25, 0.75] (logits [0, ln 3]) -> 0.25*ln4 + 0.75*ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    close(entropy_from_logits(logits), [[1.3862944, 0.5623351]])
    # temperature: logits [0, 2 ln 3] at T=2 are [0, ln 3] -> same 0.5623351
    close(entropy_from_logits(torch.tensor([[[0.0, 2 * math.log(3.0)]]]), temperature=2.0), [[0.5623351]])


def test_entropy_with_suppressed_tokens_and_its_extremes():
    """PPO's scoring logits carry -inf for the pad token (never sampled): a zero-probability entry adds
    nothing to the entropy (0 * -inf must not turn it into NaN)."""
    V = 1000
    uniform = torch.zeros(1, 1, V)
    close(entropy_from_logits(uniform), [[math.log(V)]])  # ln 1000 = 6.9077553
    # Uniform over 3 tokens, the 4th suppressed: ln 3 = 1.0986123
    close(entropy_from_logits(torch.tensor([[[1.0, 1.0, 1.0, float("-inf")]]])), [[1.0986123]])
    # One-hot-ish: logits [50, 0, 0, -inf]: p(others) = e^-50 each ~ 2e-22, H ~ 2 * 51 * e^-50 ~ 2e-20 -> 0
    close(entropy_from_logits(torch.tensor([[[50.0, 0.0, 0.0, float("-inf")]]]), temperature=1.0), [[0.0]])


# ------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------


def test_masked_sum_mean_ignore_pads_even_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, mask), 7.0)  # 1 + 2 + 4
    close(masked_mean(x, mask), 7.0 / 3.0)
    close(masked_sum(x, mask, dim=-1), [3.0, 4.0])
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])
    # empty reduction -> 0, not NaN
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    close(masked_mean(x, torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1), [1.5, 0.0])


def test_masked_var():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # valid = 1..5, mean 3, squared deviations 4+1+0+1+4 = 10 -> biased 10/5 = 2, unbiased 10/4 = 2.5
    close(masked_var(x, mask), 2.5)
    close(masked_var(x, mask, unbiased=False), 2.0)
    # a single valid entry has no spread: 0, not a division by zero
    close(masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])), 0.0)


def test_masked_whiten_mean0_std1_over_mask_and_zero_at_pads():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # mean 3, unbiased var 2.5, sqrt(2.5) = 1.5811388 -> (x - 3) / 1.5811388
    # [-2, -1, 0, 1, 2] / 1.5811388 = [-1.2649111, -0.6324555, 0, 0.6324555, 1.2649111]
    out = masked_whiten(x, mask)
    close(out, [[-1.2649111, -0.6324555, 0.0, 0.0], [0.6324555, 1.2649111, 0.0, 0.0]])
    m = mask.bool()
    close(out[m].mean(), 0.0)
    close(out[m].std(unbiased=True), 1.0)
    assert (out[~m] == 0).all()


# ------------------------------------------------------------------------------------------------
# KL / reward shaping
# ------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, 5.0]])
    ref = torch.tensor([[-1.5, -1.0, -50.0]])  # last token is a pad with garbage
    mask = torch.tensor([[1, 1, 0]])
    # k1 = lp - ref = [0.5, -1.0]
    close(kl_per_token(lp, ref, mask), [[0.5, -1.0, 0.0]])


def test_shape_rewards_score_at_last_real_token_and_no_kl_at_pads():
    scores = torch.tensor([1.0, -2.0])
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -7.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # lp - ref: row0 [0.5, 0, -1]; row1 [0.5, 0, (pad)]
    # non_score = -0.1 * (lp - ref): row0 [-0.05, 0, 0.1]; row1 [-0.05, 0, 0]
    rewards, non_score = shape_rewards(scores, lp, ref, mask, kl_coef=0.1)
    close(non_score, [[-0.05, 0.0, 0.1], [-0.05, 0.0, 0.0]])
    # score on index 2 of row0 (0.1 + 1 = 1.1), on index 1 of row1 (0 - 2 = -2); pad stays 0
    close(rewards, [[-0.05, 0.0, 1.1], [-0.05, -2.0, 0.0]])


def test_normalize_scores():
    close(normalize_scores(torch.tensor([3.0, 1.0]), 2.0, 2.0), [0.5, -0.5])  # (3-2)/2, (1-2)/2


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------


def test_gae_two_rows_with_masked_tail():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma = 1, lam = 0.5
    # row 0: t2: d = 2 + 0 - 1.5 = 0.5,   A2 = 0.5
    #        t1: d = 0 + 1.5 - 1 = 0.5,   A1 = 0.5 + 0.5*0.5 = 0.75
    #        t0: d = 1 + 1.0 - 0.5 = 1.5, A0 = 1.5 + 0.5*0.75 = 1.875
    # row 1: t2 masked (reward 99 / value 50 ignored), A2 = 0
    #        t1: d = 3 + 0 - 1 = 2,       A1 = 2
    #        t0: d = 1 + 1 - 2 = 0,       A0 = 0 + 0.5*2 = 1
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[1.875, 0.75, 0.5], [1.0, 2.0, 0.0]])
    # returns = A + V: [2.375, 1.75, 2.0], [3.0, 3.0, 0]
    close(ret, [[2.375, 1.75, 2.0], [3.0, 3.0, 0.0]])

    # gamma = 0.5, lam = 1 on row 0: A_t = sum_k 0.5^k r_{t+k} - V_t
    #   t0: 1 + 0 + 0.25*2 - 0.5 = 1.0 ; t1: 0 + 0.5*2 - 1 = 0.0 ; t2: 2 - 1.5 = 0.5
    adv2, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    close(adv2, [[1.0, 0.0, 0.5]])


def test_gae_lam_gamma_one_is_future_reward_sum_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([[True, True, True, False]])
    # future sums over valid tokens: [1+2+3, 2+3, 3] = [6, 5, 3]; minus V: [-4, -15, -27]; pad 0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[-4.0, -15.0, -27.0, 0.0]])
    close(ret, [[6.0, 5.0, 3.0, 0.0]])


# ------------------------------------------------------------------------------------------------
# PPO losses
# ------------------------------------------------------------------------------------------------


def test_policy_loss_hand_computed_with_clipping():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 100.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
    new = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # c = 0.2
    # (1.5, A=+1):  pg1 = -1.5, pg2 = -1.2 -> max -1.2, clipped
    # (0.5, A=+1):  pg1 = -0.5, pg2 = -0.8 -> max -0.5, not clipped
    # (1.1, A=-1):  pg1 =  1.1, pg2 =  1.1 -> 1.1,      not clipped
    # (0.5, A=-1):  pg1 =  0.5, pg2 =  0.8 -> max 0.8,  clipped
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05 ; clipfrac = 2/4
    # approxkl = 0.5 * (ln1.5^2 + ln0.5^2 + ln1.1^2 + ln0.5^2) / 4
    #          = 0.5 * (0.1644019 + 0.4804530 + 0.0090840 + 0.4804530) / 4 = 0.1417990
    # ratio = (1.5 + 0.5 + 1.1 + 0.5) / 4 = 0.9
    out = policy_loss(new, old, adv, mask, clip_range=0.2)
    close(out["loss"], 0.05)
    close(out["clipfrac"], 0.5)
    close(out["approxkl"], 0.1417990)
    close(out["ratio"], 0.9)
    out["loss"].backward()
    # gradient only flows through unclipped valid tokens: d/dnew of -A*ratio/4 = -A*ratio/4
    # (0.5, A=1): -0.125 ; (1.1, A=-1): +0.275 ; all others 0
    close(new.grad, [[0.0, -0.125, 0.275], [0.0, 0.0, 0.0]])


def test_policy_loss_garbage_at_pads_gives_finite_grads():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.0, 0.0, 1e4]], requires_grad=True)  # exp(1e4) = inf if not masked first
    out = policy_loss(new, old, torch.ones(1, 3), torch.tensor([[1, 1, 0]]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(new.grad).all()


def test_policy_loss_new_equals_old():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 4, generator=g)
    adv = torch.tensor([[1.0, -2.0, 3.0, 9.0], [0.5, 0.5, 9.0, 9.0], [-1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    out = policy_loss(lp.clone(), lp, adv, mask)
    close(out["ratio"], 1.0)
    close(out["approxkl"], 0.0)
    close(out["clipfrac"], 0.0)
    # loss = -mean(A over valid) = -(1 - 2 + 3 + 0.5 + 0.5 - 1) / 6 = -2/6
    close(out["loss"], -1.0 / 3.0)


def test_value_loss_with_one_clipped_entry():
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    new = torch.tensor([[1.5, 1.1, 0.5, 9.0]])
    returns = torch.tensor([[2.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # c = 0.2
    # v=1.5 -> clip 1.2, R=2: l1 = 0.25, l2 = 0.64 -> 0.64 (clipped loss larger: counted)
    # v=1.1 -> clip 1.1, R=1: l1 = 0.01, l2 = 0.01 -> 0.01
    # v=0.5 -> clip 0.8, R=2: l1 = 2.25, l2 = 1.44 -> 2.25 (unclipped larger: not counted)
    # loss = 0.5 * (0.64 + 0.01 + 2.25) / 3 = 0.4833333 ; clipfrac = 1/3
    out = value_loss(new, old, returns, mask, clip_range=0.2)
    close(out["loss"], 0.4833333)
    close(out["clipfrac"], 1.0 / 3.0)
    # no clipping: 0.5 * (0.25 + 0.01 + 2.25) / 3 = 0.4183333
    close(value_loss(new, old, returns, mask, clip_range=None)["loss"], 0.4183333)


# ------------------------------------------------------------------------------------------------
# KL controllers
# ------------------------------------------------------------------------------------------------


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 512)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert c2.value == 0.05


def test_adaptive_kl_controller():
    n, horizon = 512, 10000
    c = AdaptiveKLController(0.1, target=6.0, horizon=horizon)
    c.update(6.0, n)  # KL == target -> e = 0
    assert c.value == pytest.approx(0.1, abs=1e-12)

    c.update(12.0, n)  # KL == 2*target -> e = 1, clipped to 0.2 -> factor 1 + 0.2*512/10000 = 1.01024
    assert c.value == pytest.approx(0.101024, rel=1e-12)

    c = AdaptiveKLController(0.1, target=6.0, horizon=horizon)
    c.update(1e6, n)  # huge -> still clipped at 0.2
    assert c.value == pytest.approx(0.101024, rel=1e-12)

    c = AdaptiveKLController(0.1, target=6.0, horizon=horizon)
    c.update(6.6, n)  # e = 0.1 (not clipped) -> factor 1.00512
    assert c.value == pytest.approx(0.100512, rel=1e-12)

    c = AdaptiveKLController(0.1, target=6.0, horizon=horizon)
    c.update(0.0, n)  # e = -1 clipped to -0.2 -> factor 0.98976
    assert c.value == pytest.approx(0.098976, rel=1e-12)

    state = json.loads(json.dumps(c.state_dict()))
    assert all(isinstance(v, float) for v in state.values())
    c2 = AdaptiveKLController(1.0)
    c2.load_state_dict(state)
    assert c2.value == c.value and c2.target == 6.0 and c2.horizon == 10000.0


def test_adaptive_kl_controller_resumes_beta_only():
    """A resumed run keeps the target and horizon it was built with (its config and its length, which a
    resume may extend: both are what the user asks for now); only beta, where the controller had moved
    it, comes back."""
    saved = AdaptiveKLController(0.1, target=3.0, horizon=run_kl_horizon(25 * 4, 4))
    saved.update(12.0, 4)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=run_kl_horizon(40 * 4, 4))
    resumed.load_state_dict(json.loads(json.dumps(saved.state_dict())))
    assert resumed.value == saved.value != 0.1
    assert (resumed.target, resumed.horizon) == (6.0, 16.0) and saved.horizon == 10.0
    resumed.update(12.0, 4)  # e clipped to 0.2 over the new horizon: factor 1 + 0.2 * 4 / 16
    assert resumed.value == pytest.approx(saved.value * 1.05, rel=1e-12)


def test_run_kl_horizon_binds_in_a_short_run():
    # 80 steps x 32 episodes: horizon 2560 / 10 = 256 episodes
    assert run_kl_horizon(2560, 32) == pytest.approx(256.0)
    c = AdaptiveKLController(0.1, target=6.0, horizon=run_kl_horizon(2560, 32))
    for _ in range(10):
        c.update(12.0, 32)  # KL = 2 x target: e clipped to 0.2 -> factor 1 + 0.2 * 32 / 256 = 1.025
    assert c.value == pytest.approx(0.1 * 1.025**10, rel=1e-12)  # 0.12800845
    # over the whole run, a KL held above 1.2 x target moves beta by 1.025^80 = 7.21 (~e^2), whatever
    # the run's length; Ziegler et al.'s fixed 10,000 episodes would allow 1.00064^80 = 1.05 here
    c = AdaptiveKLController(0.1, target=6.0, horizon=run_kl_horizon(2560, 32))
    for _ in range(80):
        c.update(100.0, 32)
    assert c.value / 0.1 == pytest.approx(1.025**80, rel=1e-12)
    # a run of 100,000 episodes gets Ziegler et al.'s horizon
    assert run_kl_horizon(100_000, 512) == pytest.approx(10_000.0)
    # 3 steps x 4: a tenth is 1.2 episodes, which would make 1 - 0.2 * 4 / 1.2 < 0; the floor is 2 steps
    assert run_kl_horizon(12, 4) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        run_kl_horizon(0, 4)


def test_replace_missing_eos_score():
    scores = torch.tensor([3.0, -2.0, 0.5, 5.0])
    eos = torch.tensor([True, False, True, False])
    out = replace_missing_eos_score(scores, eos, -1.0)
    assert out.tolist() == [3.0, -1.0, 0.5, -1.0]
    assert scores.tolist() == [3.0, -2.0, 0.5, 5.0]  # input untouched
    assert replace_missing_eos_score(scores, eos, None).tolist() == scores.tolist()


# ------------------------------------------------------------------------------------------------
# Reward model loss
# ------------------------------------------------------------------------------------------------


def test_pairwise_reward_loss_hand_computed():
    r_c = torch.tensor([2.0, 0.0])
    r_r = torch.tensor([1.0, 1.0])
    # d = [1, -1]; -logsigmoid(1) = log(1 + e^-1) = 0.3132617 ; -logsigmoid(-1) = log(1 + e) = 1.3132617
    out = pairwise_reward_loss(r_c, r_r)
    close(out["loss"], 0.8132617)
    close(out["accuracy"], 0.5)
    assert out["accuracy"].dtype == torch.float32
    # margin 1: d = [0, -2]; log 2 = 0.6931472 ; log(1 + e^2) = 2.1269280 -> mean 1.4100376
    close(pairwise_reward_loss(r_c, r_r, margin=1.0)["loss"], 1.4100376)
    # per-pair margin [1, 0]: d = [0, -1] -> (0.6931472 + 1.3132617) / 2 = 1.0032044
    close(pairwise_reward_loss(r_c, r_r, margin=torch.tensor([1.0, 0.0]))["loss"], 1.0032044)
    # centering 0.01: (r_c + r_r)^2 = [9, 1], mean 5 -> 0.8132617 + 0.05 = 0.8632617
    close(pairwise_reward_loss(r_c, r_r, center_coef=0.01)["loss"], 0.8632617)
    # (B, 1) inputs are flattened; mismatched shapes rejected
    close(pairwise_reward_loss(r_c[:, None], r_r[:, None])["loss"], 0.8132617)
    with pytest.raises(ValueError):
        pairwise_reward_loss(r_c, torch.ones(3))
