"""Typed configuration of the commands around the training stages: generate, evaluate, export, pipeline,
plan and plot (the stages' own configs and the groups they share are in ppo_cli/config.py).

As in config.py, the comment lines right above each field are its documentation: ``ppo-cli <command>
--help`` shows them (ppo_cli/schema.py reads them from both files, so every field needs one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ppo_cli.choices import Overflow
from ppo_cli.config import GenerationConfig, ModelConfig


@dataclass
class CheckpointModelConfig(ModelConfig):
    # Base model under an adapter checkpoint; null = the base the adapter was trained on (its ppo_cli.json
    # or adapter_config.json). Ignored for a full model directory or a base model id.
    name_or_path: str | None = None


@dataclass
class PromptsConfig:
    # Prompts: a .jsonl/.json/.parquet/.csv file of {"prompt"} or {"messages"} rows, a list of them, or a Hub id.
    prompts: Any = MISSING
    # Split to read from a Hub dataset.
    split: str = "train"
    # Prompt tokens; longer prompts keep their last max_length tokens (truncate) or are skipped (drop).
    max_length: int = 512
    # truncate or drop.
    overflow: Overflow = Overflow.truncate
    # Use only the first N prompts (null = all).
    limit: int | None = None


@dataclass
class SamplingConfig(GenerationConfig):
    # Nucleus sampling threshold (1.0 = plain sampling at `temperature`; temperature 0 = greedy decoding).
    top_p: float = 1.0


@dataclass
class GenerateConfig:
    # What to sample from: a stage's final/ (SFT or PPO adapter), a full model directory, or a base model id.
    checkpoint: str = MISSING
    # JSONL file to write: one {"prompt", "completion"} row per prompt, plus "reward" with a reward source.
    output: str = MISSING
    # Replace `output` if it exists (otherwise an existing file is an error).
    overwrite: bool = False
    # The base model under an adapter checkpoint, and how to load it.
    model: CheckpointModelConfig = field(default_factory=CheckpointModelConfig)
    # The prompts to complete.
    data: PromptsConfig = field(default_factory=PromptsConfig)
    # Sampling settings.
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    # Score completions with this reward model: an RM stage's final/ or a sequence-classification model.
    reward_checkpoint: str | None = None
    # Or with a `package.module:function` scoring (prompts, completions) -> list[float].
    reward_fn: str | None = None
    # Prompts per generation batch (left-padded, KV cache).
    batch_size: int = 16
    # Sampling seed.
    seed: int = 0
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # Rows shown in the preview table (0 = none).
    preview_rows: int = 5


@dataclass
class EvaluateGenerationConfig(GenerationConfig):
    # Responses sampled per prompt by each of policy and reference; sample k of every prompt is drawn with
    # seed + k by both.
    samples_per_prompt: int = 1


@dataclass
class EvaluateConfig:
    # The policy to evaluate: a stage's final/ (SFT or PPO adapter), a full model directory, or a base model id.
    policy: str = MISSING
    # What to compare it with, in the same forms; null = the SFT checkpoint the policy's final/ppo_cli.json
    # names (a train-ppo product).
    reference: str | None = None
    # JSON file of the results; the samples are written beside it as OUTPUT.samples.jsonl.
    output: str = MISSING
    # Replace `output` (and its samples file) if they exist (otherwise an existing file is an error).
    overwrite: bool = False
    # The base model under adapter checkpoints, and how to load it.
    model: CheckpointModelConfig = field(default_factory=CheckpointModelConfig)
    # The held-out prompts both are sampled on.
    data: PromptsConfig = field(default_factory=PromptsConfig)
    # Sampling settings, the same for both.
    generation: EvaluateGenerationConfig = field(default_factory=EvaluateGenerationConfig)
    # Score with this reward model: an RM stage's final/ or a sequence-classification model.
    reward_checkpoint: str | None = None
    # Or with a `package.module:function` scoring (prompts, completions) -> list[float].
    reward_fn: str | None = None
    # Prompts per generation and scoring batch.
    batch_size: int = 16
    # Sampling seed (sample k of every prompt uses seed + k, for policy and reference alike).
    seed: int = 0
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # Prompts shown with both completions under the results table (0 = none).
    preview_rows: int = 3


@dataclass
class ExportConfig:
    # A stage's final/: an SFT or PPO adapter (-> causal LM) or an RM adapter (-> sequence classifier).
    checkpoint: str = MISSING
    # Directory to write the merged model + tokenizer to; it must not exist or be empty.
    output: str = MISSING
    # model.name_or_path: the base (null = the adapter's own); model.dtype: the saved dtype (auto = the
    # base's stored dtype). The merge itself always runs in float32.
    model: CheckpointModelConfig = field(default_factory=CheckpointModelConfig)
    # Device the merge runs on (cpu needs no GPU memory; auto = cuda when available).
    device: str = "cpu"
    # Largest weight file before sharding (transformers' max_shard_size).
    max_shard_size: str = "5GB"


def _open_dict() -> Any:
    """An empty config node that accepts any key (Hydra closes every other node): the per-stage overrides."""
    from omegaconf import OmegaConf

    return OmegaConf.create({}, flags={"struct": False})


@dataclass
class PipelineConfig:
    # Recipe name: a folder of recipes/ (./recipes/NAME first, then the recipes shipped with ppo-cli).
    recipe: str = MISSING
    # Run directory holding sft/, rm/, ppo/; null = outputs/pipeline/<recipe>-<timestamp>. Pass an
    # existing one to continue it: complete stages are skipped, an interrupted stage resumes.
    output_dir: str | None = None
    # auto (skip complete stages, resume interrupted ones) or never (refuse an output_dir that holds runs).
    resume: str = "auto"
    # Stages to run, in order; a stage left out must already be complete in output_dir (or be replaced
    # with e.g. ppo.sft_checkpoint=DIR).
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    # Compose and check the three stage configs, print them, and exit without training.
    dry_run: bool = False
    # Overrides of one stage, e.g. sft.train.max_steps=10, ppo.generation.temperature=0.9, sft.lora=all-linear.
    sft: Any = field(default_factory=_open_dict)
    # Overrides of the rm stage, e.g. rm.train.lr=5e-5.
    rm: Any = field(default_factory=_open_dict)
    # Overrides of the ppo stage, e.g. ppo.ppo.kl_coef=0.1.
    ppo: Any = field(default_factory=_open_dict)
    # Overrides of every stage (before the per-stage ones), e.g. all.train.device=cpu.
    all: Any = field(default_factory=_open_dict)
    # Arguments of the recipe's setup hook (recipes/NAME/recipe.yaml), e.g. setup.pretrain_steps=100.
    setup: Any = field(default_factory=_open_dict)


@dataclass
class PlanConfig:
    # Compare the plan's total with this many GB (1e9 bytes) instead of the memory of the device the command
    # sees (null = free CUDA memory, or total RAM on CPU).
    device_memory_gb: float | None = None
    # The device the plan assumes instead of the one train.device resolves to here (cpu, cuda, cuda:1):
    # plan a GPU run from a machine without one. It changes only the plan's assumptions (cuda: a GPU that
    # supports bf16; nothing from the file load is counted on it), never the command's config.
    device: str | None = None
    # The ranks the run will have (torchrun's world size); the plan is one rank's. train.strategy=fsdp: each
    # rank holds 1/world_size of the base and of the trainable state, plus the weights all-gathered around
    # a pass; ddp (and one process): every rank holds everything. Not read from WORLD_SIZE: plan runs alone.
    world_size: int = 1


@dataclass
class PlanCommandConfig:
    # `ppo-cli plan COMMAND ...`'s own keys; every other override is COMMAND's (see ppo_cli/plan/command.py).
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class PlotCommandConfig:
    """`ppo-cli plot RUN_DIR [RUN_DIR ...]`'s keys; the run directories are plain arguments (ppo_cli/plots.py)."""

    # Directory the PNGs are written to (created if needed).
    output: str = MISSING
    # EMA weight in [0, 1) of the thick (smoothed) curves; null = set by the number of logged points.
    smoothing: float | None = None
