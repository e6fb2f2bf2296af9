"""`ppo-cli evaluate`: did training help, and what did it cost? A policy against a reference on held-out prompts.

    ppo-cli evaluate policy=outputs/ppo/RUN/final data.prompts=heldout.jsonl output=eval.json \
        (reward_checkpoint=RM_FINAL | reward_fn=m:f) [reference=DIR] [generation.samples_per_prompt=4]

`policy` and `reference` are anything `generate` samples from (a stage's final/, a full model directory, a
base model); the reference defaults to the SFT checkpoint a train-ppo product was trained from (its
final/ppo_cli.json). Both are sampled on the same prompts (encoded once, with the policy's tokenizer) with
the same seeds: sample k of every prompt is drawn with seed + k by each, so a policy equal to its reference
gives identical samples. Reported per model: mean reward with a 95% interval (normal approximation over the
prompts' mean rewards), mean response length in tokens, EOS rate and distinct-2 (distinct word bigrams over
all bigrams of the responses); for the pair: the win rate of policy over reference (per prompt, sample k
against sample k, ties half, averaged over samples and then prompts) and KL(policy || reference) per
sequence, the sum over the policy's response tokens of log pi - log pi_ref at the sampling temperature,
on the policy's own samples: train-ppo's objective/kl. The results go to `output` (JSON), every sample
beside it (OUTPUT.samples.jsonl), and a table to the console.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.app import hydra_app
from ppo_cli.errors import UserError
from ppo_cli.evaluation.report import preview, print_results, samples_path, write_json_atomic
from ppo_cli.evaluation.stats import mean_interval, model_report, per_prompt, win
from ppo_cli.generate import (
    Policy,
    load_policy,
    read_prompts,
    sample,
    sequence_logprobs,
    start_vllm,
    write_jsonl_atomic,
)
from ppo_cli.logger import make_console
from ppo_cli.models import looks_local, read_product_info, recorded_base_model, resolve_device, same_model
from ppo_cli.reward.sources import build_reward, check_reward_source
from ppo_cli.vllm_sampler import require_vllm

# ---------------------------------------------------------------------------------------------
# Checks and the reference


def validate(cfg: DictConfig) -> None:
    given = [k for k in ("reward_checkpoint", "reward_fn") if cfg[k]]
    if len(given) != 1:
        raise UserError(
            "exactly one reward source is needed: reward_checkpoint=DIR_OR_HUB_ID (the RM stage's "
            "final/ or a sequence-classification model) or reward_fn=package.module:function; "
            + ("both were given." if given else "neither was given.")
        )
    check_reward_source(cfg.reward_checkpoint, cfg.reward_fn, required=False)
    gen = cfg.generation
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1.")
    if gen.max_new_tokens < 1:
        raise UserError(f"generation.max_new_tokens={gen.max_new_tokens} must be at least 1.")
    if not (gen.temperature >= 0 and math.isfinite(gen.temperature)):
        raise UserError(f"generation.temperature={gen.temperature} must be >= 0 (0 = greedy).")
    if gen.samples_per_prompt < 1:
        raise UserError(f"generation.samples_per_prompt={gen.samples_per_prompt} must be at least 1.")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise UserError(f"data.limit={cfg.data.limit} must be at least 1 (or null for all prompts).")
    output = Path(cfg.output)
    if output.is_dir():
        raise UserError(f"output={cfg.output} is a directory; give a .json file path.")
    for path in (output, samples_path(output)):
        if path.exists() and not cfg.overwrite:
            raise UserError(f"output={cfg.output}: {path} already exists; pass overwrite=true to replace it.")
    for key in ("policy", "reference"):
        value = cfg[key]
        if value and looks_local(value) and not Path(value).expanduser().exists():
            raise UserError(f"{key}={value}: no such directory.")


def default_reference(cfg: DictConfig) -> str:
    """The model a train-ppo product was KL-penalised to: its SFT checkpoint, or the base it started from."""
    policy = Path(cfg.policy).expanduser()
    info = read_product_info(policy, "policy") if policy.is_dir() else {}
    if "sft_checkpoint" in info:
        sft = info["sft_checkpoint"]
        if not sft:  # PPO straight from the base model: the base was the reference
            return recorded_base_model(policy, "policy", override=cfg.model.name_or_path)
        if not Path(sft).is_dir():
            raise UserError(
                f"reference is not set and the SFT checkpoint policy={cfg.policy} was trained from, {sft}, "
                "does not exist any more; set reference=DIR to the SFT stage's final/ (or any model to compare with)."
            )
        return str(sft)
    raise UserError(
        f"reference is not set, and policy={cfg.policy} names no SFT checkpoint to compare with (a train-ppo "
        "product's ppo_cli.json does); set reference=DIR: a stage's final/, a model directory or a base model id."
    )


# ---------------------------------------------------------------------------------------------
# The command


GREEDY_NO_KL = (
    "KL: not estimated (kl is null): at generation.temperature=0 the samples are greedy, not draws from "
    "the policy, and log pi - log pi_ref on them estimates no divergence. Evaluate at the training "
    "temperature for train-ppo's objective/kl."
)


def policy_kl(
    policy: Policy,
    reference: Policy,
    prompt_ids: list[list[int]],
    responses: list[list[int]],
    cfg: DictConfig,
) -> list[float] | None:
    """KL(policy || reference) per sample: log pi - log pi_ref summed over the policy's own samples, both
    at the sampling temperature without the pad token: train-ppo's objective/kl. None when sampling is
    greedy (temperature 0): the samples are then no draws from pi, so the difference estimates nothing."""
    gen = cfg.generation
    if gen.temperature == 0:
        return None
    logp = sequence_logprobs(
        policy, prompt_ids, responses, gen.temperature, cfg.batch_size, suppress_pad=True
    )
    logp_ref = sequence_logprobs(
        reference, prompt_ids, responses, gen.temperature, cfg.batch_size, suppress_pad=True
    )
    return (logp - logp_ref).tolist()


def draw(policy: Policy, prompt_ids: list[list[int]], cfg: DictConfig) -> dict[str, list]:
    """All samples of one model, sample-major: index s * n + i is sample s of prompt i, drawn with seed + s."""
    gen = cfg.generation
    out: dict[str, list] = {"response_ids": [], "texts": [], "finished": []}
    for s in range(gen.samples_per_prompt):
        # Pad never sampled, as in train-ppo's rollouts: the KL below is then exactly its objective/kl.
        drawn = sample(
            policy,
            prompt_ids,
            gen.max_new_tokens,
            gen.temperature,
            1.0,
            cfg.batch_size,
            cfg.seed + s,
            suppress_pad=True,
        )
        out["response_ids"] += drawn.response_ids
        out["texts"] += drawn.texts
        out["finished"] += drawn.finished
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    console = make_console()
    validate(cfg)
    reference_name = cfg.reference or default_reference(cfg)
    device = resolve_device(cfg.device)
    if cfg.generation.engine == "vllm":
        require_vllm(device)
    policy = load_policy(cfg.policy, cfg.model, device, key="policy")
    if same_model(str(cfg.policy), str(reference_name)):
        reference = policy  # one model in memory; its samples are the policy's (same seeds)
    else:
        key = "reference" if cfg.reference else f"reference (policy's SFT checkpoint {reference_name})"
        reference = load_policy(str(reference_name), cfg.model, device, key=key)
        if reference.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
            raise UserError(
                f"policy={cfg.policy} and reference={reference_name} have different vocabularies; KL(policy || "
                "reference) scores the policy's tokens under the reference, so both need one tokenizer."
            )
    prompts, prompt_ids, truncated = read_prompts(cfg, policy.tokenizer)
    if cfg.generation.engine == "vllm":  # one engine samples both (they share a tokenizer, checked above)
        start_vllm([policy] if reference is policy else [policy, reference], prompt_ids, cfg)
    scorer = build_reward(
        cfg.reward_checkpoint,
        cfg.reward_fn,
        cfg.model,
        device,
        cfg.batch_size,
        policy_tokenizer=policy.tokenizer,
    )
    n, k, gen = len(prompts), cfg.generation.samples_per_prompt, cfg.generation
    console.print(
        f"[bold]ppo-cli evaluate[/]: {n} prompts x {k} samples from {cfg.data.prompts}"
        + (f" ({truncated} truncated to {cfg.data.max_length} tokens)" if truncated else "")
        + f"; policy: {policy.description}; reference: {reference.description}; on {device}"
    )
    all_prompt_ids = prompt_ids * k
    all_prompts = prompts * k
    drawn, rewards, lengths = {}, {}, {}
    for side, model in (("policy", policy), ("reference", reference)):
        drawn[side] = draw(model, prompt_ids, cfg)
        sequences = [p + r for p, r in zip(all_prompt_ids, drawn[side]["response_ids"])]
        rewards[side] = scorer.score(all_prompts, drawn[side]["texts"], sequences).tolist()
        lengths[side] = [len(r) for r in drawn[side]["response_ids"]]
    kl = policy_kl(policy, reference, all_prompt_ids, drawn["policy"]["response_ids"], cfg)
    wins = [win(a, b) for a, b in zip(rewards["policy"], rewards["reference"])]
    win_rate, win_ci = mean_interval(per_prompt(wins, n, k))
    kl_mean, kl_ci = mean_interval(per_prompt(kl, n, k)) if kl is not None else (None, None)
    if kl is None:
        console.print(GREEDY_NO_KL)
    reports = {
        side: {
            "checkpoint": str(cfg.policy if side == "policy" else reference_name),
            **model_report(rewards[side], lengths[side], drawn[side]["finished"], drawn[side]["texts"], n, k),
        }
        for side in ("policy", "reference")
    }
    result = {
        "n": n,
        "samples_per_prompt": k,
        **reports,
        "win_rate": win_rate,
        "win_rate_ci95": win_ci,
        "kl": kl_mean,
        "kl_ci95": kl_ci,
        "reward_source": cfg.reward_fn or cfg.reward_checkpoint,
        "prompts": OmegaConf.to_container(cfg.data.prompts)
        if OmegaConf.is_config(cfg.data.prompts)
        else cfg.data.prompts,
        "generation": {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature},
        "seed": cfg.seed,
    }
    rows = []
    for i in range(n):
        for s in range(k):
            j = s * n + i
            row: dict[str, Any] = {"prompt": prompts[i], "sample": s}
            for side in ("policy", "reference"):
                row[side] = {
                    "completion": drawn[side]["texts"][j],
                    "reward": rewards[side][j],
                    "length": lengths[side][j],
                    "eos": drawn[side]["finished"][j],
                }
            row["kl"] = kl[j] if kl is not None else None
            rows.append(row)
    output = Path(cfg.output)
    write_jsonl_atomic(samples_path(output), rows)
    write_json_atomic(output, result)
    print_results(console, result, f"policy vs reference: {n} prompts x {k} samples")
    if cfg.preview_rows > 0:
        preview(console, rows, cfg.preview_rows)
    console.print(f"wrote {output} and {samples_path(output)} ({len(rows)} sample pairs)")
    return result


@hydra_app("evaluate", "evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
