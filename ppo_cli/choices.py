"""The option keys' value sets (`Choice` enums used by ppo_cli/config.py's fields), and the values refused
with a reason."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A key with a fixed set of values: a value outside it is rejected when Hydra composes the config
    (exit 2 naming the key and the choices, before any model loads). Members compare equal to, print as
    and serialise as their plain string value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# Values a Choice key refuses with a reason, said instead of the bare list of choices.
REFUSED_CHOICES = {
    ("train.mixed_precision", "fp16"): (
        "train.mixed_precision=fp16 is not supported: fp16's narrow range needs loss scaling, which ppo-cli "
        "does not do, so small gradients would silently become zero. Use train.mixed_precision=bf16 (GPUs "
        "from Ampere on, and CPUs) or train.mixed_precision=no (fp32); auto picks bf16 where the hardware "
        "supports it and fp32 elsewhere."
    ),
}


class GenerationEngine(Choice):
    hf = "hf"
    vllm = "vllm"


class Dtype(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class Overflow(Choice):
    truncate = "truncate"
    drop = "drop"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Schedule(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Strategy(Choice):
    """How several ranks share the model: ddp replicates it, fsdp shards it (ppo_cli/fsdp.py)."""

    ddp = "ddp"
    fsdp = "fsdp"


class MixedPrecision(Choice):
    auto = "auto"
    bf16 = "bf16"
    no = "no"


class KLController(Choice):
    adaptive = "adaptive"
    fixed = "fixed"


class RewardNormalization(Choice):
    sft_samples = "sft_samples"
    sft_mean = "sft_mean"
    rm_stats = "rm_stats"
    whiten = "whiten"
    none = "none"


class AdvantageEstimator(Choice):
    gae = "gae"
    grpo = "grpo"
    rloo = "rloo"
    reinforce_plus_plus = "reinforce_plus_plus"


class KLIn(Choice):
    reward = "reward"
    loss = "loss"


class KLEstimator(Choice):
    # docs/ppo-details.md, "KL estimators"; the same names as ppo_cli/rlhf/rewards.py's KL_ESTIMATORS.
    # k1 is refused in the loss (ppo/estimators.py): its expected gradient there is zero.
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"
    k3_plus = "k3_plus"  # verl's k3+ (a + cannot be an enum member's name, which is what Hydra matches)
    k3_iw = "k3_iw"


class LossAggregation(Choice):
    token_mean = "token_mean"
    seq_mean_token_mean = "seq_mean_token_mean"
    seq_mean_token_sum = "seq_mean_token_sum"


class SamplerCorrection(Choice):
    # docs/ppo-details.md, "Off-policy corrections, DAPO and GSPO"; ppo_cli/rlhf/correction.py's names.
    none = "none"
    tis = "tis"
    seq_tis = "seq_tis"


class RatioLevel(Choice):
    token = "token"
    sequence = "sequence"
