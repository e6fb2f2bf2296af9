"""PPO as a stage of the shared training loop (loop.py): a PPO step per batch of prompts (step.py),
then its guards and sample tables; the loop owns checkpoints, resume, the log cadence and the stop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from omegaconf import DictConfig

from ppo_cli import rlhf, sampling
from ppo_cli.data import EpochBatches
from ppo_cli.dist import all_reduce_mean, broadcast_parameters
from ppo_cli.loop import LoopStage, LoopState, TrainingLoop
from ppo_cli.models import autocast_dtype
from ppo_cli.ppo.estimators import Estimation, resolve_estimation
from ppo_cli.ppo.guards import BatchSigns, PPOGuards, eos_knob
from ppo_cli.ppo.roles import Roles
from ppo_cli.ppo.rollout import ForwardPasses, Rollout, RolloutMaker, RolloutSettings
from ppo_cli.ppo.scale import RewardScale
from ppo_cli.ppo.step import PPOUpdate, UpdateSettings, peak_memory_mb, step_metrics
from ppo_cli.ppo.validate import overlong_buffer
from ppo_cli.ppo.vllm_rollout import VLLMRollouts
from ppo_cli.run import StageRun
from ppo_cli.supervised import build_scheduler


class PPOTrainer(LoopStage):
    """PPO on the roles of one base (policy, reference, value, and the reward when it is an adapter).

    The rollout is rollout.py's RolloutMaker and the update step.py's PPOUpdate, both on one set of
    ForwardPasses; this class builds them from the config, runs a step as the one then the other
    (ppo_step), and supplies the loop's hooks (a checkpoint holds the trainable parameters of every role,
    value head included).
    """

    def __init__(
        self,
        run: StageRun,
        roles: Roles,
        tokenizer,
        prompts: list[dict],
        reward,
        eos_ids: list[int],
        rm_stats: tuple[float, float] | None,
        vllm: VLLMRollouts | None = None,
    ):
        self.run, self.roles, self.tokenizer = run, roles, tokenizer
        # generation.engine=vllm: vLLM draws the rollouts' tokens; None: the policy's generate does.
        self.vllm = vllm
        self.cfg: DictConfig = run.cfg
        self.ppo_cfg, self.train_cfg, self.gen_cfg = self.cfg.ppo, self.cfg.train, self.cfg.generation
        self.prompts, self.reward, self.eos_ids = prompts, reward, eos_ids
        self.device = run.device
        world = run.dist.world_size
        # train.batch_size is per rank, like SFT/RM's (TRL's per_device_train_batch_size); every rank
        # rolls out its own prompts from one shared global order.
        self.estimation = resolve_estimation(self.ppo_cfg, self.gen_cfg)
        # A rollout holds samples_per_prompt responses to each of the rank's train.batch_size prompts, each
        # prompt's in consecutive rows (a group never spans ranks or is split before its advantages).
        self.group_size = self.estimation.group_size
        self.local_batch = self.train_cfg.batch_size * self.group_size
        settings = UpdateSettings.from_config(self.cfg, self.estimation, self.local_batch)
        # When the whole rollout batch is one micro-batch, the first update pass runs on the unchanged
        # policy and value weights over every row: its logprobs and values ARE the old ones. Taking
        # them from there (detached) saves two of the four scoring passes and makes detail 15 exact by
        # construction. With several micro-batches the old values must exist for every row before
        # the first loss (advantages are whitened over the batch), so they get their own pass.
        fuse_first_pass = settings.micro == self.local_batch
        # Every rollout batch is full (pad_last), so every rank runs the same minibatches and collectives.
        self.batches = EpochBatches(
            len(prompts), self.train_cfg.batch_size * world, self.train_cfg.seed, pad_last=True
        )
        self.policy_params = roles.policy_parameters()
        self.value_params = roles.value_parameters()
        broadcast_parameters(self.policy_params + self.value_params, run.dist)
        value_lr = self.ppo_cfg.value_lr if self.ppo_cfg.value_lr is not None else self.train_cfg.lr
        groups = [{"params": self.policy_params, "lr": self.train_cfg.lr}]
        if self.value_params:  # no critic: no value group
            groups.append({"params": self.value_params, "lr": value_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.train_cfg.weight_decay, eps=1e-5)
        self.total_steps = int(self.train_cfg.max_steps)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg, self.total_steps)
        self.kl_ctl = (
            rlhf.AdaptiveKLController(self.ppo_cfg.kl_coef, self.ppo_cfg.kl_target, self.kl_horizon())
            if self.ppo_cfg.kl_controller == "adaptive"
            else rlhf.FixedKLController(self.ppo_cfg.kl_coef)
        )
        self.scale = RewardScale(self.ppo_cfg.reward_normalization, rm_stats)
        self.critic_on_scale = False
        self.put_critic_on_scale()  # rm_stats: the scale is known already
        self.scale_announced = False
        self.episode = 0  # prompts rolled out so far, over all ranks
        self.watch = PPOGuards(
            self.gen_cfg.max_new_tokens,
            self.ppo_cfg.kl_warn,
            eos_knob(self.ppo_cfg.missing_eos_penalty, self.ppo_cfg.missing_eos_score),
        )
        self.base_dtype = roles.model.get_input_embeddings().weight.dtype
        if autocast_dtype(self.device, self.train_cfg.mixed_precision) is not None:
            # Under autocast every matmul casts its own operands; peft's cast of each LoRA input to the
            # adapter's fp32 dtype would only add two full-size copies per LoRA layer and pass.
            roles.keep_lora_input_dtype()
        # Pure sampling at temperature T: no top-k/top-p/repetition tricks (neither ours nor the
        # model's generation_config.json), whose logprobs the scoring passes could not reproduce.
        # The pad token is never sampled: policy_logprobs gives it no probability either.
        self.generation_config = sampling.sampling_config(
            self.gen_cfg.max_new_tokens,
            self.gen_cfg.temperature,
            tokenizer.pad_token_id,
            eos_ids,
            suppress_pad=True,
        )
        self.passes = ForwardPasses(
            roles,
            tokenizer.pad_token_id,
            self.gen_cfg.temperature,
            self.device,
            self.train_cfg.mixed_precision,
        )
        rollout_settings = RolloutSettings(
            micro=settings.micro,
            fuse_first_pass=fuse_first_pass,
            critic=self.estimation.critic,
            score_clip=self.ppo_cfg.score_clip,
            missing_eos_penalty=self.ppo_cfg.missing_eos_penalty,
            missing_eos_score=self.ppo_cfg.missing_eos_score,
            overlong_penalty=self.ppo_cfg.overlong_penalty,
            overlong_buffer=overlong_buffer(self.ppo_cfg, self.gen_cfg.max_new_tokens),
            max_new_tokens=self.gen_cfg.max_new_tokens,
        )
        self.rollouts = RolloutMaker(
            rollout_settings,
            self.passes,
            roles,
            tokenizer,
            self.generation_config,
            reward,
            self.scale,
            eos_ids,
            run.dist,
            after_scoring=self.after_scoring,
            vllm=vllm,
        )
        self.updater = PPOUpdate(
            settings,
            self.passes,
            roles,
            self.optimizer,
            self.policy_params + self.value_params,
            self.kl_ctl,
            run,
        )
        # The last step's rollout (for the sample tables) and all-reduced metrics (for the log).
        self.last_rollout: Rollout | None = None
        self.last_metrics: dict[str, float] = {}
        state = LoopState(roles, self.optimizer, self.scheduler, self.batches)
        self.loop = TrainingLoop(run, state, self.total_steps, self)

    # -- the step: the rollout, then the update ---------------------------------------------------
    def ppo_step(self, batch_prompts: list[dict]) -> tuple[Rollout, dict[str, float]]:
        """Steps 2-8 on this rank's prompts: the rollout and the step's metrics (mean over ranks)."""
        step_start = time.perf_counter()
        ro, timings = self.rollout(batch_prompts)  # 2-5: generate, truncate, score, reference
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's updates use
        kl_coef = self.kl_ctl.value  # the beta this step's rewards use
        ro, update_stats, non_score = self.update(ro)  # 4-7: old logprobs/values, advantages, epochs
        self.scheduler.step()
        timings["time/train"] = time.perf_counter() - start
        timings["time/step"] = time.perf_counter() - step_start
        timings["memory/peak_mb"] = peak_memory_mb(self.device)
        correction = (str(self.ppo_cfg.sampler_correction), float(self.ppo_cfg.sampler_correction_cap))
        metrics = {**step_metrics(ro, non_score, self.eos_ids, timings, *correction), **update_stats}
        metrics = all_reduce_mean(metrics, self.run.dist)
        # 8: the KL controller sees the batch-mean KL; n_steps counts episodes, as in Ziegler et al.
        self.kl_ctl.update(metrics["objective/kl"], self.episodes_per_step)
        metrics.update({"objective/kl_coef": kl_coef, "lr": lr})
        return ro, metrics

    def rollout(self, batch_prompts: list[dict]) -> tuple[Rollout, dict[str, float]]:
        """Steps 2-5 (RolloutMaker.rollout), from the policy after the steps taken so far."""
        return self.rollouts.rollout(batch_prompts, self.step)

    def generate(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, ...]:
        return self.rollouts.generate(prompt_ids, self.step)

    def update(self, ro: Rollout) -> tuple[Rollout, dict[str, float], torch.Tensor]:
        """Steps 4-7 (PPOUpdate.update) as the next step's."""
        return self.updater.update(ro, self.step + 1)

    @property
    def policy_logprobs(self):
        """The scoring passes' policy_logprobs (to wrap one for a test, patch `trainer.passes`)."""
        return self.passes.policy_logprobs

    @property
    def minibatch(self) -> int:
        return self.updater.settings.minibatch

    @property
    def micro(self) -> int:
        return self.updater.settings.micro

    @micro.setter
    def micro(self, rows: int) -> None:
        """Another micro-batch size, for the rollout's scoring passes and the update alike (tests)."""
        self.updater.settings = dataclasses.replace(self.updater.settings, micro=rows)
        self.rollouts.settings = dataclasses.replace(self.rollouts.settings, micro=rows)

    @property
    def fuse_first_pass(self) -> bool:
        return self.rollouts.settings.fuse_first_pass

    @fuse_first_pass.setter
    def fuse_first_pass(self, fuse: bool) -> None:
        self.rollouts.settings = dataclasses.replace(self.rollouts.settings, fuse_first_pass=fuse)

    def after_scoring(self) -> None:
        """Once a batch is scored: the first may have fixed the scale, which the critic is put on."""
        self.put_critic_on_scale()
        self.announce_scale()

    def put_critic_on_scale(self) -> None:
        """Once the score scale is fixed, rescale a critic copied from the RM head to it, once.

        Its copy of the RM head predicts raw scores, while the returns it learns are built from the
        normalised ones: left there, value clipping would take ~|mean| / clip_range_value rollouts to
        close the gap, and meanwhile GAE would push the tokens near EOS for or against stopping by the
        sign of the RM's mean. Per-batch whitening has no fixed scale, and without normalisation the
        raw scale is PPO's.
        """
        stats = self.scale.fixed_stats()
        if self.critic_on_scale or stats is None:
            return
        if self.roles.value_head is not None and self.roles.value_head_from_reward:
            self.roles.put_value_head_on_scale(*stats)
        self.critic_on_scale = True

    def kl_horizon(self) -> float:
        """The adaptive controller's horizon in episodes: ppo.kl_horizon, or a tenth of the run's."""
        if self.ppo_cfg.kl_horizon is not None:
            return float(self.ppo_cfg.kl_horizon)
        return rlhf.run_kl_horizon(self.total_steps * self.episodes_per_step, self.episodes_per_step)

    @property
    def episodes_per_step(self) -> int:
        """Responses sampled per step over all ranks (each is an episode)."""
        return self.local_batch * self.run.dist.world_size

    # -- the loop's hooks ------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.loop.step

    def fit(self) -> dict[str, float]:
        """Run the loop; the last step's metrics."""
        self.loop.fit(self.summary(), self.base_dtype)
        return self.last_metrics

    def start(self) -> None:
        self.roles.eval()

    def train_step(self, step: int) -> None:
        """One rollout + update on this rank's slice of the next batch, then the guards."""
        rank, world = self.run.dist.rank, self.run.dist.world_size
        indices = self.batches.next()[rank::world]
        ro, metrics = self.ppo_step([self.prompts[i] for i in indices for _ in range(self.group_size)])
        self.episode += self.episodes_per_step
        metrics["episode"] = self.episode
        self.guards(step, metrics, self.batch_signs(ro))
        self.last_rollout, self.last_metrics = ro, metrics

    def log_metrics(self, step: int) -> dict[str, float]:
        return self.last_metrics

    def after_step(self, step: int) -> None:
        every = self.cfg.sample_every
        if every > 0 and (step % every == 0 or step == 1):
            self.show_samples(self.last_rollout, step)

    def extra_state(self) -> dict[str, Any]:
        return {
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_scale": self.scale.state_dict(),
            "guards": self.watch.state_dict(),
            "episode": self.episode,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        # Beta only: the adaptive controller keeps the target and horizon built for this run (kl_horizon()
        # of its length, which a resume may have extended; the start-up panel shows the same).
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.scale.load_state_dict(state["reward_scale"])
        self.watch.load_state_dict(state.get("guards", {}))
        # Every checkpoint follows a rollout, and the rollout that fixed the scale also rescaled the
        # critic: the restored value head is on the scale already, and must not be rescaled again.
        self.critic_on_scale = self.scale.fixed_stats() is not None
        self.episode = int(state["episode"])

    # -- guards and console ---------------------------------------------------------------------
    def batch_signs(self, ro: Rollout) -> BatchSigns:
        """What the guards read from a rollout besides the step's metrics (this rank's batch)."""
        lengths = ro.response_mask.sum(1)
        kl = rlhf.masked_sum(ro.logprobs - ro.ref_logprobs, ro.response_mask, dim=1)
        eos = rlhf.has_eos(ro.responses, ro.response_mask, self.eos_ids)
        return BatchSigns(
            kl_per_sequence=kl.tolist(),
            completions=ro.completions,
            eos_share=float(eos.float().mean()),
            capped_share=float((lengths >= self.gen_cfg.max_new_tokens).float().mean()),
        )

    def guards(self, step: int, metrics: dict[str, float], signs: BatchSigns) -> None:
        for message in self.watch.check(step, metrics, signs):
            self.run.logger.warn(message)
        # engine=vllm on a quantized training base: vLLM samples another policy than PPO trains (said once).
        if self.vllm is not None and (message := self.vllm.gap_warning(step, metrics)):
            self.run.logger.warn(message)

    def show_samples(self, ro: Rollout, step: int, n: int = 4) -> None:
        rows = [
            [ro.prompts[i], ro.completions[i], float(ro.raw_scores[i])]
            for i in range(min(n, len(ro.prompts)))
        ]
        self.run.logger.table(f"samples at step {step}", ["prompt", "completion", "score"], rows, step=step)

    def summary(self) -> dict[str, str]:
        return {
            "rollout": f"{self.train_cfg.batch_size} prompts x {self.group_size} samples x "
            f"{self.gen_cfg.max_new_tokens} new tokens, T={self.gen_cfg.temperature}, sampled by "
            + ("vLLM (the policy adapter synced every step)" if self.vllm else "transformers' generate"),
            "advantages": describe_estimation(self.estimation),
            "ppo": f"{self.ppo_cfg.epochs} epochs x {self.ppo_cfg.num_minibatches} minibatches",
            "kl penalty": describe_kl_penalty(self.ppo_cfg, self.kl_horizon(), self.estimation),
            "reward scale": describe_reward_scale(self.ppo_cfg),
            "device": str(self.device),
        }

    def announce_scale(self) -> None:
        """Once the scale is fixed, say once what beta weighs in the reward source's own units."""
        stats = self.scale.fixed_stats()
        if self.scale_announced or stats is None:
            return
        self.scale_announced = True
        mean, std = stats
        beta = self.kl_ctl.value
        self.run.logger.print(
            f"reward scale ({self.ppo_cfg.reward_normalization}): mean {mean:.4g}, std {std:.4g}; beta "
            f"{beta:.4g} per nat on this scale is TRL's kl_coef={beta * std:.3g} on the raw scores."
        )

    def beta_summary(self, beta: float | None = None) -> dict[str, float]:
        """beta (the controller's now, or `beta`) in the reward source's raw units, when the scores PPO
        uses are divided by a std; empty when beta is in raw units already or has no fixed scale."""
        stats = self.scale.fixed_stats()
        if stats is None or self.ppo_cfg.reward_normalization == "sft_mean":
            return {}
        return {"kl_coef in raw score units": (self.kl_ctl.value if beta is None else beta) * stats[1]}


SCALE_UNITS = {
    "sft_samples": "scores / std of the SFT policy's scores (first batch): beta per std of score per nat",
    "sft_mean": "scores - mean of the SFT policy's scores (first batch): beta in raw units, TRL's kl_coef",
    "rm_stats": "scores / std of the RM's training scores: beta per std of score per nat",
    "whiten": "scores whitened per batch: beta per batch std per nat",
    "none": "raw scores: beta in raw units, TRL's kl_coef",
}


def describe_estimation(est: Estimation) -> str:
    """One line for the run's panel: the estimator, its baseline and the loss's aggregation."""
    baseline = {
        "gae": "GAE with a critic (value adapter and head)",
        "grpo": f"GRPO: group mean{' / group std' if est.norm_adv_by_std else ''} baseline, no critic",
        "rloo": "RLOO: leave-one-out baseline, no critic",
        "reinforce_plus_plus": "REINFORCE++: reward-to-go, no critic",
    }[est.estimator]
    whiten = "whitened" if est.whiten else "not whitened"
    return f"{baseline}; {whiten}; loss {est.loss_aggregation}"


def describe_kl_penalty(ppo: DictConfig, horizon: float, est: Estimation | None = None) -> str:
    """One line for the run's panel: beta, where the KL goes, and how beta moves."""
    where = "" if est is None else f" ({est.kl_estimator} in the {est.kl_in})"
    if ppo.kl_controller == "fixed":
        return f"beta {ppo.kl_coef:g}{where}, fixed"
    return (
        f"beta {ppo.kl_coef:g}{where} at the start, adaptive: target {ppo.kl_target:g} nats per response, "
        f"horizon {horizon:g} episodes"
    )


def describe_reward_scale(ppo: DictConfig) -> str:
    """One line for the run's panel: the units of the scores (and of beta), and the missing-EOS rule."""
    if ppo.missing_eos_penalty is not None:
        eos = f"a response without EOS loses {ppo.missing_eos_penalty:g}"
    elif ppo.missing_eos_score is not None:
        eos = f"a response without EOS scores {ppo.missing_eos_score:g}"
    else:
        eos = "no missing-EOS penalty"
    return f"{ppo.reward_normalization}: {SCALE_UNITS[ppo.reward_normalization]}; {eos}"
