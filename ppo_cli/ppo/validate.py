"""The checks on train-ppo's settings that the config schema cannot express, with the knob to turn."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from ppo_cli.errors import UserError
from ppo_cli.ppo.estimators import resolve_estimation


def validate_ppo(cfg: DictConfig) -> None:
    ppo, train = cfg.ppo, cfg.train
    if train.max_steps < 1:
        raise UserError(f"train.max_steps={train.max_steps}: train-ppo needs a positive number of steps.")
    group = resolve_estimation(ppo, cfg.generation).group_size  # samples per prompt, checked there
    local = train.batch_size * group  # sequences per rollout batch on this rank
    rows = f"train.batch_size={train.batch_size}" + (
        f" x generation.samples_per_prompt={group} = {local} sequences" if group > 1 else ""
    )
    if train.batch_size < 1 or ppo.num_minibatches < 1 or local % ppo.num_minibatches:
        raise UserError(f"{rows} must be positive and divide by ppo.num_minibatches={ppo.num_minibatches}.")
    if (local // ppo.num_minibatches) % train.grad_accum_steps:
        raise UserError(
            f"the minibatch ({local // ppo.num_minibatches} sequences) must divide by "
            f"train.grad_accum_steps={train.grad_accum_steps}."
        )
    if ppo.epochs < 1:
        raise UserError(f"ppo.epochs={ppo.epochs} must be at least 1.")
    if cfg.generation.max_new_tokens < 1:
        raise UserError(f"generation.max_new_tokens={cfg.generation.max_new_tokens} must be at least 1.")
    if not cfg.generation.temperature > 0 or not math.isfinite(cfg.generation.temperature):
        raise UserError(f"generation.temperature={cfg.generation.temperature} must be positive.")
    horizon_ok = ppo.kl_horizon is None or ppo.kl_horizon > 0
    if ppo.kl_controller == "adaptive" and not (ppo.kl_target > 0 and horizon_ok):
        raise UserError(
            f"ppo.kl_target={ppo.kl_target} and ppo.kl_horizon={ppo.kl_horizon} must be positive (the "
            "horizon may be null: a tenth of the run's episodes)."
        )
    if ppo.missing_eos_penalty is not None and ppo.missing_eos_penalty < 0:
        raise UserError(
            f"ppo.missing_eos_penalty={ppo.missing_eos_penalty} must be positive (it is subtracted)."
        )
    validate_rl_options(ppo, cfg.generation.max_new_tokens)


def validate_rl_options(ppo: DictConfig, max_new_tokens: int) -> None:
    """The DAPO, GSPO and sampler-correction keys (docs/ppo-details.md, "Off-policy corrections, DAPO and
    GSPO"); ratio_level and sampler_correction are choices, which Hydra checks itself."""
    cap = ppo.sampler_correction_cap
    if not (cap > 0 and math.isfinite(cap)):
        raise UserError(
            f"ppo.sampler_correction_cap={cap} must be positive and finite: it is the largest weight a "
            "token's loss may get from the sampler correction (2.0 by default)."
        )
    if ppo.clip_range_high is not None and not ppo.clip_range_high >= 0:
        raise UserError(
            f"ppo.clip_range_high={ppo.clip_range_high} must be at least 0: the ratio's upper clip is "
            "1 + clip_range_high (DAPO uses 0.28 beside ppo.clip_range=0.2; null = ppo.clip_range)."
        )
    if not ppo.overlong_penalty >= 0:
        raise UserError(
            f"ppo.overlong_penalty={ppo.overlong_penalty} must be at least 0: it is the most a response at "
            "generation.max_new_tokens loses (0 = off)."
        )
    buffer = ppo.overlong_buffer
    if buffer is not None and not 1 <= buffer <= max_new_tokens:
        raise UserError(
            f"ppo.overlong_buffer={buffer} must be between 1 and generation.max_new_tokens={max_new_tokens}: "
            "the overlong penalty ramps over the last overlong_buffer tokens before the limit (null = a "
            "fifth of max_new_tokens)."
        )


def overlong_buffer(ppo: DictConfig, max_new_tokens: int) -> int:
    """ppo.overlong_buffer, or its default: a fifth of max_new_tokens (DAPO: 4096 of 20480), at least 1."""
    if ppo.overlong_buffer is not None:
        return int(ppo.overlong_buffer)
    return max(1, max_new_tokens // 5)
