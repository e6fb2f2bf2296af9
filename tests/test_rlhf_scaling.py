"""Reward scaling (every ppo.reward_normalization mode), the score clip and cross-rank whitening,
hand-computed (docs/ppo-details.md, details 12 and 17)."""

from __future__ import annotations

import pytest
import torch

from ppo_cli.dist import DistInfo
from ppo_cli.ppo.scale import RewardScale
from ppo_cli.rlhf import (
    REWARD_NORMALIZATIONS,
    batch_score_stats,
    clip_scores,
    masked_moments,
    masked_whiten,
    scale_scores,
    score_scale,
    whiten_from_moments,
)

# scores [1, 2, 3, 6]: mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3, std 2.1602469
FIRST = torch.tensor([1.0, 2.0, 3.0, 6.0])
FIRST_STATS = (3.0, 2.1602469)
FIRST_WHITENED = [-0.9258201, -0.4629100, 0.0, 1.3887301]  # (x - 3) / 2.1602469
LATER = torch.tensor([5.0, 3.0])


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.float(), torch.tensor(expected), atol=atol, rtol=0)


def test_batch_score_stats_and_the_stds_that_cannot_divide():
    mean, std = batch_score_stats(FIRST)
    assert mean == pytest.approx(3.0) and std == pytest.approx(FIRST_STATS[1], abs=1e-6)
    assert batch_score_stats(torch.tensor([4.0])) == (4.0, 1.0)  # one score: no spread
    assert batch_score_stats(torch.tensor([2.0, 2.0, 2.0])) == (2.0, 1.0)  # all alike


def test_none_leaves_the_scores_raw():
    assert score_scale("none", FIRST_STATS, None) is None
    assert torch.equal(scale_scores(FIRST, None), FIRST)


def test_whiten_uses_each_batch_own_statistics():
    assert score_scale("whiten", FIRST_STATS, (100.0, 100.0)) == FIRST_STATS  # never a fixed scale
    close(scale_scores(FIRST, score_scale("whiten", FIRST_STATS, None)), FIRST_WHITENED)
    later = batch_score_stats(LATER)  # mean 4, std sqrt(2) = 1.4142136
    close(scale_scores(LATER, score_scale("whiten", later, None)), [0.7071068, -0.7071068])


def test_sft_samples_fixes_the_first_batch_statistics():
    scale = score_scale("sft_samples", FIRST_STATS, None)
    assert scale == FIRST_STATS
    close(scale_scores(FIRST, scale), FIRST_WHITENED)
    # Later batches keep the first one's scale: (5 - 3) / 2.1602469 = 0.9258201, (3 - 3) = 0.
    kept = score_scale("sft_samples", batch_score_stats(LATER), scale)
    assert kept == FIRST_STATS
    close(scale_scores(LATER, kept), [0.9258201, 0.0])


def test_sft_mean_only_centres():
    scale = score_scale("sft_mean", FIRST_STATS, None)
    assert scale == (3.0, 1.0)
    close(scale_scores(FIRST, scale), [-2.0, -1.0, 0.0, 3.0])
    close(scale_scores(LATER, score_scale("sft_mean", batch_score_stats(LATER), scale)), [2.0, 0.0])


def test_rm_stats_uses_the_stored_statistics():
    # (x - 1) / 0.5
    scale = score_scale("rm_stats", FIRST_STATS, (1.0, 0.5))
    assert scale == (1.0, 0.5)
    close(scale_scores(FIRST, scale), [0.0, 2.0, 4.0, 10.0])
    # An RM without stored statistics falls back to the first batch's (train-ppo refuses that case).
    assert score_scale("rm_stats", FIRST_STATS, None) == FIRST_STATS


def test_reward_scale_state_over_a_run():
    """RewardScale holds what the pure functions fixed, and checkpoints it."""
    one = DistInfo()
    expected = {
        "none": ([1.0, 2.0, 3.0, 6.0], [5.0, 3.0], None),
        "whiten": (FIRST_WHITENED, [0.7071068, -0.7071068], None),
        "sft_samples": (FIRST_WHITENED, [0.9258201, 0.0], FIRST_STATS),
        "sft_mean": ([-2.0, -1.0, 0.0, 3.0], [2.0, 0.0], (3.0, 1.0)),
        "rm_stats": ([0.0, 2.0, 4.0, 10.0], [8.0, 4.0], (1.0, 0.5)),
    }
    assert set(expected) == set(REWARD_NORMALIZATIONS)
    for mode, (first, later, fixed) in expected.items():
        scale = RewardScale(mode, (1.0, 0.5))
        close(scale(FIRST, one), first)
        close(scale(LATER, one), later)
        if fixed is None:
            assert scale.fixed_stats() is None, mode
        else:
            assert scale.fixed_stats() == pytest.approx(fixed, abs=1e-6), mode
            resumed = RewardScale(mode, None)
            resumed.load_state_dict(scale.state_dict())
            close(resumed(LATER, one), later)


def test_score_clip():
    scores = torch.tensor([-3.0, 0.5, 7.0])
    close(clip_scores(scores, 2.0), [-2.0, 0.5, 2.0])
    assert torch.equal(clip_scores(scores, None), scores)


def test_cross_rank_whitening_equals_masked_whiten_over_all_rows():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # Real tokens 1, 2, 3, 4, 5: sum 15, sum of squares 1 + 4 + 9 + 16 + 25 = 55, count 5.
    close(masked_moments(x, mask), [15.0, 55.0, 5.0])
    # Two "ranks", one row each: their moments summed by hand are the whole batch's,
    # and each rank's whitened rows are masked_whiten's over both rows.
    rank0, rank1 = masked_moments(x[:1], mask[:1]), masked_moments(x[1:], mask[1:])
    close(rank0, [6.0, 14.0, 3.0])  # 1 + 2 + 3, 1 + 4 + 9
    close(rank1, [9.0, 41.0, 2.0])  # 4 + 5, 16 + 25
    total = rank0 + rank1
    whole = masked_whiten(x, mask)
    # mean 3, unbiased var 2.5: (x - 3) / 1.5811388
    close(whole, [[-1.2649111, -0.6324555, 0.0, 0.0], [0.6324555, 1.2649111, 0.0, 0.0]])
    close(whiten_from_moments(x[:1], mask[:1], total), whole[:1].tolist())
    close(whiten_from_moments(x[1:], mask[1:], total), whole[1:].tolist())
