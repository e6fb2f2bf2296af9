"""Where PPO's scores come from: exactly one of three sources.

- `reward_checkpoint` = our RM's final/ on the same base: the "reward" adapter + head of the shared
  model scores the policy's own token ids (no decoding, no second model in memory).
- `reward_checkpoint` = any other sequence-classification model (a Hub id, a full model directory, or
  our RM on a different base): a separate model with its own tokenizer; responses are decoded to text
  and re-tokenized for it (a conversation through its own chat template, as train-rm encodes one).
- `reward_fn` = `package.module:function(prompts, completions) -> list[float]`, called once per batch
  in TRL's form (strings, or conversations for conversation prompts: `reward_function_inputs`).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ppo_cli.data import pad_right, prompt_text
from ppo_cli.errors import UserError
from ppo_cli.preferences import encode_side


def load_reward_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    if ":" not in spec:
        raise UserError(f"reward_fn={spec}: expected the form package.module:function.")
    module_name, func_name = spec.split(":", 1)
    # Like `python -m`, a module in the current directory is found (console scripts do not put it on the path).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise UserError(
            f"reward_fn={spec}: cannot import module '{module_name}' ({type(exc).__name__}: {exc})."
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"reward_fn={spec}: module '{module_name}' has no function '{func_name}'.")
    return func


def reward_function_inputs(prompts: list[Any], completions: list[str]) -> tuple[list[Any], list[Any]]:
    """TRL's reward-function convention: a text prompt and its completion stay strings; a conversation
    prompt stays its list of {role, content} messages and its completion becomes
    `[{"role": "assistant", "content": text}]`, so a function written for TRL's GRPOTrainer works here."""
    shaped = [
        c if isinstance(p, str) else [{"role": "assistant", "content": c}]
        for p, c in zip(prompts, completions)
    ]
    return list(prompts), shaped


def call_reward_function(
    func: Callable, spec: str, prompts: list[Any], completions: list[str]
) -> torch.Tensor:
    """Call the user's function once for the batch, `func(prompts, completions)` in TRL's form (see
    reward_function_inputs), and check it returned one finite number per completion."""
    try:
        result = func(*reward_function_inputs(prompts, completions))
    except Exception as exc:  # noqa: BLE001 - report the user's function failing, not our traceback
        raise UserError(f"reward_fn={spec} raised {type(exc).__name__}: {exc}") from exc
    try:
        values = [float(v) for v in result]
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"reward_fn={spec} must return a list of floats, got {type(result).__name__}."
        ) from exc
    if len(values) != len(completions):
        raise UserError(f"reward_fn={spec} returned {len(values)} scores for {len(completions)} completions.")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(
            f"reward_fn={spec} returned a non-finite score ({values[bad[0]]}) for completion {bad[0]}."
        )
    return torch.tensor(values, dtype=torch.float32)


def reward_model_ids(tokenizer, prompt: Any, completion: str) -> list[int]:
    """The token ids a reward model with its own tokenizer scores for one prompt (a string or a
    conversation) and its completion.

    A conversation, when the RM's tokenizer has a chat template, is rendered through that template with
    the completion as the assistant's turn, exactly as train-rm encodes a conversational pair; anything
    else is read as text: prompt + completion + EOS."""
    if not isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        answer = [{"role": "assistant", "content": completion}]
        ids = encode_side(tokenizer, prompt, answer, where="reward_checkpoint")
    else:
        eos = tokenizer.eos_token or ""
        text = prompt_text(prompt) + completion + ("" if completion.endswith(eos) else eos)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids[: tokenizer.model_max_length]


class SeparateRewardModel:
    """A sequence classifier with its own tokenizer: scores prompts and completions re-tokenized for it
    (`reward_model_ids`)."""

    def __init__(self, path: str, model_cfg, device: torch.device, batch_size: int):
        from ppo_cli.models import is_adapter_dir, load_sequence_classifier, load_tokenizer

        self.device, self.batch_size = device, batch_size
        if is_adapter_dir(path):
            from peft import PeftModel

            base = _adapter_base(path)
            self.tokenizer = load_tokenizer(path, model_cfg.trust_remote_code)
            base_model = load_sequence_classifier(model_cfg, self.tokenizer, device, name_or_path=base)
            self.model = PeftModel.from_pretrained(base_model, path).to(device)
        else:
            self.tokenizer = load_tokenizer(path, model_cfg.trust_remote_code)
            self.model = load_sequence_classifier(model_cfg, self.tokenizer, device, name_or_path=path)
        self.model.eval().requires_grad_(False)
        self.tokenizer.padding_side = "right"

    @torch.inference_mode()
    def score(self, prompts: list[Any], completions: list[str]) -> torch.Tensor:
        """One score per completion; `prompts` as the rows give them (strings or conversations)."""
        from ppo_cli.rlhf import position_ids_from_mask

        sequences = [reward_model_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            input_ids = pad_right(chunk, self.tokenizer.pad_token_id).to(self.device)
            attention_mask = pad_right([[1] * len(s) for s in chunk], 0).to(self.device)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
            )
            scores.append(out.logits[:, 0].float().cpu())
        return torch.cat(scores)


def _adapter_base(path: str) -> str:
    from ppo_cli.models import recorded_base_model

    return recorded_base_model(path, "reward_checkpoint")


def rm_shares_base(reward_checkpoint: str, base_model: str) -> bool:
    """True when reward_checkpoint is one of our RM adapters trained on `base_model`."""
    from ppo_cli.models import _same_model, is_adapter_dir, read_product_info

    if not is_adapter_dir(reward_checkpoint):
        return False
    info = read_product_info(reward_checkpoint, "reward_checkpoint")
    if info.get("stage") not in (None, "rm"):
        raise UserError(
            f"reward_checkpoint={reward_checkpoint} is the product of the {info['stage']} stage, "
            "not a reward model."
        )
    base = _adapter_base(reward_checkpoint)
    return _same_model(base, base_model) and Path(reward_checkpoint, "adapter_config.json").is_file()
