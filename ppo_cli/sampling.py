"""The one sampling configuration of PPO rollouts and `ppo-cli generate`, immune to the model's own.

`model.generate(generation_config=ours)` does not sample with ours alone: transformers merges the model's
`generation_config` (its generation_config.json) into it. From 5.0 every field left None in ours is
filled from the model's file (min_p, no_repeat_ngram_size, bad_words_ids, forced_eos_token_id, ...); on
4.50-4.57 every field equal to the library default (top_p=1.0, temperature=1.0, repetition_penalty=1.0,
...) is overwritten by the model's value. Either way the samples stop being draws from softmax(z / T):
PPO's ratio and KL, which score them under softmax(z / T), are biased, and `generate`'s output is skewed.

Two guards, each sufficient for the fields it covers:
- `sampling_config` sets every field that has an explicit no-op value to it (top_k=0, penalties 1.0,
  n-gram size 0, ...), so a 5.x merge, which fills only None fields, cannot touch them;
- `generate` makes that same config the model's own for the call. Then both merge rules find nothing to
  take: 5.x fills None fields from a config whose fields are None too, and 4.50-4.57 copies a model value
  only where ours is the library default and the model's is not, which cannot be when they are one
  config. This also covers the fields whose only neutral value is None
  (bad_words_ids, forced tokens, stop_strings, max_time, prompt lookup, watermarking, ...), and any field a
  later version adds. The model's config is put back afterwards (exports and saves keep the file's values).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from ppo_cli import rlhf

_MISSING = object()


def sampling_config(
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_token_ids: list[int],
    top_p: float = 1.0,
    suppress_pad: bool = False,
):
    """Sampling from softmax(z / T) (nucleus `top_p` if < 1), or greedy at T = 0; nothing else.

    Stops at any of `eos_token_ids`; `suppress_pad` keeps the pad token from ever being sampled.
    """
    from transformers import GenerationConfig

    sampling = temperature > 0
    # Warpers only act when sampling; greedy leaves them unset (setting them would only warn).
    warpers: dict[str, Any] = (
        {
            "temperature": temperature,
            "top_k": 0,
            "top_p": top_p,
            "typical_p": 1.0,
            "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0,
        }
        if sampling
        else {}
    )
    return GenerationConfig(
        do_sample=sampling,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=max_new_tokens,
        # min_new_tokens stays None: 0 would still turn into a (vacuous) MinLength processor.
        min_length=0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        guidance_scale=1.0,
        renormalize_logits=False,
        remove_invalid_values=False,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids),
        suppress_tokens=[pad_token_id] if suppress_pad else None,
        use_cache=True,
        **warpers,
    )


def sampled_logprobs(
    logits: torch.Tensor,
    responses: torch.Tensor,
    temperature: float,
    suppressed_token: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logprobs (B, R) of `responses` under the distribution `sampling_config` drew them from:
    softmax(logits / T), with `suppressed_token` (PPO's pad, `suppress_pad`) at probability 0.

    `logits` (B, R, V) predict the response tokens. with_entropy: also (no gradient) that distribution's
    entropy at each position (B, R). Greedy samples (T = 0) are scored at T = 1.
    """
    if suppressed_token is not None:
        index = torch.tensor([suppressed_token], device=logits.device)
        logits = logits.index_fill(-1, index, float("-inf"))
    temperature = temperature if temperature > 0 else 1.0
    logprobs = rlhf.logprobs_from_logits(logits, responses, temperature)
    if not with_entropy:
        return logprobs
    with torch.no_grad():  # row by row: the (R, V) float32 temporaries of one row at a time
        entropy = torch.stack([rlhf.entropy_from_logits(row, temperature) for row in logits.detach()])
    return logprobs, entropy


def generate(model, generation_config, **inputs):
    """`model.generate(**inputs)` with `generation_config` and nothing from the model's own config."""
    with _model_generation_config(model, generation_config):
        return model.generate(**inputs, generation_config=generation_config)


def _wrapper_chain(model) -> list[Any]:
    """`model` and the models it wraps (peft, DDP), down to the transformers model whose generate merges."""
    chain = [model]
    while True:
        current = chain[-1]
        if hasattr(current, "get_base_model"):
            inner = current.get_base_model()
        else:
            inner = getattr(current, "module", None)
        if inner is None or inner is current or any(inner is m for m in chain):
            return chain
        chain.append(inner)


@contextlib.contextmanager
def _model_generation_config(model, generation_config) -> Iterator[None]:
    # Every level: peft's generate copies its own `generation_config` onto the model it wraps.
    chain = _wrapper_chain(model)
    saved = [m.__dict__.get("generation_config", _MISSING) for m in chain]
    own = copy.deepcopy(generation_config)  # generate may write to the model's config; never to ours
    try:
        for m in chain:
            m.generation_config = own
        yield
    finally:
        for m, value in zip(chain, saved):
            if value is _MISSING:
                m.__dict__.pop("generation_config", None)
            else:
                m.generation_config = value
