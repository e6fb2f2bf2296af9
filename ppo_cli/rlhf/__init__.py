"""RLHF maths as pure functions on torch tensors: no models, no I/O, no global state.

Conventions used throughout this package:

* Tensors are batch-first. Per-token quantities have shape ``(B, T)`` and cover the RESPONSE tokens
  only (the prompt has already been sliced off by the caller).
* ``mask`` is a bool or 0/1 tensor of shape ``(B, T)`` marking the real response tokens: 1 up to and
  including the first EOS, 0 after it. Responses are therefore *right*-padded and the valid tokens form
  a contiguous prefix of each row (this is what :func:`truncate_after_eos` produces).
* Nothing here calls ``.detach()`` on its inputs except the monitoring statistics returned next to a
  loss; the caller decides what carries gradient.

Modules: tokens (masks, EOS, logprobs/entropy), stats (masked statistics, whitening), rewards
(score scaling, missing-EOS rules, KL-shaped rewards), advantages (GAE and the critic-free estimators), losses (PPO, RM), kl
(controllers), correction (the sampler's importance weights).

References cited in comments:

* [Huang24] S. Huang et al., "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
  Summarization", 2024 (arXiv:2403.17031), which re-implements OpenAI's lm-human-preferences.
* [Ziegler19] D. Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019
  (arXiv:1909.08593).
* [Schulman-KL] J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html, 2020.
* [GRPO] Z. Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", 2024 (arXiv:2402.03300). [DrGRPO] Z. Liu et al., "Understanding R1-Zero-Like Training: A
  Critical Perspective", 2025 (arXiv:2503.20783). [RLOO] A. Ahmadian et al., "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs", 2024 (arXiv:2402.14740).
  [RPP] J. Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", 2025
  (arXiv:2501.03262).
* [DAPO] Q. Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", 2025
  (arXiv:2503.14476). [GSPO] C. Zheng et al., "Group Sequence Policy Optimization", 2025
  (arXiv:2507.18071). [TIS] F. Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL
  Training", 2025 (truncated importance sampling between the sampler and the trainer); "When Speed Kills
  Stability: Demystifying RL Collapse from the Training-Inference Mismatch", 2025.
* [GAE] J. Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", 2015. [PPO] J. Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
"""

from ppo_cli.rlhf.advantages import (
    gae,
    group_advantages,
    leave_one_out_advantages,
    per_token,
    reward_to_go,
)
from ppo_cli.rlhf.correction import SAMPLER_CORRECTIONS, capped_share, sampler_weights
from ppo_cli.rlhf.kl import (
    AdaptiveKLController,
    FixedKLController,
    run_kl_horizon,
)
from ppo_cli.rlhf.losses import (
    RATIO_LEVELS,
    LossScale,
    aggregate_loss,
    clipped_ratio,
    pairwise_reward_loss,
    policy_loss,
    sequence_log_ratio,
    value_loss,
)
from ppo_cli.rlhf.rewards import (
    REWARD_NORMALIZATIONS,
    apply_missing_eos_penalty,
    batch_score_stats,
    clip_scores,
    kl_estimate,
    kl_per_token,
    normalize_scores,
    overlong_penalty,
    replace_missing_eos_score,
    scale_scores,
    score_scale,
    shape_rewards,
)
from ppo_cli.rlhf.stats import (
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten_from_moments,
)
from ppo_cli.rlhf.tokens import (
    entropy_from_logits,
    first_true_indices,
    has_eos,
    last_token_index,
    logprobs_from_logits,
    position_ids_from_mask,
    truncate_after_eos,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "LossScale",
    "RATIO_LEVELS",
    "REWARD_NORMALIZATIONS",
    "SAMPLER_CORRECTIONS",
    "apply_missing_eos_penalty",
    "batch_score_stats",
    "capped_share",
    "clip_scores",
    "clipped_ratio",
    "entropy_from_logits",
    "first_true_indices",
    "aggregate_loss",
    "gae",
    "group_advantages",
    "kl_estimate",
    "leave_one_out_advantages",
    "per_token",
    "reward_to_go",
    "has_eos",
    "kl_per_token",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "overlong_penalty",
    "pairwise_reward_loss",
    "policy_loss",
    "position_ids_from_mask",
    "replace_missing_eos_score",
    "run_kl_horizon",
    "sampler_weights",
    "scale_scores",
    "score_scale",
    "sequence_log_ratio",
    "shape_rewards",
    "truncate_after_eos",
    "value_loss",
    "whiten_from_moments",
]
