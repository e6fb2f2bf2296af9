"""A short full-parameter pretraining on the task's text, which turns a random-init model into a base that
"speaks" the task's language."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ppo_cli.tiny.task import all_prompts, sample_completion

# The demo base's pretraining (the tiny recipe's and `python -m ppo_cli.tiny`'s default): enough for the model
# to answer with task words and stop, in well under a minute on 2 CPU cores.
DEMO_PRETRAIN_STEPS = 300

if TYPE_CHECKING:  # torch and transformers are imported only when a model is pretrained
    from transformers import PreTrainedTokenizerFast


def pretraining_texts(tokenizer: PreTrainedTokenizerFast, n: int, seed: int = 0) -> list[list[int]]:
    """`n` token sequences of the task's "language", each ending with EOS: a plain prompt followed by a mixed
    completion (3 in 4), or the same exchange in the chat format (1 in 4). The sentiment is uniform, so the
    pretrained base has no preference for positive words: that is left for PPO to learn."""
    rng = random.Random(f"pretrain-{seed}")
    prompts = all_prompts()
    eos = tokenizer.eos_token_id
    sequences = []
    for _ in range(n):
        prompt, completion = rng.choice(prompts), sample_completion(rng)
        if rng.random() < 0.75:
            ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        else:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion.strip()},
            ]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        sequences.append([*ids, eos])
    return sequences


def pretraining_optimizer(model, steps: int, lr: float):
    """AdamW and its schedule for `steps` of full-parameter pretraining: linear warmup over the first tenth,
    then cosine decay to a tenth of `lr`. Returns (optimizer, scheduler)."""
    import math

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def pretrain(
    model,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> list[float]:
    """Full-parameter next-token training of `model` on `pretraining_texts` (AdamW, warmup + cosine decay).

    A few hundred steps turn the random-init model into a base that "speaks" the task: it continues a prompt
    with task words and ends with EOS, like a small pretrained LM. Returns the loss of every step.
    """

    import torch

    sequences = pretraining_texts(tokenizer, steps * batch_size, seed)
    eos = tokenizer.eos_token_id
    optimizer, scheduler = pretraining_optimizer(model, steps, lr)
    model.train()
    losses = []
    # One thread: the matrices are too small to gain from more, a busy machine makes extra threads much
    # slower, and the result does not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            losses.append(_pretrain_step(model, sequences[step * batch_size : (step + 1) * batch_size], eos))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def _pretrain_step(model, batch: list[list[int]], eos: int) -> float:
    """Forward + backward of one right-padded batch (pads masked out of attention and loss); returns the loss."""
    import torch

    width = max(len(s) for s in batch)
    input_ids = torch.tensor([s + [eos] * (width - len(s)) for s in batch])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return loss.detach().item()
