"""The two reward-model baselines of `bench/rm_bench.py`, each run as its own process.

    python bench/rm_baselines.py plain BASE TRAIN.jsonl OUT_DIR --seed S [--steps 600 --batch-size 16]
    /path/to/trl-venv/bin/python bench/rm_baselines.py trl BASE TRAIN.jsonl OUT_DIR --seed S [...]

Both train a fresh LoRA (r=16, alpha=32, every linear layer, no dropout; the score head trains and is
saved with the adapter) on `AutoModelForSequenceClassification(num_labels=1)` from the base, with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), for `steps` optimizer steps of `batch_size` pairs,
and save the adapter + tokenizer to OUT_DIR:

- plain: a plain loop; AdamW at a constant 1e-4, no warmup, no clipping, fp32, transformers' own head
  initialisation; the score is the logit at the last non-pad token (transformers' pooling).
- trl: TRL 1.16's `RewardTrainer` with its defaults (linear decay to 0, no warmup, clipping at 1.0, bf16
  autocast, dropout disabled), the same LoRA and budget; gradient checkpointing (on by default) is turned
  off, which changes the time, not the gradients.

Each sequence is prompt + answer + EOS; the tokenizer gets a pad token distinct from EOS (ppo-cli's
loader's rule), so every method and the judge score the same token.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def load_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pad_tokenizer(base: str):
    """The base's tokenizer with a pad token distinct from EOS (as ppo-cli's loader makes it)."""
    sys.path.insert(0, str(REPO))
    from ppo_cli.models import load_tokenizer

    return load_tokenizer(base)


def plain(base: str, train_file: Path, out: Path, seed: int, steps: int, batch_size: int, lr: float) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tok = pad_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **LORA))  # SEQ_CLS saves the head
    pairs = [
        [tok(r["prompt"] + r[side])["input_ids"] + [tok.eos_token_id] for side in ("chosen", "rejected")]
        for r in load_pairs(train_file)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, order = random.Random(seed), []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:  # a fresh shuffled epoch
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        seqs = [p[0] for p in batch] + [p[1] for p in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[: len(batch)] - scores[len(batch) :]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def trl(base: str, train_file: Path, out: Path, seed: int, steps: int, batch_size: int) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = pad_tokenizer(base)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_pairs(train_file)]
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    args = RewardConfig(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_steps=100,
        disable_tqdm=True,
        use_cpu=True,
        # Recomputing activations gives the same gradients (TRL disables dropout): only the time changes.
        gradient_checkpointing=False,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **LORA),
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    tok.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("plain", "trl"))
    parser.add_argument("base")
    parser.add_argument("train", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="plain loop only (TRL keeps its default)")
    ns = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.method == "plain":
        plain(ns.base, ns.train, ns.out, ns.seed, ns.steps, ns.batch_size, ns.lr)
    else:
        trl(ns.base, ns.train, ns.out, ns.seed, ns.steps, ns.batch_size)


if __name__ == "__main__":
    main()
