"""`eval.prompts`: train-ppo's final policy against its SFT policy on held-out prompts, once training ends —
`ppo-cli evaluate` with the run's own reward source and sampling settings, into output_dir/eval.json."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


def final_eval_config(cfg: DictConfig, final_dir: Path) -> DictConfig | None:
    """The evaluate config for this run, or None when `eval.prompts` is not set.

    The reference is the SFT checkpoint the policy started from (the bare base without one); the reward
    source, sampling length, temperature, prompt length and seed are the run's. The base loads at full
    precision, as evaluate always does.
    """
    if not cfg.eval.prompts:
        return None
    from ppo_cli.command_config import EvaluateConfig

    ecfg = OmegaConf.structured(EvaluateConfig)
    ecfg.policy = str(final_dir)
    ecfg.reference = str(cfg.sft_checkpoint or cfg.model.name_or_path)
    ecfg.output = str(eval_output(cfg))
    ecfg.overwrite = True  # a resumed run that ends again evaluates its final policy again
    ecfg.model.name_or_path = cfg.model.name_or_path
    ecfg.model.trust_remote_code = cfg.model.trust_remote_code
    ecfg.data.prompts = cfg.eval.prompts
    ecfg.data.max_length = cfg.data.max_length
    ecfg.data.limit = cfg.eval.limit
    ecfg.data.split = cfg.eval.split
    ecfg.generation.max_new_tokens = cfg.generation.max_new_tokens
    ecfg.generation.temperature = cfg.generation.temperature
    ecfg.generation.samples_per_prompt = cfg.eval.samples_per_prompt
    ecfg.generation.engine = cfg.generation.engine
    ecfg.generation.vllm = cfg.generation.vllm
    ecfg.reward_checkpoint = cfg.reward_checkpoint
    ecfg.reward_fn = cfg.reward_fn
    ecfg.seed = cfg.train.seed
    ecfg.device = cfg.train.device
    return ecfg


def check_final_eval(ecfg: DictConfig | None) -> None:
    """Refuse bad eval.* settings before training starts, not after it."""
    if ecfg is None:
        return
    from ppo_cli.errors import UserError

    # The policy does not exist yet and the reward source is the run's (checked already): only eval.* here.
    if ecfg.generation.samples_per_prompt < 1:
        raise UserError(f"eval.samples_per_prompt={ecfg.generation.samples_per_prompt} must be at least 1.")
    prompts = ecfg.data.prompts
    files = [prompts] if isinstance(prompts, str) else list(prompts)
    for file in files:
        if (
            Path(str(file)).suffix in (".jsonl", ".json", ".parquet", ".csv")
            and not Path(str(file)).is_file()
        ):
            raise UserError(f"eval.prompts={file}: no such file.")


def eval_output(cfg: DictConfig) -> Path:
    """Where a train-ppo run's held-out evaluation goes."""
    return Path(cfg.output_dir) / "eval.json"


def final_eval_missing(cfg: DictConfig) -> bool:
    """Whether a train-ppo config sets `eval.prompts` but its eval.json is not written: the run was stopped
    during the evaluation (its final/ already saved), so a rerun of the complete run evaluates it then."""
    return bool(cfg.eval.prompts) and not eval_output(cfg).is_file()


def run_final_eval(ecfg: DictConfig) -> dict:
    """Evaluate, after the caller dropped the training models (the evaluation loads its own)."""
    from ppo_cli.evaluation.command import run

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run(ecfg)
