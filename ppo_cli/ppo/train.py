"""`ppo-cli train-ppo`: PPO with policy, reference, reward and value on one base model.

Setup reads the SFT adapter (policy + reference), the reward source (RM adapter on the same base,
a separate reward model, or a Python function), the prompts, and hands everything to PPOTrainer.
final/ is the policy as a plain peft adapter on the base; final/value/ holds the value adapter and head
(with a critic: ppo.advantage_estimator=gae).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from ppo_cli import fsdp
from ppo_cli.app import hydra_app
from ppo_cli.data import build_prompts, load_rows
from ppo_cli.errors import UserError
from ppo_cli.models import (
    autocast_dtype,
    count_parameters,
    describe_lora,
    enable_gradient_checkpointing,
    eos_token_ids,
    fill_base_model,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    read_product_info,
)
from ppo_cli.plan.shape import longest_tokens
from ppo_cli.ppo.estimators import resolve_estimation
from ppo_cli.ppo.final_eval import check_final_eval, final_eval_config, final_eval_missing, run_final_eval
from ppo_cli.ppo.roles import VALUE, Roles, build_roles
from ppo_cli.ppo.trainer import PPOTrainer
from ppo_cli.ppo.validate import validate_ppo
from ppo_cli.ppo.vllm_rollout import VLLMRollouts, check_vllm_rollouts, policy_lora_rank
from ppo_cli.reward.health import RMHealth
from ppo_cli.reward.sources import build_reward, check_reward_source, rm_shares_base
from ppo_cli.reward.stats import load_rm_stats
from ppo_cli.run import StageRun
from ppo_cli.vllm_sampler import require_vllm

STAGE = "ppo"


def prepare(cfg: DictConfig) -> None:
    fill_base_model(cfg, "sft_checkpoint", "sft")


def check_setup(cfg: DictConfig) -> None:
    check_reward_source(cfg.reward_checkpoint, cfg.reward_fn, required=True)
    if not cfg.lora.enabled:
        raise UserError(
            "train-ppo trains LoRA adapters on one shared base; lora.enabled=false is not supported "
            "(the SFT stage may still be full fine-tuning: its final/ then becomes the base)."
        )


def rm_statistics(cfg: DictConfig) -> tuple[float, float] | None:
    """The RM's stored (reward_mean, reward_std); None for a reward_fn or an RM not trained by ppo-cli."""
    return load_rm_stats(cfg.reward_checkpoint) if cfg.reward_checkpoint else None


def report_rm_health(cfg: DictConfig, logger) -> None:
    """Say how good the reward model was on held-out pairs, as train-rm measured it, and warn when it is
    at chance: PPO against such a reward model optimises noise."""
    if not cfg.reward_checkpoint or not Path(cfg.reward_checkpoint).is_dir():
        return
    health = RMHealth.from_info(read_product_info(cfg.reward_checkpoint, "reward_checkpoint"))
    if health is None:
        return
    logger.print(f"reward model {cfg.reward_checkpoint}: {health.describe()}")
    for message in health.warnings():
        logger.warn(message)


def save_value(roles: Roles, final_dir: Path, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """final/value/: the value adapter (peft format) and its head. gathered: the full trainable tensors
    of sharded roles (fsdp.gathered_state), by their names in `roles`; None: read them from `roles`."""
    kwargs, head = {}, roles.value_head.state_dict()
    if gathered is not None:
        kwargs["state_dict"] = {
            k.removeprefix("model."): v for k, v in gathered.items() if k.startswith("model.")
        }
        head = {k.removeprefix("value_head."): v for k, v in gathered.items() if k.startswith("value_head.")}
    roles.model.save_pretrained(
        str(final_dir),
        selected_adapters=[VALUE],
        safe_serialization=True,
        save_embedding_layers=False,
        **kwargs,
    )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in head.items()},
        str(final_dir / VALUE / "value_head.safetensors"),
    )


@hydra_app("train_ppo", "train-ppo", prepare=prepare)
def main(cfg: DictConfig) -> None:
    check_setup(cfg)
    run = StageRun(cfg, STAGE)
    validate_ppo(cfg)
    if cfg.generation.engine == "vllm":
        require_vllm(run.device)
        check_vllm_rollouts(cfg, run.dist.world_size)
    final_eval = final_eval_config(cfg, run.final_dir)
    check_final_eval(final_eval)
    if not run.prepare():
        if final_eval_missing(cfg) and run.is_main:
            print(f"ppo-cli train-ppo: {final_eval.output} is missing; evaluating the final policy now.")
            run_final_eval(final_eval)
        return
    tokenizer_source = cfg.sft_checkpoint if cfg.sft_checkpoint else cfg.model.name_or_path
    tokenizer = load_tokenizer(tokenizer_source, cfg.model.trust_remote_code, cfg.model.revision)
    tokenizer.padding_side = "left"
    rows = load_rows(cfg.data.train, "data.train", cfg.data.split)
    prompts, report = build_prompts(tokenizer, rows, cfg.data.max_length, cfg.data.overflow)
    if report.describe(cfg.data.max_length):
        print(f"data.train: {report.describe(cfg.data.max_length)}")
    if len(prompts) < cfg.train.batch_size * run.dist.world_size:
        dropped = (
            f" ({report.dropped} of {report.total} longer than data.max_length={cfg.data.max_length} were "
            "dropped: raise data.max_length or use data.overflow=truncate)"
            if report.dropped
            else ""
        )
        raise UserError(
            f"data.train has {len(prompts)} usable prompts{dropped}, fewer than one rollout batch "
            f"(train.batch_size={cfg.train.batch_size} x {run.dist.world_size} ranks)."
        )
    shared_rm = bool(cfg.reward_checkpoint) and rm_shares_base(cfg.reward_checkpoint, cfg.model.name_or_path)
    if cfg.ppo.reward_normalization == "rm_stats" and rm_statistics(cfg) is None:
        raise UserError(
            "ppo.reward_normalization=rm_stats needs reward_checkpoint to be an RM trained by ppo-cli "
            "(its final/ppo_cli.json holds reward_mean/reward_std)."
        )

    # The shared base never trains: under bf16 autocast it is held in bf16 (model.dtype=auto); a 4/8-bit
    # base (model.load_in_4bit / load_in_8bit) stays as bitsandbytes quantized it.
    base = load_causal_lm(
        cfg.model,
        tokenizer,
        run.device,
        frozen_compute=autocast_dtype(run.device, cfg.train.mixed_precision),
        load_to=fsdp.load_device(cfg, run.dist),  # train.strategy=fsdp: rank 0 alone reads the base
    )
    sft_adapter = cfg.sft_checkpoint if cfg.sft_checkpoint and is_adapter_dir(cfg.sft_checkpoint) else None
    hidden = base.get_input_embeddings().weight.shape[1]
    hidden = getattr(base.config, "hidden_size", hidden)
    critic = resolve_estimation(cfg.ppo, cfg.generation).critic
    roles = build_roles(
        base, cfg.lora, sft_adapter, cfg.reward_checkpoint if shared_rm else None, hidden, critic=critic
    )
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(roles.model)
    reward = build_reward(
        cfg.reward_checkpoint,
        cfg.reward_fn,
        cfg.model,
        run.device,
        cfg.train.batch_size,
        roles=roles if shared_rm else None,
    )
    trainable, total = count_parameters(roles)
    if fsdp.enabled(cfg, run.dist):  # after the reward source, which may hold the roles
        fsdp.shard(
            roles, cfg.train.fsdp, run.dist, Roles.FSDP_FORWARD_METHODS, fsdp.loads_on_rank0(cfg, run.dist)
        )
        roles.after_sharding()
    # The policy's shape is the SFT adapter's when there is one, whatever lora.* says.
    logger = run.start(
        lora=describe_lora(roles.model, None if sft_adapter else cfg.lora.target_modules),
        data_tokens=longest_tokens(prompts, cfg.data.max_length),
    )
    report_rm_health(cfg, logger)
    vllm = None
    if cfg.generation.engine == "vllm":
        compute = (
            autocast_dtype(run.device, cfg.train.mixed_precision)
            or roles.model.get_input_embeddings().weight.dtype
        )
        vllm = VLLMRollouts(cfg, roles, policy_lora_rank(roles), compute, run.device, run.dist.rank)
    trainer = PPOTrainer(
        run, roles, tokenizer, prompts, reward, eos_token_ids(tokenizer, base), rm_statistics(cfg), vllm
    )
    logger.print(
        f"roles on one base: policy + reference ({'SFT adapter' if sft_adapter else 'base'}), reward "
        f"({'RM adapter' if shared_rm else ('reward_fn' if cfg.reward_fn else 'separate model')})"
        f"{', value' if critic else ', no critic'}; "
        f"{trainable:,} trainable of {total:,} parameters"
    )
    try:
        metrics = trainer.fit()
    finally:
        if vllm is not None:
            vllm.close()
    # Sharded, every rank gathers the trainable weights (a collective) and rank 0 writes.
    gathered = fsdp.gathered_state(roles)
    if run.is_main or gathered is not None:
        run.save_final(
            roles.model,
            tokenizer,
            # Only the LoRA weights: the embeddings are the base's (frozen). When load_tokenizer added a
            # pad token, peft would otherwise save the resized embedding matrices, and the plain
            # `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)` of
            # the README would fail on their shape.
            save_kwargs={"selected_adapters": ["default"], "save_embedding_layers": False},
            extra_save=(lambda final_dir: save_value(roles, final_dir, gathered)) if critic else None,
            reward_source=cfg.reward_checkpoint or cfg.reward_fn,
            sft_checkpoint=str(Path(cfg.sft_checkpoint).resolve()) if cfg.sft_checkpoint else None,
        )
    summary = {
        k: metrics[k] for k in ("objective/scores", "objective/kl", "objective/kl_coef") if k in metrics
    }
    summary.update(trainer.beta_summary(metrics.get("objective/kl_coef")))
    logger.finish({"steps": trainer.step, **summary}, final_dir=run.final_dir)
    if final_eval is not None and run.is_main:
        del trainer, roles, base, reward  # the evaluation loads the two policies it compares
        run_final_eval(final_eval)
    run.finish()


if __name__ == "__main__":
    main()
