"""The memory a training run will need, from numbers only: the model's shape, the LoRA shape, the batch and
lengths, the dtypes. No torch, no model: `ppo_cli/plan/command.py` reads these numbers from the config.

What is counted (bytes at the peak of a step):
  base weights       every parameter at its weights dtype; under 4-bit/8-bit quantization the blocks'
                     linear weights at ~4.5/8.5 bits (bitsandbytes' blocks carry a scale), the rest
                     (embeddings, norms, lm_head) at their dtype: fp32 where peft prepares the base for
                     training (train-sft, train-rm), model.dtype on train-ppo's shared base
  trainable weights  LoRA A and B of every targeted linear layer (r x in + out x r), fp32; in train-ppo the
                     policy and value adapters (the policy alone with a critic-free estimator); full fine-tuning: every parameter, fp32
  gradients          fp32, one per trainable weight
  AdamW state        fp32 exp_avg and exp_avg_sq: 8 bytes per trainable weight
  frozen adapters    train-ppo's reference and reward adapters (and the reward head) on the shared base;
                     the RM's score head and PPO's value head are counted with the trainable weights
  activations        what the backward pass keeps for one micro-batch (ACTIVATION_* per token and layer),
                     or with gradient checkpointing each layer's input plus one layer recomputed
  logits             (batch x positions x vocab): at the activation dtype plus the fp32 copies the loss and
                     log-softmax make
  rollout KV cache   train-ppo: 2 (K and V) x layers x prompts x (prompt + response) x kv heads x head dim
  CPU only           the Python process with torch/transformers imported (PROCESS_BASELINE) and, when
                     the load converts the checkpoint to another dtype, the file's pages and the converted
                     copies while it loads, as far as they exceed the step's own tensors (an fp32 file
                     loaded as fp32 maps its pages as the weights themselves: nothing extra). A 4/8-bit
                     base reads every full-precision weight to quantize it; when its unquantized layers
                     keep the file's dtype they stay the file's mapped pages, and the whole file, its
                     full-precision linear weights included, stays resident for the whole run

One rank under train.strategy=fsdp (`shard_parts`, plan.world_size ranks): the base weights, trainable
weights, gradients, AdamW state and frozen adapters cut 1/world (gradients whole while SFT/RM accumulate
unreduced), plus the FSDP gathered weights (the root unit whole, and two units: the running one and the
prefetched next, i.e. two decoder layers, or one beside the untied input embeddings or output head), plus the whole base while loading where that load exceeds the sharded step and
the planned memory holds it (a 4/8-bit base on every rank's device; any other base on rank 0's CPU only).
On CPU a sharded run returns freed blocks to the system at once, so its activations and logits count at the
share of them its peak measured (LIVE_SHARE_FREES_RETURNED).

The constants were calibrated against the peak RSS of short CPU runs (bench/memory.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GB = 1e9

# Elements the backward pass keeps per token of one transformer layer. Hidden-sized ones, in the dtype of
# the residual stream (the weights' dtype: autocast casts only at the matmuls): the two RMS norms' input,
# statistics and output, the attention and MLP projections' inputs, q/k/v before and after the rotary
# embedding, the attention output (~16 x hidden). Intermediate-sized ones, in the compute dtype: the MLP's
# gate, up, activation and product (4 x intermediate). With LoRA dropout on, each targeted layer also keeps
# its dropout mask and dropped input (2 x its input size). Under autocast over weights of another dtype the
# matmuls keep their cast inputs too (AUTOCAST_COPIES x hidden).
ACTIVATION_HIDDEN = 16
ACTIVATION_INTERMEDIATE = 4
LORA_DROPOUT_INPUTS = 2
AUTOCAST_COPIES = 4
# fp32 copies of the logits the loss (or log-softmax) makes, on top of the logits themselves.
LOGITS_FP32_COPIES = 2
# Peak RSS of the Python process once torch, transformers, peft and datasets are imported and a tiny
# model has run (bench/memory.py: the tiny model's runs are almost only this).
PROCESS_BASELINE = 500 * 2**20
# The activation and logits constants above fit the peak RSS of CPU runs under glibc's default malloc,
# whose heap keeps freed activations between live blocks, so a step's passes add up. A run that unmaps
# freed blocks at once (train.strategy=fsdp on CPU) peaked at this share of them: bench/memory.py's
# two-rank train-ppo of the 267M Llama (activations and logits planned 4,321 MiB, measured ~2,250).
LIVE_SHARE_FREES_RETURNED = 0.52
# Bits per quantized linear weight (bitsandbytes NF4 / int8 with their per-block scales).
QUANT_BITS = {4: 4.5, 8: 8.5}


@dataclass(frozen=True)
class ModelShape:
    """A decoder's shape, from its config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    # (name, in_features, out_features) of every linear layer in one block; a name may repeat (GPT-2's c_proj)
    linears: tuple[tuple[str, int, int], ...]

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def other_params(self) -> int:
        """Norms: two per layer and a final one."""
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_linear_params + self.embedding_params + self.other_params


def linears_of(model_type: str, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int):
    """The linear layers of one block, by architecture family (Llama-like by default)."""
    if model_type == "gpt2":
        return (
            ("c_attn", hidden, 3 * hidden),
            ("c_proj", hidden, hidden),
            ("c_fc", hidden, inter),
            ("c_proj", inter, hidden),
        )
    if model_type == "gpt_neox":
        return (
            ("query_key_value", hidden, 3 * hidden),
            ("dense", hidden, hidden),
            ("dense_h_to_4h", hidden, inter),
            ("dense_4h_to_h", inter, hidden),
        )
    q, kv = heads * head_dim, kv_heads * head_dim
    return (
        ("q_proj", hidden, q),
        ("k_proj", hidden, kv),
        ("v_proj", hidden, kv),
        ("o_proj", q, hidden),
        ("gate_proj", hidden, inter),
        ("up_proj", hidden, inter),
        ("down_proj", inter, hidden),
    )


def targeted(shape: ModelShape, targets: list[str] | str) -> tuple[tuple[str, int, int], ...]:
    """The linear layers of one block that LoRA adapts. `targets`: module names, or "all-linear" (every
    linear layer of the blocks; never lm_head)."""
    if targets == "all-linear":
        return shape.linears
    names = set(targets)
    return tuple(lin for lin in shape.linears if lin[0] in names)


def lora_params(shape: ModelShape, targets: list[str] | str, r: int) -> int:
    """LoRA weights of one adapter: r x (in + out) for every targeted linear layer of every block."""
    return shape.num_layers * sum(r * (i + o) for _, i, o in targeted(shape, targets))


def weight_bytes(shape: ModelShape, weight_bytes_per: float, quant_bits: int | None = None) -> int:
    """The base's weights: all at `weight_bytes_per`, or its blocks' linear layers quantized."""
    if quant_bits is None:
        return int(shape.params * weight_bytes_per)
    linear = shape.num_layers * shape.layer_linear_params
    return int(linear * QUANT_BITS[quant_bits] / 8 + (shape.params - linear) * weight_bytes_per)


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    residual_bytes: float,
    act_bytes: float,
    checkpointing: bool = False,
    attention_scores: bool = False,
    dropout_inputs: int = 0,
) -> int:
    """What one forward pass with gradients keeps for its backward, excluding the logits.

    residual_bytes: bytes per element of the residual stream (the weights' dtype); act_bytes: of the
    matmuls' outputs (the autocast dtype, else the weights'). attention_scores: the attention kernel
    materialises the (heads x seq x seq) probabilities and keeps them (the math kernel, which ppo-cli uses on
    CPU in bf16; the fused kernels keep only their output). dropout_inputs: input features of the layers
    whose LoRA dropout is on, per block."""
    hidden = (ACTIVATION_HIDDEN * shape.hidden_size + LORA_DROPOUT_INPUTS * dropout_inputs) * residual_bytes
    if act_bytes != residual_bytes:
        hidden += AUTOCAST_COPIES * shape.hidden_size * act_bytes
    per_token = hidden + ACTIVATION_INTERMEDIATE * shape.intermediate_size * act_bytes
    layer = batch * seq * per_token
    if attention_scores:
        layer += 2 * batch * shape.num_heads * seq * seq * act_bytes
    if checkpointing:
        # each block's input stays; one block at a time is recomputed with its full activations
        return int(shape.num_layers * batch * seq * shape.hidden_size * residual_bytes + layer)
    return int(shape.num_layers * layer)


def logits_bytes(shape: ModelShape, batch: int, positions: int, act_bytes: float) -> int:
    return int(batch * positions * shape.vocab_size * (act_bytes + 4 * LOGITS_FP32_COPIES))


def kv_cache_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: float) -> int:
    return int(2 * shape.num_layers * batch * seq * shape.num_kv_heads * shape.head_dim * act_bytes)


@dataclass(frozen=True)
class RunShape:
    """What a stage will do, in numbers (ppo_cli/plan/command.py fills it from the config)."""

    stage: str  # sft, rm or ppo
    micro_batch: int  # sequences per forward pass with gradients
    seq_len: int  # tokens per sequence (PPO: prompt + response)
    weight_bytes: float  # bytes per base weight (its dtype)
    act_bytes: float  # bytes per activation (the autocast dtype, else the weights dtype)
    lora_r: int | None  # None = full fine-tuning
    lora_targets: list[str] | str = field(default_factory=list)
    lora_dropout: bool = False
    quant_bits: int | None = None  # 4 or 8 = bitsandbytes
    gradient_checkpointing: bool = False
    attention_scores: bool = False
    # train-ppo
    rollout_batch: int = 0  # prompts per rollout batch (the KV cache and the no-grad scoring passes)
    response_len: int = 0
    frozen_adapters: int = 0  # reference and reward adapters on the shared base
    critic: bool = True  # train-ppo's value adapter, head and passes (gae); the critic-free estimators: none
    # CPU: count the process, and the checkpoint file while it loads when its weights are converted to
    # another dtype (its pages and the converted copies; an fp32 file loaded as fp32 is the weights' memory)
    cpu: bool = False
    checkpoint_file_bytes: int = 0
    load_converts: bool = False
    # CPU, a 4/8-bit base whose unquantized layers alias the file (loaded at its dtype): the file's pages of
    # the linear weights, read to quantize them, stay resident beside their quantized copies
    file_stays_mapped: bool = False


def estimate(shape: ModelShape, run: RunShape) -> dict[str, int]:
    """Bytes of each part at the peak of a training step; their sum is the plan's total."""
    parts: dict[str, int] = {}
    if run.cpu:
        parts["process baseline"] = PROCESS_BASELINE
        parts["checkpoint load"] = 0  # filled in below, once the step's size is known
    lora = run.lora_r is not None
    if lora:
        parts["base weights"] = weight_bytes(shape, run.weight_bytes, run.quant_bits)
        adapter = lora_params(shape, run.lora_targets, run.lora_r)
    else:
        # every weight trains, in fp32 (keep_trainable_in_fp32)
        parts["base weights"] = 0
        adapter = shape.params
    ppo_critic = run.stage == "ppo" and run.critic
    trainable_adapters = 2 if ppo_critic else 1  # PPO: policy and value
    heads = shape.hidden_size + 1
    trainable = adapter * trainable_adapters + heads * (1 if run.stage == "rm" or ppo_critic else 0)
    parts["trainable weights"] = 4 * trainable
    parts["gradients"] = 4 * trainable
    parts["AdamW state"] = 8 * trainable
    if run.frozen_adapters:
        parts["frozen adapters"] = 4 * (adapter * run.frozen_adapters + heads)
    passes = 2 if run.stage == "rm" or ppo_critic else 1  # PPO: policy and value; RM: chosen and rejected
    # the residual stream is in the dtype of the unquantized layers (embeddings, norms); bitsandbytes' layers
    # compute in their compute dtype but return their input's
    residual = run.weight_bytes if lora else 4  # full fine-tuning: every weight fp32
    dropout_inputs = (
        sum(i for _, i, _ in targeted(shape, run.lora_targets)) if lora and run.lora_dropout else 0
    )
    parts["activations"] = passes * activation_bytes(
        shape,
        run.micro_batch,
        run.seq_len,
        residual,
        run.act_bytes,
        run.gradient_checkpointing,
        run.attention_scores,
        dropout_inputs,
    )
    if run.stage == "sft":
        parts["logits"] = logits_bytes(shape, run.micro_batch, run.seq_len, run.act_bytes)
    elif run.stage == "ppo":
        # the update's logits at response positions, and the rollout's no-grad scoring pass over them
        parts["logits"] = logits_bytes(
            shape, run.micro_batch, run.response_len, run.act_bytes
        ) + logits_bytes(shape, run.rollout_batch, run.response_len, 0)
        parts["rollout KV cache"] = kv_cache_bytes(shape, run.rollout_batch, run.seq_len, run.act_bytes)
    if run.cpu:
        # the load's transient comes before the first step: it adds only where it exceeds the step's tensors
        step = sum(parts.get(k, 0) for k in ("activations", "logits", "rollout KV cache"))
        if run.file_stays_mapped:  # not a transient: resident through the step
            rest = shape.params - shape.num_layers * shape.layer_linear_params
            parts["checkpoint load"] = max(0, run.checkpoint_file_bytes - int(rest * run.weight_bytes))
        elif run.load_converts:
            parts["checkpoint load"] = max(0, run.checkpoint_file_bytes - step)
    return parts


# vLLM's own memory on CPU beside its weights and KV cache (its modules, engine, scheduler and kernels'
# buffers): bench/engines.py's train-ppo of a 30M Llama peaked 0.35 GB higher with vLLM 0.32 sampling than
# with transformers' generate, ~0.29 GB beyond the engine's 60 MB of bf16 weights and its small cache.
VLLM_CPU_OVERHEAD = 300 * 2**20


def with_vllm(parts: dict[str, int], engine_bytes: int, sleeps: bool) -> dict[str, int]:
    """train-ppo with generation.engine=vllm: vLLM samples, so transformers' rollout KV cache is not made,
    and vLLM's engine (its copy of the base and its KV cache) is held beside the training model. An engine
    that sleeps through the update (GPU sleep mode) shares the peak with the update's activations and
    logits instead of adding to them: it counts only where it exceeds them."""
    parts = {k: v for k, v in parts.items() if k != "rollout KV cache"}
    transient = parts.get("activations", 0) + parts.get("logits", 0)
    parts["vLLM engine"] = max(0, engine_bytes - transient) if sleeps else engine_bytes
    return parts


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())


def gb(n: float) -> str:
    """Bytes as GB with two decimals (1 GB = 1e9 bytes), MB below 0.1 GB."""
    if n < 0.1 * GB:
        return f"{n / 1e6:.1f} MB"
    return f"{n / GB:.2f} GB"


def fits(total_bytes: int, device_bytes: float | None) -> bool | None:
    return None if device_bytes is None or math.isnan(device_bytes) else total_bytes <= device_bytes


@dataclass(frozen=True)
class Sharding:
    """train.strategy=fsdp over `world_size` ranks (ppo_cli/fsdp.py), as one rank's memory sees it."""

    world_size: int
    # units whose full weights a rank holds at once: the one running and the next, which FSDP2 prefetches;
    # every unit with train.fsdp.reshard_after_forward=false (kept from forward to backward)
    gathered_layers: int = 2
    # SFT and RM accumulate gradients without reducing them (set_gradient_sync): unsharded, full size
    unsharded_grads: bool = False
    # train.fsdp.cpu_offload on a GPU: the shards, their gradients and the AdamW state sit in CPU memory
    offload: bool = False
    # whether the planned memory holds the whole base while it loads: a quantized base loads whole on every
    # rank's device; any other is read by rank 0 alone, into CPU memory (the plan of a CPU run is rank 0's,
    # the busiest; a GPU never holds it)
    whole_load: bool = True
    # while it loads, the whole base beside every shard cut from it (a quantized base, loaded whole on every
    # rank); False: rank 0 drops each unit's whole weights once sent, so its load peaks at the whole base
    load_keeps_shards: bool = True
    # on CPU a sharded run unmaps freed blocks at once (ppo_cli/models/devices.py return_large_frees_to_os):
    # its activations and logits count at LIVE_SHARE_FREES_RETURNED of what glibc's default heap keeps
    frees_returned: bool = False


def gathered_layer_bytes(shape: ModelShape, run: RunShape) -> int:
    """One decoder layer's full weights as an all-gather materialises them: its base weights (quantized or
    at their dtype; fp32 under full fine-tuning), its norms and every adapter on it (fp32 LoRA)."""
    norms = 2 * shape.hidden_size
    if run.lora_r is None:
        return 4 * (shape.layer_linear_params + norms)
    linear = shape.layer_linear_params
    base = linear * QUANT_BITS[run.quant_bits] / 8 if run.quant_bits else linear * run.weight_bytes
    adapters = (2 if run.stage == "ppo" and run.critic else 1) + run.frozen_adapters
    lora = lora_params(shape, run.lora_targets, run.lora_r) // max(1, shape.num_layers)
    return int(base + norms * run.weight_bytes + 4 * adapters * lora)


def root_bytes(shape: ModelShape, run: RunShape) -> int:
    """The root unit's full weights (the final norm, and tied embeddings, which cannot be a unit of their
    own): gathered from the forward to the backward that follows (FSDP2 keeps a root gathered), so held
    whole through the step."""
    per = 4 if run.lora_r is None else run.weight_bytes
    tied = shape.embedding_params if shape.tie_word_embeddings else 0
    return int((tied + shape.hidden_size) * per)


def embedding_unit_bytes(shape: ModelShape, run: RunShape) -> int:
    """One untied embedding matrix (the input embeddings or the output head, each its own unit) gathered
    whole; 0 when tied (then in the root)."""
    per = 4 if run.lora_r is None else run.weight_bytes
    return 0 if shape.tie_word_embeddings else int(shape.vocab_size * shape.hidden_size * per)


def gathered_bytes(shape: ModelShape, run: RunShape, sharding: Sharding) -> int:
    """What a rank holds all-gathered at most: the root, plus the unit running and the next one FSDP2
    prefetches, which are two decoder layers, or a layer beside the input embeddings (first) or the output
    head (last); every unit when train.fsdp.reshard_after_forward=false. Plus, while a unit is gathered,
    the all-gather's flat output buffer, a second copy of it until it is copied out into the unit's
    parameters (FSDP2's foreach_all_gather_copy_out): the largest unit's."""
    layer, embed = gathered_layer_bytes(shape, run), embedding_unit_bytes(shape, run)
    largest = max(layer, embed)
    if sharding.gathered_layers >= shape.num_layers:  # nothing resharded after its forward
        return root_bytes(shape, run) + shape.num_layers * layer + 2 * embed + largest
    pair = layer + largest if sharding.gathered_layers >= 2 else largest
    return root_bytes(shape, run) + pair + largest


def shard_parts(
    shape: ModelShape, run: RunShape, parts: dict[str, int], sharding: Sharding
) -> dict[str, int]:
    """One rank's parts under fsdp: the base, the trainable state and the frozen adapters cut 1/world
    (nothing on the device with offload), the all-gathered weights (the root and `gathered_layers`
    layers) on top, and each rank's own activations, logits and cache (on CPU, where freed blocks are
    unmapped at once, the activations and logits at LIVE_SHARE_FREES_RETURNED). Where the planned memory
    holds the whole base while it loads (`Sharding.whole_load`; ppo_cli/fsdp.py) and that moment exceeds
    the sharded step, it is the peak."""
    n = sharding.world_size
    if n <= 1:
        return dict(parts)

    def share(name: str) -> int:
        return 0 if sharding.offload else -(-parts.get(name, 0) // n)

    out = dict(parts)
    for name in ("base weights", "trainable weights", "AdamW state", "frozen adapters"):
        if name in parts:
            out[name] = share(name)
    out["gradients"] = parts["gradients"] if sharding.unsharded_grads else share("gradients")
    if sharding.frees_returned:
        for name in ("activations", "logits"):
            if name in parts:
                out[name] = int(parts[name] * LIVE_SHARE_FREES_RETURNED)
    out["FSDP gathered weights"] = gathered_bytes(shape, run, sharding)
    weights = ("base weights", "trainable weights", "frozen adapters")
    # While it is sent, the whole loaded copy (and, where it is not dropped unit by unit, the shards
    # already cut from it): the load's moment
    loading = sum(parts.get(k, 0) for k in weights)
    loading += sum(out.get(k, 0) for k in weights) if sharding.load_keeps_shards else 0
    at_step = sum(v for k, v in out.items() if k not in ("process baseline", "checkpoint load"))
    out["whole base while loading"] = max(0, loading - at_step) if sharding.whole_load else 0
    return out
