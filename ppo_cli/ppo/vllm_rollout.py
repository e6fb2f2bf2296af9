"""train-ppo's rollouts with generation.engine=vllm: vLLM holds the frozen base once and samples from the
current policy adapter, handed to it after every update (docs/vllm.md).

The sync: before a rollout whose policy changed since the last one, the policy adapter (LoRA weights only,
a few MB) is saved to a private temporary folder and vLLM is given it under a new adapter id; vLLM loads
it with the first request and drops the previous one. Nothing is merged into the base, and the base
weights are never copied again. Saving through peft keeps the adapter in exactly the format vLLM reads
from a trained `final/`, so the path is the same for training and for `generate` / `evaluate`.

A quantized (4- or 8-bit) training base still runs, but vLLM loads the full-precision base from
model.name_or_path: it samples from another policy than the one PPO trains. Every step measures it
(`sampler_logprob_gap`, logged as rollout/sampler_logprob_gap, beside rollout/sampler_capped_share) and the
first step says how large it is (`VLLMRollouts.gap_warning`); ppo.sampler_correction=tis or seq_tis weights
the loss by the truncated importance ratio (rlhf.sampler_weights).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from ppo_cli import rlhf
from ppo_cli.errors import UserError
from ppo_cli.ppo.roles import POLICY, Roles
from ppo_cli.vllm_sampler import EngineShape, VLLMSampler, request_seed, vllm_lora_rank

ADAPTER = "policy"
GAP_METRIC = "rollout/sampler_logprob_gap"
# The share of real tokens whose sampler-correction weight the cap binds (ppo.sampler_correction).
CAPPED_METRIC = "rollout/sampler_capped_share"


def check_vllm_rollouts(cfg: DictConfig, world_size: int) -> None:
    """Refuse what the vLLM engine cannot do in train-ppo, before anything loads."""
    if world_size > 1:
        raise UserError(
            f"generation.engine=vllm runs one vLLM engine in one process; this run has {world_size} ranks. "
            "Use generation.engine=hf with torchrun (every rank samples with its own model)."
        )


def sampler_logprob_gap(sampler_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real response tokens (`mask`) of the sampler's logprob minus the trained policy's old
    logprob, in nats per token; 0.0 for a batch without real tokens.

    On the sampler's own samples this is k1's estimate of KL(sampler || trained policy) per token: ~0 when
    both are one policy (vLLM in fp32 on the training base), positive in expectation when they differ (a
    quantized training base, which vLLM does not load). rlhf.masked_mean leaves the pads out with `where`:
    the trained policy gives a pad after EOS logprob -inf.
    """
    return float(rlhf.masked_mean(sampler_logprobs.float() - logprobs.float(), mask))


def quantized_bits(model_cfg: DictConfig) -> int | None:
    """4 or 8 for a bitsandbytes training base (vLLM loads it at full precision instead); None otherwise."""
    if model_cfg.get("load_in_4bit"):
        return 4
    if model_cfg.get("load_in_8bit"):
        return 8
    return None


def gap_message(bits: int, gap: float, step: int) -> str:
    """One paragraph: a quantized training base means vLLM samples another policy, and by how much."""
    key = f"model.load_in_{bits}bit"
    side = "above" if gap >= 0 else "below"
    return (
        f"{key} with generation.engine=vllm: the {bits}-bit training base and vLLM's full-precision base "
        f"differ. At step {step} vLLM's logprobs of its own samples average {abs(gap):.3g} nats/token {side} "
        f"the trained policy's ({GAP_METRIC}, logged every step; in expectation the KL from vLLM's policy "
        "to the trained one, per token). PPO's ratio at the first minibatch is still exactly 1 (the old "
        "logprobs are the trainer's), but the samples are drawn from another policy: "
        "ppo.sampler_correction=tis weights each token's loss by the truncated ratio of the two. For "
        f"on-policy samples use generation.engine=hf, or {key}=false."
    )


def policy_lora_rank(roles: Roles) -> int:
    """The policy adapter's largest rank (vLLM's engine must hold it)."""
    return vllm_lora_rank(roles.model.peft_config[POLICY].to_dict(), "the policy adapter")


class VLLMRollouts:
    """Samples a rollout batch from the current policy with vLLM; the trainer pads and scores it."""

    def __init__(self, cfg: DictConfig, roles: Roles, lora_rank: int, dtype: torch.dtype, device, rank: int):
        self.cfg, self.roles, self.rank = cfg, roles, rank
        gen = cfg.generation
        sequences = cfg.train.batch_size * gen.samples_per_prompt
        shape = EngineShape(
            max_model_len=cfg.data.max_length + gen.max_new_tokens,
            max_num_seqs=sequences,
            lora_rank=lora_rank,
        )
        self.sampler = VLLMSampler(
            cfg.model.name_or_path,
            shape,
            dtype,
            device,
            gen.vllm,
            seed=cfg.train.seed,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
        self.vocab_size = self.sampler.vocab_size
        self.folder = Path(tempfile.mkdtemp(prefix="ppo-cli-vllm-"))
        self.synced_step: int | None = None
        self.sleep_between = device.type == "cuda" and bool(gen.vllm.sleep_during_update)
        # A quantized training base: vLLM samples the full-precision one; said once, at the first step.
        self.quantized_bits = quantized_bits(cfg.model)
        self.gap_warned = False

    def sync(self, step: int) -> None:
        """Hand vLLM the policy's weights after `step` updates (the saved adapter of this step)."""
        if self.synced_step == step:
            return
        target = self.folder / f"step-{step}"
        # The LoRA weights only: the embeddings are the base's, which vLLM holds already.
        self.roles.model.save_pretrained(
            str(target), selected_adapters=[POLICY], safe_serialization=True, save_embedding_layers=False
        )
        self.sampler.load_adapter(ADAPTER, target)
        previous = self.folder / f"step-{self.synced_step}"
        if self.synced_step is not None and previous.is_dir():
            shutil.rmtree(previous, ignore_errors=True)
        self.synced_step = step

    def sample(
        self, prompt_ids: list[list[int]], step: int, eos_ids: list[int], pad_id: int
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One response per row from the policy after `step` updates, and vLLM's logprob of each of its
        tokens (under the distribution it drew from: after temperature, the pad forbidden); seeds from
        (seed, rank, step, row), so a resumed run draws what the uninterrupted run would have."""
        self.sampler.wake_up()
        self.sync(step)
        gen = self.cfg.generation
        seeds = [request_seed(self.cfg.train.seed, self.rank, step, row) for row in range(len(prompt_ids))]
        responses, logprobs = self.sampler.sample_with_logprobs(
            prompt_ids,
            gen.max_new_tokens,
            gen.temperature,
            eos_ids,
            seeds,
            adapter=ADAPTER,
            # The pad token is never sampled, as with the hf engine (a pad beyond the base's vocabulary,
            # added by ppo-cli's tokenizer, cannot be sampled by vLLM in the first place).
            forbidden_token=pad_id if pad_id < self.vocab_size else None,
        )
        if self.sleep_between:
            self.sampler.sleep()
        return responses, logprobs

    def gap_warning(self, step: int, metrics: dict[str, float]) -> str | None:
        """The quantized-base warning, once: at the first step this run trains (a resumed run's too, whose
        console is new), with the gap that step measured; None otherwise."""
        if self.gap_warned or self.quantized_bits is None or GAP_METRIC not in metrics:
            return None
        self.gap_warned = True
        return gap_message(self.quantized_bits, metrics[GAP_METRIC], step)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
