"""The reward scale's state across a run: which statistics ppo.reward_normalization fixed, and when."""

from __future__ import annotations

import torch

from ppo_cli import rlhf
from ppo_cli.dist import DistInfo, all_gather_cat


class RewardScale:
    """Puts scores on a fixed scale before the KL trade-off (docs/ppo-details.md, detail 17).

    sft_samples: mean/std of the scores of the first rollout batch (the policy is still the SFT policy
    then), fixed for the whole run; sft_mean: that mean, std 1; rm_stats: the RM's stored mean/std;
    whiten: per batch; none. The maths is rlhf.score_scale; this holds what it fixed, for checkpoints.
    """

    def __init__(self, mode: str, rm_stats: tuple[float, float] | None):
        self.mode = mode
        self.mean, self.std = rm_stats if mode == "rm_stats" and rm_stats else (None, None)

    def __call__(self, scores: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
        if self.mode == "none":
            return scores
        batch = None
        if self.mode == "whiten" or self.mean is None:
            # Statistics over every rank's scores, so all ranks scale alike.
            batch = rlhf.batch_score_stats(all_gather_cat(scores.double(), dist_info))
        fixed = None if self.mean is None else (self.mean, self.std)
        scale = rlhf.score_scale(self.mode, batch, fixed)
        if self.mode != "whiten":
            self.mean, self.std = scale
        return rlhf.scale_scores(scores, scale)

    def fixed_stats(self) -> tuple[float, float] | None:
        """(mean, std) once they are fixed for the run (rm_stats from the start, sft_samples after the
        first batch); None while unknown, and for per-batch whitening or no normalisation."""
        if self.mode in ("sft_samples", "sft_mean", "rm_stats") and self.mean is not None:
            return self.mean, self.std
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = state["mean"], state["std"]
