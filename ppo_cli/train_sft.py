"""`ppo-cli train-sft`: supervised fine-tuning of a LoRA adapter (or all weights) on a base model.

Reads prompt/completion, messages or text rows; the loss is the mean next-token cross-entropy over the
tokens that carry labels (completions, assistant turns, or whole texts). final/ is a plain peft adapter
directory on model.name_or_path, with the tokenizer.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ppo_cli.app import hydra_app
from ppo_cli.data import IGNORE_INDEX, build_sft_examples, collate_sft, load_train_eval_rows
from ppo_cli.errors import UserError
from ppo_cli.models import (
    apply_lora,
    count_parameters,
    describe_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
)
from ppo_cli.rlhf import position_ids_from_mask
from ppo_cli.run import StageRun
from ppo_cli.trainer import SupervisedTask, SupervisedTrainer

STAGE = "sft"


def sft_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float], int]:
    """Mean cross-entropy over labelled tokens (labels shifted by one: token t predicts t+1)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
    ).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    n_tokens = int(batch["attention_mask"].sum())
    return loss, {}, n_tokens


def load_examples(cfg: DictConfig, tokenizer, logger_print) -> tuple[list[dict], list[dict]]:
    data_cfg = cfg.data
    train_rows, eval_rows = load_train_eval_rows(data_cfg, cfg.train.seed)
    train, report = build_sft_examples(tokenizer, train_rows, data_cfg.max_length, data_cfg.overflow)
    evals, eval_report = build_sft_examples(tokenizer, eval_rows, data_cfg.max_length, data_cfg.overflow)
    for name, rep in (("data.train", report), ("eval", eval_report)):
        message = rep.describe(data_cfg.max_length)
        if message:
            logger_print(f"[yellow]{name}: {message}[/]")
    if not train:
        raise UserError(
            f"data.train={data_cfg.train}: no example is left: {report.describe(data_cfg.max_length)}; "
            "raise data.max_length or use shorter examples, and drop empty ones."
        )
    return train, evals


def validate(cfg: DictConfig) -> None:
    if cfg.data.overflow not in ("truncate", "drop"):
        raise UserError(f"data.overflow={cfg.data.overflow} is not one of truncate, drop.")
    if cfg.data.max_length < 2:
        raise UserError(f"data.max_length={cfg.data.max_length} is too small (at least 2 tokens).")
    for key in ("batch_size", "grad_accum_steps", "log_every"):
        if cfg.train[key] < 1:
            raise UserError(f"train.{key}={cfg.train[key]} must be at least 1.")


@hydra_app("train_sft", "train-sft")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    run = StageRun(cfg, STAGE)
    if not run.prepare():
        return
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    train, evals = load_examples(cfg, tokenizer, print)
    model = load_causal_lm(cfg.model, tokenizer, run.device)
    model = apply_lora(model, cfg.lora, task_type="CAUSAL_LM")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    logger = run.start(lora=describe_lora(model, cfg.lora.target_modules))
    task = SupervisedTask(
        model=model,
        train_examples=train,
        eval_examples=evals,
        collate=lambda examples: collate_sft(examples, tokenizer.pad_token_id),
        loss_fn=sft_loss,
        # Only the LoRA weights: a resized embedding saved with the adapter would make the plain
        # `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)` fail on shapes.
        save_final=lambda: run.save_final(
            model, tokenizer, save_kwargs={"save_embedding_layers": False} if cfg.lora.enabled else None
        ),
        summary={
            "parameters": f"{trainable:,} trainable of {total:,}",
            "examples": f"{len(train)} train, {len(evals)} eval",
            "device": str(run.device),
        },
    )
    trainer = SupervisedTrainer(run, task)
    result = trainer.fit()
    logger.finish({"steps": trainer.step, **result}, final_dir=run.final_dir)
    run.finish()


if __name__ == "__main__":
    main()
