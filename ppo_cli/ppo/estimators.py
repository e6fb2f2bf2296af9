"""How a rollout's advantages are estimated: each estimator's settings and its arithmetic on a rollout.

gae is PPO's (a learned critic); grpo, rloo and reinforce_plus_plus need no critic: the baseline comes
from the other samples of the same prompt (grpo, rloo) or from whitening over the batch
(reinforce_plus_plus). Every estimator feeds the same clipped policy loss, epochs and minibatches.

Each estimator's own defaults, used where a key is null (docs/ppo-details.md, "Advantage estimators"):

| estimator           | KL goes in      | KL estimator | loss aggregation    | whiten | source                  |
|---------------------|-----------------|--------------|---------------------|--------|-------------------------|
| gae                 | reward, per tok | k1           | token_mean          | yes    | Ziegler et al. 2019     |
| grpo                | loss            | k3           | seq_mean_token_mean | no     | Shao et al. 2024 (GRPO) |
| rloo                | reward, per seq | k1           | token_mean          | no     | Ahmadian et al. 2024    |
| reinforce_plus_plus | reward, per tok | k1           | token_mean          | yes    | Hu 2025 (REINFORCE++)   |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ppo_cli import rlhf
from ppo_cli.errors import UserError

GROUP_ESTIMATORS = ("grpo", "rloo")


def k1_in_the_loss(where: str) -> str:
    """The refusal of k1 in the loss (`where`: how the KL came to be in the loss). Refused rather than
    given k2's gradient: a run asking for k1 would silently train with another estimator
    (docs/ppo-details.md, "KL estimators")."""
    return (
        f"{where} with ppo.kl_estimator=k1 adds no KL penalty: k1 = log pi - log pi_ref has an expected "
        "gradient of zero over tokens sampled from pi (E_pi[grad log pi] = 0), so nothing holds the policy "
        "near the reference while an adaptive controller keeps raising beta. In the loss use "
        "ppo.kl_estimator=k3_plus (k3's value with k2's gradient, that of KL(pi || pi_ref); verl's k3+), k2 "
        "(the same gradient), k3_iw (k3 weighted by pi / pi_old, TRL's bias-corrected KL) or k3 (GRPO's; "
        "its gradient is that of the reverse KL(pi_ref || pi)), or keep k1 in the reward with "
        'ppo.kl_in=reward. See docs/ppo-details.md, "KL estimators".'
    )


@dataclass(frozen=True)
class Estimation:
    """The resolved settings of one run's advantage estimation."""

    estimator: str
    group_size: int  # samples per prompt
    kl_in: str  # reward or loss
    kl_estimator: str  # one of rlhf.rewards.KL_ESTIMATORS; never k1 in the loss
    loss_aggregation: str
    whiten: bool
    norm_adv_by_std: bool  # grpo only

    @property
    def critic(self) -> bool:
        """Whether the run trains a value adapter and head."""
        return self.estimator == "gae"


def resolve_estimation(ppo: DictConfig, generation: DictConfig) -> Estimation:
    """The run's Estimation: the keys the user set, the estimator's own defaults for the null ones."""
    estimator = str(ppo.advantage_estimator)
    group_size = int(generation.samples_per_prompt)
    if group_size < 1:
        raise UserError(f"generation.samples_per_prompt={group_size} must be at least 1.")
    if estimator in GROUP_ESTIMATORS and group_size < 2:
        raise UserError(
            f"ppo.advantage_estimator={estimator} needs several samples of each prompt to estimate its "
            f"baseline, but generation.samples_per_prompt={group_size}. Set generation.samples_per_prompt=4 "
            "(or more; train.batch_size stays the number of prompts per rollout batch), or use "
            "ppo.advantage_estimator=gae or reinforce_plus_plus, which work with one sample per prompt."
        )
    kl_in = str(ppo.kl_in) if ppo.kl_in is not None else ("loss" if estimator == "grpo" else "reward")
    kl_estimator = (
        str(ppo.kl_estimator) if ppo.kl_estimator is not None else ("k3" if kl_in == "loss" else "k1")
    )
    if kl_in == "loss" and kl_estimator == "k1":
        set_by = "" if ppo.kl_in is not None else f" (ppo.advantage_estimator={estimator}'s default)"
        raise UserError(k1_in_the_loss(f"ppo.kl_in=loss{set_by}"))
    if ppo.loss_aggregation is not None:
        aggregation = str(ppo.loss_aggregation)
    else:
        aggregation = "seq_mean_token_mean" if estimator == "grpo" else "token_mean"
    if ppo.whiten_advantages is not None:
        whiten = bool(ppo.whiten_advantages)
    else:
        whiten = estimator in ("gae", "reinforce_plus_plus")
    return Estimation(
        estimator, group_size, kl_in, kl_estimator, aggregation, whiten, bool(ppo.norm_adv_by_std)
    )


def critic_free_advantages(
    est: Estimation, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, R), of a critic-free estimator from the per-token rewards (the
    score on the last real token, plus the KL penalty on every token when it goes in the reward).

    grpo, rloo: the sequence's return (the sum of its rewards) against its group's baseline, the same
    advantage on every token of the response; reinforce_plus_plus: the reward-to-go at each token.
    Whitening, when on, is the caller's (it spans ranks).
    """
    if est.estimator == "reinforce_plus_plus":
        returns = rlhf.reward_to_go(rewards, mask, gamma)
        return returns, returns
    sequence_return = rlhf.masked_sum(rewards, mask, dim=1)
    if est.estimator == "grpo":
        adv = rlhf.group_advantages(sequence_return, est.group_size, est.norm_adv_by_std)
    elif est.estimator == "rloo":
        adv = rlhf.leave_one_out_advantages(sequence_return, est.group_size)
    else:
        raise ValueError(f"{est.estimator} is not a critic-free estimator")
    return rlhf.per_token(adv, mask), rlhf.per_token(sequence_return, mask)
