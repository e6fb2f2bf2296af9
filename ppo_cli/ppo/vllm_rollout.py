"""train-ppo's rollouts with generation.engine=vllm: vLLM holds the frozen base once and samples from the
current policy adapter, handed to it after every update (docs/vllm.md).

The sync: before a rollout whose policy changed since the last one, the policy adapter (LoRA weights only,
a few MB) is saved to a private temporary folder and vLLM is given it under a new adapter id; vLLM loads
it with the first request and drops the previous one. Nothing is merged into the base, so a 4-bit
training base is no obstacle (vLLM loads the full-precision base from model.name_or_path), and the base
weights are never copied again. Saving through peft keeps the adapter in exactly the format vLLM reads
from a trained `final/`, so the path is the same for training and for `generate` / `evaluate`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from ppo_cli.errors import UserError
from ppo_cli.ppo.roles import POLICY, Roles
from ppo_cli.vllm_sampler import EngineShape, VLLMSampler, request_seed, vllm_lora_rank

ADAPTER = "policy"


def check_vllm_rollouts(cfg: DictConfig, world_size: int) -> None:
    """Refuse what the vLLM engine cannot do in train-ppo, before anything loads."""
    if world_size > 1:
        raise UserError(
            f"generation.engine=vllm runs one vLLM engine in one process; this run has {world_size} ranks. "
            "Use generation.engine=hf with torchrun (every rank samples with its own model)."
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
    ) -> list[list[int]]:
        """One response per row from the policy after `step` updates; seeds from (seed, rank, step, row), so
        a resumed run draws what the uninterrupted run would have."""
        self.sampler.wake_up()
        self.sync(step)
        gen = self.cfg.generation
        seeds = [request_seed(self.cfg.train.seed, self.rank, step, row) for row in range(len(prompt_ids))]
        responses = self.sampler.sample(
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
        return responses

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
