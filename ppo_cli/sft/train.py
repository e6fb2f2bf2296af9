"""`ppo-cli train-sft`: supervised fine-tuning of a LoRA adapter (or all weights) on a base model.

Reads prompt/completion, messages or text rows; the loss is the mean next-token cross-entropy over the
tokens that carry labels (completions, assistant turns, or whole texts). final/ is a plain peft adapter
directory on model.name_or_path, with the tokenizer.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ppo_cli import fsdp
from ppo_cli.app import hydra_app
from ppo_cli.data import IGNORE_INDEX, LengthReport, build_sft_examples, collate_sft
from ppo_cli.logger import make_console
from ppo_cli.models import (
    apply_lora,
    autocast_dtype,
    count_parameters,
    describe_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
)
from ppo_cli.plan.shape import longest_tokens
from ppo_cli.rlhf import position_ids_from_mask
from ppo_cli.run import StageRun
from ppo_cli.supervised import SupervisedTask, SupervisedTrainer, load_examples, validate_supervised

STAGE = "sft"


def sft_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float], int]:
    """Mean cross-entropy over labelled tokens (labels shifted by one: token t predicts t+1); 0 for a
    batch without one (instead of cross_entropy's NaN), so it adds nothing to a step's gradient."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
    ).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    n_tokens = int(batch["attention_mask"].sum())
    return total / max(labelled_tokens(batch), 1), {}, n_tokens


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens sft_loss is a mean over: those with a label (the first token has no prediction)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def nothing_left(report: LengthReport, max_length: int) -> str:
    return (
        f"no example is left: {report.describe(max_length)}; raise data.max_length or use shorter "
        "examples, and drop empty ones."
    )


@hydra_app("train_sft", "train-sft")
def main(cfg: DictConfig) -> None:
    validate_supervised(cfg)
    run = StageRun(cfg, STAGE)
    if not run.prepare():
        return
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    say = make_console().print if run.is_main else (lambda message: None)  # one rank speaks, in colour
    train, evals = load_examples(cfg, tokenizer, build_sft_examples, say, nothing_left)
    model = load_causal_lm(
        cfg.model,
        tokenizer,
        run.device,
        autocast=autocast_dtype(run.device, cfg.train.mixed_precision),
        load_to=fsdp.load_device(cfg, run.dist),  # train.strategy=fsdp: rank 0 alone reads the base
    )
    model = apply_lora(model, cfg.lora, task_type="CAUSAL_LM")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    logger = run.start(
        lora=describe_lora(model, cfg.lora.target_modules),
        data_tokens=longest_tokens(train, cfg.data.max_length),
    )
    task = SupervisedTask(
        model=model,
        train_examples=train,
        eval_examples=evals,
        collate=lambda examples: collate_sft(examples, tokenizer.pad_token_id),
        loss_fn=sft_loss,
        count_items=labelled_tokens,
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
