"""A separate reward model: a sequence classifier with its own tokenizer (a Hub id, a full model
directory, or our RM adapter on another base). Prompts and completions are re-tokenized for it
(`reward_model_ids`) and scored like every RM, at the last real token (`scoring.sequence_scores`)."""

from __future__ import annotations

from typing import Any

import torch

from ppo_cli.data import prompt_text
from ppo_cli.models import is_adapter_dir, load_sequence_classifier, load_tokenizer, recorded_base_model
from ppo_cli.reward.scoring import batched_scores
from ppo_cli.rm.pairs import encode_side


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
    (`reward_model_ids`), or token ids already in its vocabulary (`score_ids`)."""

    def __init__(self, path: str, model_cfg, device: torch.device, batch_size: int):

        self.device, self.batch_size = device, batch_size
        self.tokenizer = load_tokenizer(path, model_cfg.trust_remote_code)
        if is_adapter_dir(path):
            from peft import PeftModel

            base = recorded_base_model(path, "reward_checkpoint")
            base_model = load_sequence_classifier(model_cfg, self.tokenizer, device, name_or_path=base)
            self.model = PeftModel.from_pretrained(base_model, path).to(device)
        else:
            self.model = load_sequence_classifier(model_cfg, self.tokenizer, device, name_or_path=path)
        self.model.eval().requires_grad_(False)
        self.tokenizer.padding_side = "right"

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """One score per token sequence (ids of this RM's tokenizer), float32 on CPU."""
        return batched_scores(
            self.model, sequences, self.tokenizer.pad_token_id, self.batch_size, self.device
        )

    def score(self, prompts: list[Any], completions: list[str]) -> torch.Tensor:
        """One score per completion; `prompts` as the rows give them (strings or conversations)."""
        return self.score_ids([reward_model_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)])
