"""`ppo-cli train-rm`: a scalar reward model trained on preference pairs (Bradley-Terry).

The model is the base as `AutoModelForSequenceClassification(num_labels=1)` with a LoRA adapter; the score
head trains too and is saved with the adapter (peft `modules_to_save`). Its score for a sequence is the
head's output at the last real token (`reward.scoring.sequence_scores`).

Initialisation (InstructGPT's recipe): with `sft_checkpoint`, the RM adapter starts as a copy of the SFT
adapter (same LoRA shape, same weights: the SeqCls trunk has the CausalLM trunk's parameter names);
without it, a fresh LoRA on the base. A full-model SFT product is itself the base. The head starts small,
N(0, 1/sqrt(hidden + 1)).

Each step scores the chosen and rejected sequences of a batch in ONE forward pass and minimises
-log sigmoid(r_chosen - r_rejected - margin) (+ center_rewards_coef * mean((r_c + r_r)^2)).
After training, the mean and std of the scores over (up to 2,000) training sequences are stored in
final/ppo_cli.json as reward_mean / reward_std: PPO uses them to put scores on a fixed scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from ppo_cli import checkpoint as ckpt
from ppo_cli import fsdp
from ppo_cli.app import hydra_app
from ppo_cli.data import LengthReport
from ppo_cli.errors import UserError
from ppo_cli.logger import make_console
from ppo_cli.models import (
    apply_lora,
    autocast,
    autocast_dtype,
    count_parameters,
    describe_lora,
    enable_gradient_checkpointing,
    fill_base_model,
    is_adapter_dir,
    load_sequence_classifier,
    load_tokenizer,
    local_or_hub,
    prepare_quantized,
)
from ppo_cli.plan.shape import longest_tokens
from ppo_cli.reward.health import RMHealth
from ppo_cli.reward.scoring import batched_scores, init_score_head, score_head_name, sequence_scores
from ppo_cli.reward.stats import REWARD_MEAN, REWARD_STD
from ppo_cli.rlhf import pairwise_reward_loss
from ppo_cli.rm.from_sft import copy_adapter_weights
from ppo_cli.rm.pairs import build_pair_examples, collate_pairs
from ppo_cli.run import StageRun
from ppo_cli.supervised import SupervisedTask, SupervisedTrainer, load_examples, validate_supervised

STAGE = "rm"
# Sequences (chosen + rejected) scored after training for reward_mean / reward_std.
STATS_MAX_SEQUENCES = 2000


# ---------------------------------------------------------------------------------------------
# Loss


def rm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], center_coef: float = 0.0):
    """Bradley-Terry loss of a collate_pairs batch (B chosen rows, then B rejected rows)."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    n = scores.shape[0] // 2
    chosen, rejected = scores[:n], scores[n:]
    margin = batch.get("margin")
    if margin is not None and not bool(margin.any()):
        margin = None
    out = pairwise_reward_loss(chosen, rejected, margin=margin, center_coef=center_coef)
    with torch.no_grad():
        metrics = {
            "accuracy": out["accuracy"].item(),
            "rewards/chosen": out["chosen_mean"].item(),
            "rewards/rejected": out["rejected_mean"].item(),
            "rewards/margin": (chosen - rejected).mean().item(),
            "rewards/mean": scores.mean().item(),
            "rewards/std": scores.std(unbiased=False).item(),
        }
    return out["loss"], metrics, int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------
# Config checks (before anything loads)


def prepare(cfg: DictConfig) -> None:
    """Runs before the required-keys check: the base model may come from sft_checkpoint."""
    sft = cfg.sft_checkpoint
    if not sft:
        return
    fill_base_model(cfg, "sft_checkpoint", "sft")  # also refuses products of other stages
    # A full fine-tuned model (no adapter) is the RM's base itself.
    if (
        not is_adapter_dir(sft)
        and Path(local_or_hub(cfg.model.name_or_path)) != Path(sft).expanduser().resolve()
    ):
        raise UserError(
            f"sft_checkpoint={sft} is a full model (full fine-tuning), so it is the reward model's base, but "
            f"model.name_or_path={cfg.model.name_or_path}; leave model.name_or_path unset."
        )


def validate(cfg: DictConfig) -> None:
    validate_supervised(cfg)
    if cfg.center_rewards_coef < 0:
        raise UserError(f"center_rewards_coef={cfg.center_rewards_coef} must be >= 0.")


# ---------------------------------------------------------------------------------------------
# Data


def nothing_left(report: LengthReport, max_length: int) -> str:
    return f"no pair is left after applying data.max_length={max_length}; raise it or use shorter examples."


# ---------------------------------------------------------------------------------------------
# Model


def _targets(value) -> list[str] | str | None:
    if isinstance(value, ListConfig | list | tuple | set):
        return sorted(str(v) for v in value)
    return value


def sft_lora_config(sft_dir: str, cfg: DictConfig, head: str | None, warn, explicit: set[str] | None = None):
    """The SFT adapter's LoraConfig turned into a SEQ_CLS one (same shape; our dropout; the head saved).

    Differences with the lora.* keys in `explicit` (the ones the user set; None = all) are reported, and
    cfg.lora is updated to the shape actually used, so that config.yaml tells the truth."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(sft_dir)
    if config.peft_type != "LORA":
        raise UserError(
            f"sft_checkpoint={sft_dir} holds a {config.peft_type} adapter; only LoRA is supported."
        )
    used = {"r": config.r, "alpha": config.lora_alpha, "target_modules": _targets(config.target_modules)}
    asked = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": _targets(cfg.lora.target_modules)}
    ignored = [
        f"lora.{k}={asked[k]}"
        for k in used
        if asked[k] is not None and asked[k] != used[k] and (explicit is None or k in explicit)
    ]
    if ignored:
        warn(
            f"the reward model starts as a copy of the SFT adapter, so it keeps its shape (r={used['r']}, "
            f"alpha={used['alpha']}, target_modules={used['target_modules']}); ignoring {', '.join(ignored)}."
        )
    cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules = used["r"], used["alpha"], used["target_modules"]
    config.task_type = "SEQ_CLS"
    config.modules_to_save = [head] if head else None
    config.inference_mode = False
    config.lora_dropout = cfg.lora.dropout
    config.base_model_name_or_path = None  # get_peft_model records the base we load
    return config


def build_reward_model(
    cfg: DictConfig,
    tokenizer,
    device: torch.device,
    warn=lambda message: None,
    explicit: set[str] | None = None,
    load_to: torch.device | None = None,
):
    """The RM to train: (model, head name, a one-line description of its initialisation).

    `explicit`: the lora.* keys the user set (see `overridden_lora_keys`), None = all of them.
    `load_to`: where the base's weights go (`load_sequence_classifier`)."""
    from peft import get_peft_model

    model = load_sequence_classifier(
        cfg.model,
        tokenizer,
        device,
        autocast=autocast_dtype(device, cfg.train.mixed_precision),
        load_to=load_to,
    )
    try:
        head = score_head_name(model)
    except ValueError as exc:
        raise UserError(
            f"model.name_or_path={cfg.model.name_or_path}: cannot find the score head: {exc} "
            "Decoder models with a `score` head (llama, qwen2, gpt2, gpt_neox, ...) work."
        ) from exc
    init_score_head(getattr(model, head))
    sft = cfg.sft_checkpoint
    if not sft or not is_adapter_dir(sft):
        start = (
            f"full SFT model {sft}" if sft else "base model, fresh LoRA" if cfg.lora.enabled else "base model"
        )
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS", modules_to_save=[head])
        return model, head, start
    lora_config = sft_lora_config(sft, cfg, head if cfg.lora.enabled else None, warn, explicit)
    prepare_quantized(model)
    model = get_peft_model(model, lora_config)
    try:
        loaded = copy_adapter_weights(model, sft)
    except ValueError as exc:
        raise UserError(
            f"sft_checkpoint={sft}: cannot start the reward model from this adapter: {exc}."
        ) from exc
    start = f"SFT adapter {sft} ({loaded['lora']} LoRA tensors)"
    if not cfg.lora.enabled:  # full fine-tuning from the SFT policy: fold the adapter into the weights
        model = model.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)
        start = f"SFT adapter {sft} merged into the base (full fine-tuning)"
    return model, head, start


def overridden_lora_keys() -> set[str] | None:
    """The LoRA shape keys (r, alpha, target_modules) set on the command line (a `lora=...` group choice
    sets all three); None when not running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    keys: set[str] = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "lora":
            keys |= {"r", "alpha", "target_modules"}
        elif key.startswith("lora."):
            keys.add(key.removeprefix("lora."))
    return keys


# ---------------------------------------------------------------------------------------------
# Reward statistics


def reward_stats(
    model,
    examples: list[dict],
    pad_id: int,
    cfg: DictConfig,
    device: torch.device,
    max_sequences: int = STATS_MAX_SEQUENCES,
) -> tuple[float, float, int]:
    """(mean, std, n) of the scores of up to `max_sequences` training sequences (chosen and rejected of
    evenly spaced pairs). Forward passes only, so batches are 4x the training micro-batch."""
    n_pairs = min(len(examples), max(1, max_sequences // 2))
    step = len(examples) / n_pairs
    picked = [examples[int(i * step)] for i in range(n_pairs)]
    sequences = [e["chosen"] for e in picked] + [e["rejected"] for e in picked]
    was_training = model.training
    model.eval()
    try:
        scores = batched_scores(
            model,
            sequences,
            pad_id,
            4 * cfg.train.batch_size,
            device,
            lambda: autocast(device, cfg.train.mixed_precision),
        )
    finally:
        model.train(was_training)
    return float(scores.mean()), float(scores.std(unbiased=False)), len(sequences)


def rm_health(trainer: SupervisedTrainer, eval_pairs: int) -> RMHealth:
    """Held-out accuracy (with its interval) and the late training loss of the finished run."""
    accuracy = getattr(trainer, "final_eval", {}).get("eval/accuracy")
    losses = list(trainer.recent_losses)
    late_loss = sum(losses) / len(losses) if losses else None
    return RMHealth(accuracy, eval_pairs if accuracy is not None else 0, late_loss)


# ---------------------------------------------------------------------------------------------
# The stage


@hydra_app("train_rm", "train-rm", prepare=prepare)
def main(cfg: DictConfig) -> None:
    validate(cfg)
    run = StageRun(cfg, STAGE)
    if not run.prepare():
        return

    def say(message: str) -> None:
        if run.is_main:
            make_console().print(message)

    def warn(message: str) -> None:
        say(f"[bold yellow]warning:[/] {message}")

    # The SFT product's tokenizer is the one its adapter was trained with.
    tokenizer_source = cfg.sft_checkpoint or cfg.model.name_or_path
    tokenizer = load_tokenizer(
        tokenizer_source, cfg.model.trust_remote_code, None if cfg.sft_checkpoint else cfg.model.revision
    )
    train, evals = load_examples(cfg, tokenizer, build_pair_examples, say, nothing_left, noun="pairs")
    ckpt.seed_everything(int(cfg.train.seed))  # LoRA and head initialisation: the same on every rank
    model, head, start = build_reward_model(
        cfg, tokenizer, run.device, warn, overridden_lora_keys(), fsdp.load_device(cfg, run.dist)
    )
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    logger = run.start(
        lora=describe_lora(model, cfg.lora.target_modules),
        data_tokens=longest_tokens(train, cfg.data.max_length),
    )

    def save_final() -> None:
        mean, std, n = reward_stats(model, train, tokenizer.pad_token_id, cfg, run.device)
        logger.print(f"reward scale over {n} training sequences: mean {mean:.4g}, std {std:.4g}")
        health = rm_health(trainer, len(evals))
        logger.print(f"reward model: {health.describe()}")
        for message in health.warnings():
            logger.warn(message)
        # An adapter holds the LoRA weights and the head only: the embeddings are the base's (frozen). When
        # load_tokenizer added a pad token, peft would otherwise save the resized embedding matrix, and the
        # plain `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base,
        # num_labels=1), final)` of the README would fail on its shape.
        save_kwargs = {"save_embedding_layers": False} if hasattr(model, "peft_config") else None
        run.save_final(
            model,
            tokenizer,
            save_kwargs=save_kwargs,
            **{REWARD_MEAN: mean, REWARD_STD: std},
            reward_stats_sequences=n,
            **health.as_info(),
            score_head=head,
            sft_checkpoint=cfg.sft_checkpoint,
        )

    coef = float(cfg.center_rewards_coef)
    task = SupervisedTask(
        model=model,
        train_examples=train,
        eval_examples=evals,
        collate=lambda examples: collate_pairs(examples, tokenizer.pad_token_id),
        loss_fn=lambda m, batch: rm_loss(m, batch, coef),
        count_items=lambda batch: batch["input_ids"].shape[0] // 2,  # pairs: chosen rows, then rejected
        save_final=save_final,
        summary={
            "parameters": f"{trainable:,} trainable of {total:,} (head: {head})",
            "initialised from": start,
            "pairs": f"{len(train)} train, {len(evals)} eval",
            "device": str(run.device),
        },
    )
    trainer = SupervisedTrainer(run, task)
    result = trainer.fit()
    logger.finish({"steps": trainer.step, **result}, final_dir=run.final_dir)
    run.finish()


if __name__ == "__main__":
    main()
