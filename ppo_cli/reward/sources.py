"""Where scores come from, for train-ppo and generate: exactly one of three sources.

- `reward_checkpoint` = our RM's final/ on the policy's base (train-ppo only): the "reward" adapter + head
  of the shared model scores the policy's own token ids (no decoding, no second model in memory).
- `reward_checkpoint` = any other sequence-classification model (a Hub id, a full model directory, or
  our RM on a different base; in generate, every RM): a separate model with its own tokenizer
  (`separate.SeparateRewardModel`); responses are decoded to text and re-tokenized for it, unless it
  shares the policy's vocabulary and the caller hands over the token ids.
- `reward_fn` = `package.module:function(prompts, completions) -> list[float]` (`functions`).

Every RM scores at the last real token (`scoring`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppo_cli.errors import UserError
from ppo_cli.models import (
    adapter_task_type,
    is_adapter_dir,
    looks_local,
    read_product_info,
    recorded_base_model,
    same_model,
)
from ppo_cli.reward.functions import call_reward_function, load_reward_function
from ppo_cli.reward.separate import SeparateRewardModel


def check_reward_source(reward_checkpoint: str | None, reward_fn: str | None, required: bool) -> None:
    """Refuse a wrong reward source before any model loads.

    required: train-ppo needs exactly one source; generate takes at most one.
    """
    given = [k for k, v in (("reward_checkpoint", reward_checkpoint), ("reward_fn", reward_fn)) if v]
    if required and len(given) != 1:
        raise UserError(
            "train-ppo needs exactly one reward source: reward_checkpoint=DIR_OR_HUB_ID (the RM stage's final/ or a "
            "sequence-classification model) or reward_fn=package.module:function; "
            + ("both were given." if given else "neither was given.")
        )
    if len(given) > 1:
        raise UserError(
            "give at most one reward source: reward_checkpoint=DIR or reward_fn=package.module:function."
        )
    if reward_fn:
        load_reward_function(reward_fn)  # a typo in the spec fails here, before any model loads
    if not reward_checkpoint:
        return
    path = Path(reward_checkpoint).expanduser()
    if looks_local(reward_checkpoint) and not path.is_dir():
        raise UserError(f"reward_checkpoint={reward_checkpoint}: no such directory.")
    if path.is_dir() and is_adapter_dir(path):
        stage = read_product_info(path, "reward_checkpoint").get("stage")
        if stage not in (None, "rm"):
            raise UserError(
                f"reward_checkpoint={reward_checkpoint} is the product of the {stage} stage, not a reward model."
            )
        if adapter_task_type(path) == "CAUSAL_LM":
            raise UserError(
                f"reward_checkpoint={reward_checkpoint} is a causal LM adapter (a policy), not a reward model."
            )


def rm_shares_base(reward_checkpoint: str, base_model: str) -> bool:
    """True when reward_checkpoint is one of our RM adapters trained on `base_model` (train-ppo then puts
    it on the shared base as the reward role)."""
    if not is_adapter_dir(reward_checkpoint):
        return False
    base = recorded_base_model(reward_checkpoint, "reward_checkpoint")
    return same_model(base, base_model)


@dataclass
class RewardSource:
    """One reward source; `kind` is "reward_fn", "RM adapter" (on PPO's shared base) or "separate model"."""

    kind: str
    func: Callable | None = None
    spec: str | None = None
    roles: Any = None  # ppo_cli.ppo.roles.Roles holding the reward adapter and head
    separate: SeparateRewardModel | None = None
    # The separate RM reads the policy's token ids as they are (same vocabulary): no re-tokenizing.
    same_tokenizer: bool = False

    def __call__(
        self,
        query_responses: torch.Tensor,
        attention_mask: torch.Tensor,
        prompts: list[Any],
        completions: list[str],
    ) -> torch.Tensor:
        """PPO's reward: scores (B,) of a rollout batch; the prompts as the rows give them."""
        if self.roles is not None:
            return self.roles.reward_scores(query_responses, attention_mask)
        return self.score(prompts, completions)

    def score(
        self, prompts: list[Any], completions: list[str], sequences: list[list[int]] | None = None
    ) -> torch.Tensor:
        """Scores (B,) float32 of completions to `prompts` (strings or conversations). `sequences`: the
        policy's token ids of prompt + response through EOS, scored as they are when the RM shares the
        policy's vocabulary."""
        if self.func is not None:
            return call_reward_function(self.func, self.spec, prompts, completions)
        if self.separate is None:
            raise RuntimeError("the shared-base RM adapter scores token ids: call the source as PPO does")
        if sequences is not None and self.same_tokenizer:
            return self.separate.score_ids(sequences)
        return self.separate.score(prompts, completions)


def build_reward(
    reward_checkpoint: str | None,
    reward_fn: str | None,
    model_cfg,
    device: torch.device,
    batch_size: int,
    roles=None,
    policy_tokenizer=None,
) -> RewardSource | None:
    """The reward source named by reward_checkpoint / reward_fn (checked by `check_reward_source`); None
    when neither is given.

    roles: PPO's roles when reward_checkpoint is an RM adapter on their base (`rm_shares_base`): its
    reward adapter and head score. policy_tokenizer: lets a separate RM with the same vocabulary score
    the policy's token ids directly.
    """
    if reward_fn:
        return RewardSource("reward_fn", func=load_reward_function(reward_fn), spec=reward_fn)
    if not reward_checkpoint:
        return None
    if roles is not None:
        return RewardSource("RM adapter", roles=roles)
    # The RM's base comes from its own checkpoint; model_cfg gives dtype and loading options.
    separate = SeparateRewardModel(str(reward_checkpoint), model_cfg, device, batch_size)
    same = policy_tokenizer is not None and separate.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
    return RewardSource("separate model", separate=separate, same_tokenizer=same)
