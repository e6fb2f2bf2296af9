"""Steps 1-5 of a PPO step: sample a batch of responses and score it (docs/ppo-details.md details).

`Rollout` is what a step learns from; it is never changed in place: the step that adds the old
logprobs and values (from the first update pass) makes a new one with dataclasses.replace.
`ForwardPasses` are the scoring passes over the roles, shared with the update (step.py);
`RolloutMaker` samples and scores one batch with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ppo_cli import rlhf, sampling
from ppo_cli.data import pad_left, pad_right
from ppo_cli.dist import DistInfo
from ppo_cli.models import autocast
from ppo_cli.ppo.roles import POLICY, REFERENCE, Roles
from ppo_cli.ppo.scale import RewardScale
from ppo_cli.ppo.vllm_rollout import VLLMRollouts

if TYPE_CHECKING:
    from transformers import GenerationConfig


@dataclass(frozen=True)
class Rollout:
    """One rollout batch on this rank. Shapes: B rows, P prompt tokens (left-padded), R response tokens."""

    query_responses: torch.Tensor  # (B, P+R) prompt + response ids, pads after EOS
    attention_mask: torch.Tensor  # (B, P+R)
    responses: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) bool: real response tokens, up to and including EOS
    # (B, R) policy logprobs at sampling time ("old") and values; None when the first update pass
    # provides them (fuse_first_pass); values are None too without a critic.
    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor | None
    raw_scores: torch.Tensor  # (B,) the reward source's own scores
    scores: torch.Tensor  # (B,) on the fixed scale used in the rewards, missing-EOS penalty included
    prompts: list[str]
    completions: list[str]
    # (B, R) generation.engine=vllm: vLLM's logprobs of its own samples (under the distribution it drew
    # them from), padded like the responses; None with the hf engine, whose sampler is the trained policy.
    # Measured against the old logprobs (rollout/sampler_logprob_gap), and the loss's weights under
    # ppo.sampler_correction (rlhf.sampler_weights).
    sampler_logprobs: torch.Tensor | None = None
    # (B,) bool: the responses that never emitted EOS (cut at generation.max_new_tokens): DAPO's
    # truncated samples (completions/clipped_ratio, ppo.mask_truncated); None: none known.
    truncated: torch.Tensor | None = None


def pad_logprobs(rows: list[list[float]], length: int) -> torch.Tensor:
    """(B, length) float32 logprobs, each row right-padded with 0 (its pads are outside response_mask)."""
    out = torch.zeros(len(rows), length)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


class ForwardPasses:
    """The passes that score responses under a role: the one code path for the rollout's old and
    reference logprobs and values, and the update's new ones (detail 15).

    roles: the four roles on one base; pad_token_id: never sampled, so given no probability;
    temperature: generation.temperature, the T of softmax(logits / T) the responses were sampled from;
    device and mixed_precision: where the passes run and under which autocast (train.mixed_precision).
    """

    def __init__(
        self, roles: Roles, pad_token_id: int, temperature: float, device: torch.device, mixed_precision: str
    ):
        self.roles, self.pad_token_id, self.temperature = roles, pad_token_id, temperature
        self.device, self.mixed_precision = device, mixed_precision

    def precision(self):
        """Mixed precision for one pass (models.autocast); bf16 on CPUs and GPUs that do it natively."""
        return autocast(self.device, self.mixed_precision)

    def policy_logprobs(
        self,
        qr: torch.Tensor,
        mask: torch.Tensor,
        responses: torch.Tensor,
        role: str,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logprobs of `responses` under `role`; the one code path for old, new and reference (detail 15).

        with_entropy: also (no gradient) the entropy of the sampling distribution softmax(logits / T) at
        each response position, from the same logits (B, R).
        """
        with self.roles.role(role), self.precision():
            logits = self.roles.response_logits(qr, mask, responses.shape[1])
        # The pad token is never sampled (suppressed in generation), so it has no probability here either.
        return sampling.sampled_logprobs(logits, responses, self.temperature, self.pad_token_id, with_entropy)

    def value_estimates(self, qr: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        with self.precision():
            return self.roles.values(qr, mask, length).float()


@dataclass(frozen=True)
class RolloutSettings:
    """What a rollout takes from the config and from the update that follows it."""

    # Rows per scoring pass: the update's micro-batch, so its first pass sees the same numbers (detail 15).
    micro: int
    # The old logprobs and values are left to the first update pass (PPOTrainer: one micro-batch).
    fuse_first_pass: bool
    critic: bool  # the run has a value adapter and head: values too
    score_clip: float | None  # ppo.score_clip
    missing_eos_penalty: float | None  # ppo.missing_eos_penalty (TRL's rule), or
    missing_eos_score: float | None  # ppo.missing_eos_score (lm-human-preferences')
    overlong_penalty: float = 0.0  # ppo.overlong_penalty (DAPO's soft penalty near the length limit)
    overlong_buffer: int = 1  # its ramp in tokens (ppo.overlong_buffer, resolved)
    max_new_tokens: int = 1  # generation.max_new_tokens: where the ramp ends


class RolloutMaker:
    """Samples a batch of responses to this rank's prompts and scores it (steps 2-5).

    passes: the scoring passes (and their device); roles: whose policy adapter generates;
    generation_config: pure sampling at temperature T (sampling.sampling_config); reward(qr, mask,
    prompts, completions): the raw scores; scale: puts them on the run's fixed scale (all ranks' scores:
    `dist`); eos_ids: the stop tokens; after_scoring(): called once a batch is scored, before the value
    pass (the first batch may fix the scale, which the critic must be put on); vllm: generation.engine=vllm
    draws the tokens, None: the policy's generate does.
    """

    def __init__(
        self,
        settings: RolloutSettings,
        passes: ForwardPasses,
        roles: Roles,
        tokenizer,
        generation_config: GenerationConfig,
        reward: Callable[..., torch.Tensor],
        scale: RewardScale,
        eos_ids: list[int],
        dist: DistInfo,
        after_scoring: Callable[[], None],
        vllm: VLLMRollouts | None = None,
    ):
        self.settings, self.passes, self.roles, self.tokenizer = settings, passes, roles, tokenizer
        self.generation_config, self.reward, self.scale = generation_config, reward, scale
        self.eos_ids, self.dist, self.after_scoring, self.vllm = eos_ids, dist, after_scoring, vllm
        self.device = passes.device

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], step: int) -> tuple[torch.Tensor, ...]:
        """(prompt ids, prompt mask, responses, response mask, the sampler's logprobs or None), sampled
        from the policy after `step` updates."""
        pad = self.tokenizer.pad_token_id
        input_ids = pad_left(prompt_ids, pad).to(self.device)
        prompt_mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(self.device)
        self.roles.eval()
        sampler_logprobs = None
        if self.vllm is not None:  # generation.engine=vllm: the same draws, from vLLM
            sampled, sampled_logprobs = self.vllm.sample(prompt_ids, step, self.eos_ids, pad)
            responses = pad_right(sampled, pad).to(self.device)
            sampler_logprobs = pad_logprobs(sampled_logprobs, responses.shape[1]).to(self.device)
        else:
            with self.roles.role(POLICY), self.passes.precision():
                out = self.roles.generate(self.generation_config, input_ids, prompt_mask)
            responses = out[:, input_ids.shape[1] :]
        responses, response_mask = rlhf.truncate_after_eos(responses, self.eos_ids, pad)
        return input_ids, prompt_mask, responses, response_mask, sampler_logprobs

    def score(self, qr, mask, responses, response_mask, originals, completions):
        """(raw scores, the scores PPO uses): scaled, clipped, the missing-EOS rule and the overlong
        penalty applied."""
        rules = self.settings
        with self.passes.precision():
            raw = self.reward(qr, mask, originals, completions).to(self.device).float()
        scores = rlhf.clip_scores(self.scale(raw, self.dist), rules.score_clip)
        # A response that never stopped: its score is replaced (missing_eos_score) or, when
        # missing_eos_penalty is set, lowered (TRL's rule). Both are in the units of the scores PPO uses
        # (std of the SFT samples' scores when normalised), so a value means the same against any reward
        # source; the scale is fixed on the source's own scores, and no clip takes the penalty back.
        eos_present = rlhf.has_eos(responses, response_mask, self.eos_ids)
        if rules.missing_eos_penalty is not None:
            scores = rlhf.apply_missing_eos_penalty(scores, eos_present, rules.missing_eos_penalty)
        else:
            scores = rlhf.replace_missing_eos_score(scores, eos_present, rules.missing_eos_score)
        if rules.overlong_penalty > 0:  # DAPO's ramp over the last overlong_buffer tokens, same units
            lengths = response_mask.sum(-1)
            ramp = rlhf.overlong_penalty(
                lengths, rules.max_new_tokens, rules.overlong_buffer, rules.overlong_penalty
            )
            scores = scores + ramp.to(scores.device)
        return raw, scores

    @torch.no_grad()
    def rollout(self, batch_prompts: list[dict], step: int) -> tuple[Rollout, dict[str, float]]:
        """Generate (from the policy after `step` updates), score, and the reference's logprobs (the
        policy's and the values too, unless the first update pass will give them: fuse_first_pass)."""
        timings = {}
        start = time.perf_counter()
        prompt_ids, prompt_mask, responses, response_mask, sampler_logprobs = self.generate(
            [p["input_ids"] for p in batch_prompts], step
        )
        timings["time/generate"] = time.perf_counter() - start

        start = time.perf_counter()
        qr = torch.cat([prompt_ids, responses], dim=1)
        mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
        length = responses.shape[1]
        prompts = [p["prompt"] for p in batch_prompts]
        completions = self.tokenizer.batch_decode(
            responses.masked_fill(~response_mask, self.tokenizer.pad_token_id), skip_special_tokens=True
        )
        originals = [p["original"] for p in batch_prompts]  # conversations stay conversations for an RM
        raw, scores = self.score(qr, mask, responses, response_mask, originals, completions)
        # Scored first: the first batch may fix the scale, and the critic's values are read after it
        # has been put on that scale.
        self.after_scoring()
        micro, passes = self.settings.micro, self.passes
        logprobs, ref_logprobs, values = [], [], []
        for s in range(0, qr.shape[0], micro):
            chunk = slice(s, s + micro)
            ref_logprobs.append(passes.policy_logprobs(qr[chunk], mask[chunk], responses[chunk], REFERENCE))
            if not self.settings.fuse_first_pass:
                logprobs.append(passes.policy_logprobs(qr[chunk], mask[chunk], responses[chunk], POLICY))
                if self.settings.critic:
                    values.append(passes.value_estimates(qr[chunk], mask[chunk], length))
        timings["time/score"] = time.perf_counter() - start
        rollout = Rollout(
            qr,
            mask,
            responses,
            response_mask,
            torch.cat(logprobs) if logprobs else None,
            torch.cat(ref_logprobs),
            torch.cat(values) if values else None,
            raw,
            scores,
            prompts,
            completions,
            sampler_logprobs,
            ~rlhf.has_eos(responses, response_mask, self.eos_ids),
        )
        return rollout, timings
