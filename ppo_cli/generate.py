"""`ppo-cli generate`: sample completions for a prompts file into JSONL, optionally scored.

    ppo-cli generate checkpoint=outputs/ppo/RUN/final data.prompts=prompts.jsonl output=samples.jsonl \
        [generation.max_new_tokens=64 generation.temperature=0.7] [reward_checkpoint=RM_FINAL | reward_fn=m:f]

`checkpoint` is any stage's final/ (an SFT or PPO adapter on its base), a full model directory, or a base
model (Hub id or directory). Prompts use PPO's formats ({"prompt"} text or {"messages"} ending before the
assistant's turn). Each output row is {"prompt", "completion"} (+ "reward"), in TRL's conventions: a
conversational prompt gets a conversational completion ([{"role": "assistant", "content": ...}]), so the
file is valid SFT data as it is.

Generation is batched, left-padded, with the KV cache; prompts are grouped by length to waste little on
padding, and the rows come out in the input order. The building blocks (`load_policy`, `sample`,
`sequence_logprobs`, and `reward.sources.build_reward` for the scores) are shared with the pipeline's
before/after report.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ppo_cli import rlhf, sampling
from ppo_cli.app import hydra_app
from ppo_cli.data import encode_prompt, load_rows, pad_left, pad_right, prompt_of, prompt_text
from ppo_cli.errors import UserError
from ppo_cli.logger import make_console, printable
from ppo_cli.models import (
    adapter_task_type,
    eos_token_ids,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    recorded_base_model,
    resolve_device,
)
from ppo_cli.reward.sources import build_reward, check_reward_source
from ppo_cli.rlhf import position_ids_from_mask, truncate_after_eos
from ppo_cli.vllm_sampler import require_vllm

# ---------------------------------------------------------------------------------------------
# The policy to sample from


@dataclass
class Policy:
    """A causal LM ready to sample: model (eval, no grad), its tokenizer (left padding), EOS ids."""

    model: Any
    tokenizer: Any
    device: torch.device
    eos_ids: list[int]
    # One line for the console: what was loaded.
    description: str
    # The model under the weights (an adapter's base, or the model itself) and the adapter folder, if any:
    # what a vLLM engine loads (generation.engine=vllm).
    base: str = ""
    adapter: str | None = None
    # generation.engine=vllm: the engine that samples this policy (vllm_sampler.attach_vllm) and the name
    # it holds the adapter under; None = transformers' generate samples.
    vllm: Any = None
    vllm_adapter: str | None = None


def load_policy(
    checkpoint: str, model_cfg: DictConfig, device: torch.device, key: str = "checkpoint"
) -> Policy:
    """Load a causal LM to sample from: an adapter on its base, a full model directory, or a base model."""
    path = Path(checkpoint).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        task = adapter_task_type(path)
        if task not in (None, "CAUSAL_LM"):
            raise UserError(
                f"{key}={checkpoint} is a {task} adapter (a reward model?), not a causal LM policy to sample from."
            )
        from peft import PeftModel

        base = recorded_base_model(str(path), key, override=model_cfg.name_or_path)
        tokenizer = load_tokenizer(str(path), model_cfg.trust_remote_code)
        model = load_causal_lm(model_cfg, tokenizer, device, name_or_path=base)
        model = PeftModel.from_pretrained(model, str(path)).to(device)
        description = f"adapter {path} on {base}"
        adapter = str(path)
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise UserError(
                f"{key}={checkpoint} holds neither a peft adapter (adapter_config.json) nor a model (config.json)."
            )
        name = str(path) if path.exists() else checkpoint
        tokenizer = load_tokenizer(name, model_cfg.trust_remote_code, model_cfg.revision)
        model = load_causal_lm(model_cfg, tokenizer, device, name_or_path=name)
        description = f"model {name}"
        base, adapter = name, None
    model.eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    return Policy(model, tokenizer, device, eos_token_ids(tokenizer, model), description, base, adapter)


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Samples:
    """Sampled responses, in the order of the prompts."""

    prompt_ids: list[list[int]]
    # Response ids up to and including the first EOS (no padding).
    response_ids: list[list[int]]
    # Decoded responses, special tokens removed.
    texts: list[str]
    # Whether each response ended with an EOS (False: it hit max_new_tokens).
    finished: list[bool]
    seconds: float = 0.0
    new_tokens: int = field(default=0)


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@torch.inference_mode()
def sample(
    policy: Policy,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
    suppress_pad: bool = False,
) -> Samples:
    """Sample one response per prompt (temperature 0 = greedy). `progress(n_done)` is called per batch.
    `suppress_pad`: never sample the pad token, as train-ppo's rollouts do (evaluate's KL is theirs).

    With a vLLM engine attached (generation.engine=vllm), vLLM draws them, prompt i with a seed of its
    own from (seed, i); otherwise transformers' generate, in batches of similar length."""
    if policy.vllm is not None:
        return _sample_vllm(policy, prompt_ids, max_new_tokens, temperature, top_p, seed, progress)
    pad = policy.tokenizer.pad_token_id
    # Plain sampling at `temperature` (greedy at 0), whatever the model's generation_config.json says.
    gen_config = sampling.sampling_config(
        max_new_tokens, temperature, pad, policy.eos_ids, top_p=top_p, suppress_pad=suppress_pad
    )
    responses: list[list[int]] = [[] for _ in prompt_ids]
    finished = [False] * len(prompt_ids)
    torch.manual_seed(seed)
    start = time.perf_counter()
    done = 0
    for batch in _length_batches([len(p) for p in prompt_ids], batch_size):
        ids = [prompt_ids[i] for i in batch]
        input_ids = pad_left(ids, pad).to(policy.device)
        attention_mask = pad_left([[1] * len(p) for p in ids], 0).to(policy.device)
        out = sampling.generate(policy.model, gen_config, input_ids=input_ids, attention_mask=attention_mask)
        generated, mask = truncate_after_eos(out[:, input_ids.shape[1] :], policy.eos_ids, pad)
        for row, i in enumerate(batch):
            kept = generated[row][mask[row]].tolist()
            responses[i] = kept
            finished[i] = bool(kept) and kept[-1] in policy.eos_ids
        done += len(batch)
        if progress is not None:
            progress(done)
    texts = policy.tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Samples(
        prompt_ids=[list(p) for p in prompt_ids],
        response_ids=responses,
        texts=texts,
        finished=finished,
        seconds=time.perf_counter() - start,
        new_tokens=sum(len(r) for r in responses),
    )


def _sample_vllm(policy: Policy, prompt_ids, max_new_tokens, temperature, top_p, seed, progress) -> Samples:
    from ppo_cli.vllm_sampler import request_seed

    start = time.perf_counter()
    seeds = [request_seed(seed, i) for i in range(len(prompt_ids))]
    responses = policy.vllm.sample(
        prompt_ids, max_new_tokens, temperature, policy.eos_ids, seeds, policy.vllm_adapter, top_p=top_p
    )
    if progress is not None:
        progress(len(prompt_ids))
    return Samples(
        prompt_ids=[list(p) for p in prompt_ids],
        response_ids=responses,
        texts=policy.tokenizer.batch_decode(responses, skip_special_tokens=True),
        finished=[bool(r) and r[-1] in policy.eos_ids for r in responses],
        seconds=time.perf_counter() - start,
        new_tokens=sum(len(r) for r in responses),
    )


@torch.inference_mode()
def sequence_logprobs(
    policy: Policy,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    temperature: float = 1.0,
    batch_size: int = 16,
    suppress_pad: bool = False,
) -> torch.Tensor:
    """Sum over each response's tokens of log pi(token | prefix), at `temperature` (B,) float32 on CPU.

    The difference of two policies' values on one policy's own samples estimates KL(pi || pi_other), the
    quantity PPO reports as objective/kl. `suppress_pad`: under the distribution without the pad token
    (the one `sample(..., suppress_pad=True)` and train-ppo's rollouts draw from).
    """
    pad = policy.tokenizer.pad_token_id
    totals = []
    for s in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[s : s + batch_size], response_ids[s : s + batch_size]
        width = max(1, max(len(r) for r in responses))
        query = pad_left(prompts, pad)
        resp = pad_right([r + [pad] * (width - len(r)) for r in responses], pad)
        resp_mask = pad_right([[1] * len(r) + [0] * (width - len(r)) for r in responses], 0)
        input_ids = torch.cat([query, resp], dim=1).to(policy.device)
        attention_mask = torch.cat([pad_left([[1] * len(p) for p in prompts], 0), resp_mask], dim=1).to(
            policy.device
        )
        logits = policy.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits
        # logits at column t predict token t + 1: the response's predictions start one before it.
        logits = logits[:, query.shape[1] - 1 : -1]
        suppressed = pad if suppress_pad else None
        logp = sampling.sampled_logprobs(logits, resp.to(policy.device), temperature, suppressed)
        # masked_sum, not a product with the mask: a suppressed pad after a short response has logprob -inf
        totals.append(rlhf.masked_sum(logp, resp_mask.to(logp.device), dim=1).float().cpu())
    return torch.cat(totals) if totals else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# The command


def start_vllm(policies: list[Policy], prompt_ids: list[list[int]], cfg: DictConfig) -> None:
    """generation.engine=vllm: one vLLM engine for `policies`, sized for these prompts."""
    from ppo_cli.vllm_sampler import attach_vllm

    longest = max(len(p) for p in prompt_ids) + cfg.generation.max_new_tokens
    # vLLM schedules the whole list itself; its batch is bounded by the KV cache it is sized for.
    sequences = min(len(prompt_ids), VLLM_MAX_SEQUENCES)
    attach_vllm(
        policies,
        cfg.generation,
        policies[0].device,
        longest,
        sequences,
        cfg.seed,
        cfg.model.trust_remote_code,
    )


# Sequences one vLLM engine of generate / evaluate samples at once.
VLLM_MAX_SEQUENCES = 256


def validate(cfg: DictConfig) -> None:
    check_reward_source(cfg.reward_checkpoint, cfg.reward_fn, required=False)
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1.")
    if cfg.generation.max_new_tokens < 1:
        raise UserError(f"generation.max_new_tokens={cfg.generation.max_new_tokens} must be at least 1.")
    if not (cfg.generation.temperature >= 0 and math.isfinite(cfg.generation.temperature)):
        raise UserError(f"generation.temperature={cfg.generation.temperature} must be >= 0 (0 = greedy).")
    if not 0 < cfg.generation.top_p <= 1:
        raise UserError(f"generation.top_p={cfg.generation.top_p} must be in (0, 1].")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise UserError(f"data.limit={cfg.data.limit} must be at least 1 (or null for all prompts).")
    output = Path(cfg.output)
    if output.is_dir():
        raise UserError(f"output={cfg.output} is a directory; give a .jsonl file path.")
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output={cfg.output} already exists; pass overwrite=true to replace it.")
    if not Path(cfg.checkpoint).expanduser().exists() and cfg.checkpoint.startswith((".", "/", "~")):
        raise UserError(f"checkpoint={cfg.checkpoint}: no such directory.")


def read_prompts(cfg: DictConfig, tokenizer) -> tuple[list[Any], list[list[int]], int]:
    """(original prompts, their token ids, how many were truncated); dropped prompts are left out."""
    rows = load_rows(cfg.data.prompts, "data.prompts", cfg.data.split)
    if cfg.data.limit is not None:
        rows = rows[: cfg.data.limit]
    prompts, ids, truncated = [], [], 0
    for row in rows:
        prompt = prompt_of(row)
        encoded = encode_prompt(tokenizer, prompt, row.where())
        if not encoded:
            raise UserError(f"{row.where()}: the prompt is empty.")
        if len(encoded) > cfg.data.max_length:
            if cfg.data.overflow == "drop":
                continue
            encoded, truncated = encoded[-cfg.data.max_length :], truncated + 1
        prompts.append(prompt)
        ids.append(encoded)
    if not prompts:
        raise UserError(
            f"data.prompts={cfg.data.prompts}: no prompt is left after data.max_length={cfg.data.max_length}."
        )
    return prompts, ids, truncated


def output_row(prompt: Any, completion: str, reward: float | None) -> dict[str, Any]:
    """TRL's conventions: a conversational prompt gets a conversational completion."""
    row: dict[str, Any] = {
        "prompt": prompt,
        "completion": completion
        if isinstance(prompt, str)
        else [{"role": "assistant", "content": completion}],
    }
    if reward is not None:
        row["reward"] = reward
    return row


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary file and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def preview(rows: list[dict[str, Any]], n: int, title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    if n <= 0 or not rows:
        return
    table = Table(title=title, show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("prompt", overflow="fold", max_width=60)
    table.add_column("completion", overflow="fold", max_width=80)
    with_reward = "reward" in rows[0]
    if with_reward:
        table.add_column("reward", justify="right")
    for i, row in enumerate(rows[:n]):
        prompt = prompt_text(row["prompt"])
        completion = (
            row["completion"] if isinstance(row["completion"], str) else row["completion"][0]["content"]
        )
        # Text, not markup: a completion is any text ("[/]", control bytes), shown as written.
        cells = [str(i), Text(printable(_clip(prompt, 300))), Text(printable(_clip(completion, 400)))]
        if with_reward:
            cells.append(f"{row['reward']:.4g}")
        table.add_row(*cells)
    make_console().print(table)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run(cfg: DictConfig) -> list[dict[str, Any]]:

    console = make_console()
    validate(cfg)
    device = resolve_device(cfg.device)
    if cfg.generation.engine == "vllm":
        require_vllm(device)
    policy = load_policy(cfg.checkpoint, cfg.model, device)
    prompts, prompt_ids, truncated = read_prompts(cfg, policy.tokenizer)
    if cfg.generation.engine == "vllm":
        start_vllm([policy], prompt_ids, cfg)
    scorer = build_reward(
        cfg.reward_checkpoint,
        cfg.reward_fn,
        cfg.model,
        device,
        cfg.batch_size,
        policy_tokenizer=policy.tokenizer,
    )
    console.print(
        f"[bold]ppo-cli generate[/]: {len(prompts)} prompts from {cfg.data.prompts}"
        + (f" ({truncated} truncated to {cfg.data.max_length} tokens)" if truncated else "")
        + f"; sampling from {policy.description} on {device}"
    )
    gen = cfg.generation
    samples = sample(
        policy, prompt_ids, gen.max_new_tokens, gen.temperature, gen.top_p, cfg.batch_size, cfg.seed
    )
    rewards: list[float | None] = [None] * len(prompts)
    if scorer is not None:
        sequences = [p + r for p, r in zip(samples.prompt_ids, samples.response_ids)]
        rewards = scorer.score(prompts, samples.texts, sequences).tolist()
    rows = [output_row(p, c, r) for p, c, r in zip(prompts, samples.texts, rewards)]
    output = Path(cfg.output)
    write_jsonl_atomic(output, rows)
    preview(rows, cfg.preview_rows, f"first {min(cfg.preview_rows, len(rows))} of {len(rows)} rows")
    finished = sum(samples.finished) / len(rows)
    speed = samples.new_tokens / max(samples.seconds, 1e-9)
    summary = f"wrote {len(rows)} rows to {output}; {finished:.0%} ended with EOS, {speed:.0f} new tokens/s"
    if scorer is not None:
        mean = sum(rewards) / len(rewards)
        summary += f"; mean reward {mean:.4g}"
    console.print(summary)
    return rows


@hydra_app("generate", "generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
