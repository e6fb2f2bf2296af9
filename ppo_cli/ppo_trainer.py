"""The PPO loop: rollout -> score -> advantages -> several epochs of clipped updates -> KL control.

One step; "detail N" is the numbered implementation detail of docs/ppo-details.md:
  1. sample train.batch_size prompts (data order shared by all ranks, each rank takes its slice);
  2. generate with the policy adapter, KV cache, temperature T, no top-k/top-p (detail 8);
  3. truncate after the first EOS, keep it, pad the rest (detail 3);
  4. reference logprobs and scores; old logprobs (policy) and values in micro-batches of the same
     size as the update's, so the first update sees exactly the same numbers (detail 15) — or, when an
     update is a single micro-batch, taken from the first update pass itself (`fuse_first_pass`);
  5. missing-EOS penalty (detail 5), scores on a fixed scale (detail 17; a critic copied from the RM is
     put on it once it is fixed), per-token KL penalty with the score at the last real token (details 4, 6);
  6. GAE with gamma, lambda; returns before whitening; advantages whitened over real tokens (11, 12);
  7. ppo.epochs epochs over reshuffled minibatches: clipped policy loss + vf_coef * clipped value
     loss (13, 14);
  8. KL controller update (detail 7), metrics with TRL's names, checkpoint.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ppo_cli import checkpoint as ckpt
from ppo_cli import rlhf, sampling
from ppo_cli.data import EpochBatches, pad_left
from ppo_cli.dist import (
    all_gather_cat,
    all_reduce_mean,
    all_reduce_sum,
    any_flag,
    average_gradients,
    broadcast_parameters,
)
from ppo_cli.errors import UserError
from ppo_cli.guards import BatchSigns, PPOGuards
from ppo_cli.models import attention_kernel, autocast, autocast_dtype
from ppo_cli.roles import POLICY, REFERENCE, Roles
from ppo_cli.run import StageRun
from ppo_cli.trainer import build_scheduler, check_finite, optimizer_step


@dataclass
class Rollout:
    """One rollout batch on this rank. Shapes: B rows, P prompt tokens (left-padded), R response tokens."""

    query_responses: torch.Tensor  # (B, P+R) prompt + response ids, pads after EOS
    attention_mask: torch.Tensor  # (B, P+R)
    responses: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) bool: real response tokens, up to and including EOS
    # (B, R) policy logprobs at sampling time ("old") and values; None until the first update pass
    # fills them in (fuse_first_pass).
    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor | None
    raw_scores: torch.Tensor  # (B,) the reward source's own scores
    scores: torch.Tensor  # (B,) on the fixed scale used in the rewards, missing-EOS penalty included
    prompts: list[str]
    completions: list[str]


class RewardScale:
    """Puts scores on a fixed scale before the KL trade-off (docs/ppo-details.md, detail 17).

    sft_samples: mean/std of the scores of the first rollout batch (the policy is still the SFT policy
    then), fixed for the whole run; rm_stats: the RM's stored mean/std; whiten: per batch; none.
    """

    def __init__(self, mode: str, rm_stats: tuple[float, float] | None):
        self.mode = mode
        self.mean, self.std = rm_stats if mode == "rm_stats" and rm_stats else (None, None)

    def __call__(self, scores: torch.Tensor, dist_info) -> torch.Tensor:
        if self.mode == "none":
            return scores
        if self.mode == "whiten":
            mean, std = _global_mean_std(scores, dist_info)
            return (scores - mean) / (std + 1e-8)
        if self.mean is None:  # sft_samples or sft_mean, first batch
            self.mean, self.std = _global_mean_std(scores, dist_info)
            if self.mode == "sft_mean":
                self.std = 1.0
        return rlhf.normalize_scores(scores, self.mean, self.std)

    def fixed_stats(self) -> tuple[float, float] | None:
        """(mean, std) once they are fixed for the run (rm_stats from the start, sft_samples after the
        first batch); None while unknown, and for per-batch whitening or no normalisation."""
        if self.mode in ("sft_samples", "sft_mean", "rm_stats") and self.mean is not None:
            return self.mean, self.std
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = state["mean"], state["std"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _global_mean_std(values: torch.Tensor, dist_info) -> tuple[float, float]:
    values = all_gather_cat(values.double(), dist_info)
    std = float(values.std()) if values.numel() > 1 else 1.0
    return float(values.mean()), (std if std > 1e-6 else 1.0)


class PPOTrainer:
    def __init__(
        self,
        run: StageRun,
        roles: Roles,
        tokenizer,
        prompts: list[dict],
        reward,
        eos_ids: list[int],
        rm_stats: tuple[float, float] | None,
    ):
        self.run, self.roles, self.tokenizer = run, roles, tokenizer
        self.cfg: DictConfig = run.cfg
        self.ppo_cfg, self.train_cfg, self.gen_cfg = self.cfg.ppo, self.cfg.train, self.cfg.generation
        self.prompts, self.reward, self.eos_ids = prompts, reward, eos_ids
        self.device = run.device
        world = run.dist.world_size
        # train.batch_size is per rank, like SFT/RM's (TRL's per_device_train_batch_size); every rank
        # rolls out its own prompts from one shared global order.
        self.local_batch = self.train_cfg.batch_size
        self.minibatch = self.local_batch // self.ppo_cfg.num_minibatches
        self.micro = self.minibatch // self.train_cfg.grad_accum_steps
        # When the whole rollout batch is one micro-batch, the first update pass runs on the unchanged
        # policy and value weights over every row: its logprobs and values ARE the old ones. Taking
        # them from there (detached) saves two of the four scoring passes and makes detail 15 exact by
        # construction. With several micro-batches the old values must exist for every row before
        # the first loss (advantages are whitened over the batch), so they get their own pass.
        self.fuse_first_pass = self.micro == self.local_batch
        # Every rollout batch is full (pad_last), so every rank runs the same minibatches and collectives.
        self.batches = EpochBatches(
            len(prompts), self.train_cfg.batch_size * world, self.train_cfg.seed, pad_last=True
        )
        self.policy_params = roles.policy_parameters()
        self.value_params = roles.value_parameters()
        broadcast_parameters(self.policy_params + self.value_params, run.dist)
        value_lr = self.ppo_cfg.value_lr if self.ppo_cfg.value_lr is not None else self.train_cfg.lr
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.policy_params, "lr": self.train_cfg.lr},
                {"params": self.value_params, "lr": value_lr},
            ],
            weight_decay=self.train_cfg.weight_decay,
            eps=1e-5,
        )
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
        self.step = 0
        self.watch = PPOGuards(self.gen_cfg.max_new_tokens, self.ppo_cfg.kl_warn)
        self._pad_index = torch.tensor([tokenizer.pad_token_id])
        self.base_dtype = roles.model.get_input_embeddings().weight.dtype
        if autocast_dtype(self.device, self.train_cfg.mixed_precision) is not None:
            # Under autocast every matmul casts its own operands; peft's cast of each LoRA input to the
            # adapter's fp32 dtype would only add two full-size copies per LoRA layer and pass.
            roles.keep_lora_input_dtype()
        self.generation_config = self._generation_config()

    def kl_horizon(self) -> float:
        """The adaptive controller's horizon in episodes: ppo.kl_horizon, or a tenth of the run's."""
        if self.ppo_cfg.kl_horizon is not None:
            return float(self.ppo_cfg.kl_horizon)
        per_step = self.train_cfg.batch_size * self.run.dist.world_size
        return rlhf.run_kl_horizon(self.total_steps * per_step, per_step)

    # -- generation -----------------------------------------------------------------------------
    def _generation_config(self):
        # Pure sampling at temperature T: no top-k/top-p/repetition tricks (neither ours nor the
        # model's generation_config.json), whose logprobs the scoring passes could not reproduce.
        # The pad token is never sampled: policy_logprobs gives it no probability either.
        return sampling.sampling_config(
            self.gen_cfg.max_new_tokens,
            self.gen_cfg.temperature,
            self.tokenizer.pad_token_id,
            self.eos_ids,
            suppress_pad=True,
        )

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, ...]:
        pad = self.tokenizer.pad_token_id
        input_ids = pad_left(prompt_ids, pad).to(self.device)
        prompt_mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(self.device)
        self.roles.eval()
        with self.roles.role(POLICY), self.precision():
            out = sampling.generate(
                self.roles.model, self.generation_config, input_ids=input_ids, attention_mask=prompt_mask
            )
        responses = out[:, input_ids.shape[1] :]
        responses, response_mask = rlhf.truncate_after_eos(responses, self.eos_ids, pad)
        return input_ids, prompt_mask, responses, response_mask

    # -- scoring passes -------------------------------------------------------------------------
    def precision(self):
        """Mixed precision for one pass (models.autocast); bf16 on CPUs and GPUs that do it natively."""
        return autocast(self.device, self.train_cfg.mixed_precision)

    def policy_logprobs(
        self,
        qr: torch.Tensor,
        mask: torch.Tensor,
        responses: torch.Tensor,
        role: str,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logprobs of `responses` under `role`; the one code path for old, new and reference (detail 15).

        with_entropy: also (no gradient) the entropy of the sampling distribution softmax(logits / T) at
        each response position, from the same logits (B, R).
        """
        with self.roles.role(role), self.precision():
            logits = self.roles.response_logits(qr, mask, responses.shape[1])
        # The pad token is never sampled (suppressed in generation), so it has no probability here either.
        logits = logits.index_fill(-1, self._pad_index.to(logits.device), float("-inf"))
        temperature = self.gen_cfg.temperature
        logprobs = rlhf.logprobs_from_logits(logits, responses, temperature)
        if not with_entropy:
            return logprobs
        with torch.no_grad():  # row by row: the (R, V) float32 temporaries of one row at a time
            entropy = torch.stack([rlhf.entropy_from_logits(row, temperature) for row in logits.detach()])
        return logprobs, entropy

    def value_estimates(self, qr: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        with self.precision():
            return self.roles.values(qr, mask, length).float()

    @torch.no_grad()
    def rollout(self, batch_prompts: list[dict]) -> tuple[Rollout, dict[str, float]]:
        timings = {}
        start = time.perf_counter()
        prompt_ids, prompt_mask, responses, response_mask = self.generate(
            [p["input_ids"] for p in batch_prompts]
        )
        timings["time/generate"] = time.perf_counter() - start

        start = time.perf_counter()
        qr = torch.cat([prompt_ids, responses], dim=1)
        mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
        length = responses.shape[1]
        prompts = [p["prompt"] for p in batch_prompts]
        completions = self.tokenizer.batch_decode(
            responses.masked_fill(~response_mask, self.tokenizer.pad_token_id), skip_special_tokens=True
        )
        originals = [p["original"] for p in batch_prompts]  # conversations stay conversations for an RM
        with self.precision():
            raw = self.reward(qr, mask, originals, completions).to(self.device).float()
        scores = self.scale(raw, self.run.dist)
        if self.ppo_cfg.score_clip is not None:
            scores = scores.clamp(-self.ppo_cfg.score_clip, self.ppo_cfg.score_clip)
        # A response that never stopped: its score is replaced (missing_eos_score) or, when
        # missing_eos_penalty is set, lowered (TRL's rule). Both are in the units of the scores PPO uses
        # (std of the SFT samples' scores when normalised), so a value means the same against any reward
        # source; the scale is fixed on the source's own scores, and no clip takes the penalty back.
        eos_present = rlhf.has_eos(responses, response_mask, self.eos_ids)
        if self.ppo_cfg.missing_eos_penalty is not None:
            scores = rlhf.apply_missing_eos_penalty(scores, eos_present, self.ppo_cfg.missing_eos_penalty)
        else:
            scores = rlhf.replace_missing_eos_score(scores, eos_present, self.ppo_cfg.missing_eos_score)
        # Scored first: the first batch may fix the scale, and the critic's values are read after it
        # has been put on that scale.
        self.put_critic_on_scale()
        self.announce_scale()
        logprobs, ref_logprobs, values = [], [], []
        for s in range(0, qr.shape[0], self.micro):
            chunk = slice(s, s + self.micro)
            ref_logprobs.append(self.policy_logprobs(qr[chunk], mask[chunk], responses[chunk], REFERENCE))
            if not self.fuse_first_pass:
                logprobs.append(self.policy_logprobs(qr[chunk], mask[chunk], responses[chunk], POLICY))
                values.append(self.value_estimates(qr[chunk], mask[chunk], length))
        timings["time/score"] = time.perf_counter() - start
        rollout = Rollout(
            qr,
            mask,
            responses,
            response_mask,
            torch.cat(logprobs) if logprobs else None,
            torch.cat(ref_logprobs),
            torch.cat(values) if values else None,
            raw,
            scores,
            prompts,
            completions,
        )
        return rollout, timings

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
        if self.roles.value_head_from_reward:
            self.roles.put_value_head_on_scale(*stats)
        self.critic_on_scale = True

    # -- one PPO step ---------------------------------------------------------------------------
    def advantages(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rewards, non_score = rlhf.shape_rewards(
            ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, self.kl_ctl.value
        )
        adv, returns = rlhf.gae(rewards, ro.values, ro.response_mask, self.ppo_cfg.gamma, self.ppo_cfg.lam)
        if self.ppo_cfg.whiten_advantages:
            adv = self._whiten_global(adv, ro.response_mask)
        return rewards, non_score, adv, returns

    def _whiten_global(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.run.dist.enabled:
            return rlhf.masked_whiten(adv, mask)
        # Whiten with statistics over all ranks' tokens, so every rank scales advantages alike.
        m = mask.bool()
        real = adv[m].double()
        stats = all_reduce_sum(torch.stack([real.sum(), (real**2).sum(), m.sum().double()]), self.run.dist)
        n = stats[2].clamp(min=2)
        mean = stats[0] / n
        var = (stats[1] / n - mean**2) * n / (n - 1)
        return torch.where(m, (adv - mean.float()) * torch.rsqrt(var.float() + 1e-8), torch.zeros_like(adv))

    def _sync_grads(self) -> None:
        average_gradients(self.policy_params + self.value_params, self.run.dist)

    def forward_micro(
        self, ro: Rollout, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy logprobs and values of rows `idx`, with gradients (one update micro-batch), and the
        policy's entropy at each response position (no gradient; for policy/entropy_avg)."""
        qr, mask = ro.query_responses[idx], ro.attention_mask[idx]
        new_lp, entropy = self.policy_logprobs(qr, mask, ro.responses[idx], POLICY, with_entropy=True)
        return new_lp, self.value_estimates(qr, mask, ro.responses.shape[1]), entropy

    def update(self, ro: Rollout) -> tuple[dict[str, float], torch.Tensor]:
        """Advantages, then ppo.epochs of clipped updates. Returns (stats, per-token non-score reward).

        A rollout without old logprobs/values (fuse_first_pass) gets them from the first update pass.
        """
        stats: dict[str, list[float]] = defaultdict(list)
        B = ro.responses.shape[0]
        self.roles.train(self.cfg.model.gradient_checkpointing)  # dropout is off either way (detail 9)
        first = None
        if ro.logprobs is None:
            order = torch.randperm(B)  # epoch 0's order, drawn where the epoch loop would draw it
            new_lp, vpred, entropy = self.forward_micro(ro, order)
            ro.logprobs = torch.empty_like(new_lp).index_copy_(0, order, new_lp.detach())
            ro.values = torch.empty_like(vpred).index_copy_(0, order, vpred.detach())
            first = (order, new_lp, vpred, entropy)
        _, non_score, adv, returns = self.advantages(ro)
        for _epoch in range(self.ppo_cfg.epochs):
            # Reshuffled every epoch (detail 14); the torch RNG is checkpointed.
            order = first[0] if first is not None else torch.randperm(B)
            for mb_start in range(0, B, self.minibatch):
                mb = order[mb_start : mb_start + self.minibatch]
                for mi_start in range(0, len(mb), self.micro):
                    idx = mb[mi_start : mi_start + self.micro]
                    if first is not None:  # epoch 0's one micro-batch: already forwarded
                        _, new_lp, vpred, entropy = first
                        first = None
                    else:
                        new_lp, vpred, entropy = self.forward_micro(ro, idx)
                    pg = rlhf.policy_loss(
                        new_lp, ro.logprobs[idx], adv[idx], ro.response_mask[idx], self.ppo_cfg.clip_range
                    )
                    vf = rlhf.value_loss(
                        vpred,
                        ro.values[idx],
                        returns[idx],
                        ro.response_mask[idx],
                        self.ppo_cfg.clip_range_value,
                    )
                    loss = pg["loss"] + self.ppo_cfg.vf_coef * vf["loss"]
                    check_finite(loss.detach(), "the PPO loss", self.step + 1, self.run)
                    (loss * len(idx) / len(mb)).backward()
                    for key, value in (
                        ("policy/approxkl_avg", pg["approxkl"]),
                        ("policy/clipfrac_avg", pg["clipfrac"]),
                        ("loss/policy_avg", pg["loss"]),
                        ("loss/value_avg", vf["loss"]),
                        ("val/clipfrac_avg", vf["clipfrac"]),
                        ("val/ratio", pg["ratio"]),
                    ):
                        stats[key].append(float(value.detach()))
                    entropy_avg = rlhf.masked_mean(entropy, ro.response_mask[idx])
                    stats["policy/entropy_avg"].append(float(entropy_avg))
                self._sync_grads()
                if self.train_cfg.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(
                        self.policy_params + self.value_params, self.train_cfg.max_grad_norm
                    )
                    check_finite(norm, "the gradient norm", self.step + 1, self.run)
                optimizer_step(self.optimizer, self.step + 1, self.run)
                self.optimizer.zero_grad(set_to_none=True)
        self.roles.eval()
        result = {k: sum(v) / len(v) for k, v in stats.items()}
        # The very first minibatch, before any update: ratio must be exactly 1 there (detail 15).
        result["policy/first_ratio"] = stats["val/ratio"][0]
        return result, non_score

    def step_metrics(
        self, ro: Rollout, non_score: torch.Tensor, timings: dict[str, float]
    ) -> dict[str, float]:
        mask = ro.response_mask
        # k1 per sequence: TRL's objective/kl
        kl = rlhf.masked_sum(ro.logprobs - ro.ref_logprobs, mask, dim=1)
        non_score_total = rlhf.masked_sum(non_score, mask, dim=1)
        eos_count = sum(int((ro.responses == e).logical_and(mask).sum()) for e in self.eos_ids)
        metrics = {
            "objective/kl": float(kl.mean()),
            "objective/entropy": float(rlhf.masked_sum(-ro.logprobs, mask, dim=1).mean()),
            "objective/non_score_reward": float(non_score_total.mean()),
            "objective/rlhf_reward": float((ro.scores + non_score_total).mean()),
            "objective/scores": float(ro.raw_scores.mean()),
            "objective/scores_normalized": float(ro.scores.mean()),
            "val/num_eos_tokens": float(eos_count),
            "val/mean_response_length": float(mask.sum(1).float().mean()),
            **timings,
        }
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, episode: int) -> None:
        rng, rng_tensors = ckpt.split_rng(ckpt.capture_rng())
        objects = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **rng_tensors,
        }
        state = {
            "data": self.batches.state_dict(),
            "rng": rng,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_scale": self.scale.state_dict(),
            "guards": self.watch.state_dict(),
            "episode": episode,
        }
        self.run.save_checkpoint(self.step, ckpt.trainable_state(self.roles), objects, state)

    def restore(self) -> int:
        loaded = ckpt.load_checkpoint(self.run.resume_from)
        ckpt.load_trainable_state(self.roles, loaded.trainable, str(loaded.path))
        self.optimizer.load_state_dict(loaded.objects["optimizer"])
        self.scheduler.load_state_dict(loaded.objects["scheduler"])
        self.batches.load_state_dict(loaded.state["data"])
        self.kl_ctl.load_state_dict(loaded.state["kl_controller"])
        self.scale.load_state_dict(loaded.state["reward_scale"])
        self.watch.load_state_dict(loaded.state.get("guards", {}))
        # Every checkpoint follows a rollout, and the rollout that fixed the scale also rescaled the
        # critic: the restored value head is on the scale already, and must not be rescaled again.
        self.critic_on_scale = self.scale.fixed_stats() is not None
        ckpt.restore_rng(ckpt.join_rng(loaded.state["rng"], loaded.objects))
        self.step = loaded.step
        return int(loaded.state["episode"])

    # -- guards ---------------------------------------------------------------------------------
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

    def guards(self, metrics: dict[str, float], signs: BatchSigns) -> None:
        for message in self.watch.check(self.step, metrics, signs):
            self.run.logger.warn(message)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        run, logger = self.run, self.run.logger
        episode = 0
        if run.resume_from is not None:
            episode = self.restore()
        else:
            ckpt.seed_everything(run.seed)
        logger.start(self.total_steps, self.step, self.summary())
        rank, world = run.dist.rank, run.dist.world_size
        metrics: dict[str, float] = {}
        self.roles.eval()
        kernel = attention_kernel(self.device, self.train_cfg.mixed_precision, self.base_dtype)
        with kernel:  # for the whole loop, backward passes included: see attention_kernel
            try:
                while self.step < self.total_steps:
                    indices = self.batches.next()[rank::world]
                    batch_prompts = [self.prompts[i] for i in indices]
                    step_start = time.perf_counter()
                    ro, timings = self.rollout(batch_prompts)
                    start = time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step's updates use
                    kl_coef = self.kl_ctl.value  # the beta this step's rewards use
                    update_stats, non_score = self.update(ro)
                    self.scheduler.step()
                    timings["time/train"] = time.perf_counter() - start
                    timings["time/step"] = time.perf_counter() - step_start
                    timings["memory/peak_mb"] = peak_memory_mb(self.device)
                    self.step += 1
                    episode += self.train_cfg.batch_size * world
                    metrics = {**self.step_metrics(ro, non_score, timings), **update_stats}
                    metrics = all_reduce_mean(metrics, run.dist)
                    # KL controller sees the batch-mean KL; n_steps counts episodes, as in Ziegler et al.
                    self.kl_ctl.update(metrics["objective/kl"], self.train_cfg.batch_size * world)
                    metrics.update(
                        {
                            "objective/kl_coef": kl_coef,
                            "lr": lr,
                            "episode": episode,
                        }
                    )
                    self.guards(metrics, self.batch_signs(ro))
                    logger.advance(self.step)
                    if self.step % self.train_cfg.log_every == 0 or self.step == self.total_steps:
                        logger.log(self.step, metrics)
                    if self.cfg.sample_every > 0 and (
                        self.step % self.cfg.sample_every == 0 or self.step == 1
                    ):
                        self.show_samples(ro)
                    stop = any_flag(run.stop.requested, run.dist)
                    if (self.train_cfg.save_every > 0 and self.step % self.train_cfg.save_every == 0) or stop:
                        self.save(episode)
                    if stop:
                        logger.close_progress()
                        logger.print(f"[bold]{run.stopped_message(self.step)}[/]")
                        raise SystemExit(run.stop.exit_code)
                self.save(episode)
            finally:
                logger.close_progress()
        return metrics

    def show_samples(self, ro: Rollout, n: int = 4) -> None:
        rows = [
            [ro.prompts[i], ro.completions[i], float(ro.raw_scores[i])]
            for i in range(min(n, len(ro.prompts)))
        ]
        self.run.logger.table(
            f"samples at step {self.step}", ["prompt", "completion", "score"], rows, step=self.step
        )

    def summary(self) -> dict[str, str]:
        return {
            "rollout": f"{self.train_cfg.batch_size} prompts x {self.gen_cfg.max_new_tokens} new tokens, "
            f"T={self.gen_cfg.temperature}",
            "ppo": f"{self.ppo_cfg.epochs} epochs x {self.ppo_cfg.num_minibatches} minibatches",
            "kl penalty": describe_kl_penalty(self.ppo_cfg, self.kl_horizon()),
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


def describe_kl_penalty(ppo: DictConfig, horizon: float) -> str:
    """One line for the run's panel: beta and how it moves."""
    if ppo.kl_controller == "fixed":
        return f"beta {ppo.kl_coef:g}, fixed"
    return (
        f"beta {ppo.kl_coef:g} at the start, adaptive: target {ppo.kl_target:g} nats per response, "
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


def validate_ppo(cfg: DictConfig, world_size: int = 1) -> None:
    ppo, train = cfg.ppo, cfg.train
    if train.max_steps < 1:
        raise UserError(f"train.max_steps={train.max_steps}: train-ppo needs a positive number of steps.")
    local = train.batch_size
    if local < 1 or ppo.num_minibatches < 1 or local % ppo.num_minibatches:
        raise UserError(
            f"train.batch_size={local} must be positive and divide by ppo.num_minibatches={ppo.num_minibatches}."
        )
    if (local // ppo.num_minibatches) % train.grad_accum_steps:
        raise UserError(
            f"the minibatch ({local // ppo.num_minibatches} prompts) must divide by "
            f"train.grad_accum_steps={train.grad_accum_steps}."
        )
    if ppo.epochs < 1:
        raise UserError(f"ppo.epochs={ppo.epochs} must be at least 1.")
    if cfg.generation.max_new_tokens < 1:
        raise UserError(f"generation.max_new_tokens={cfg.generation.max_new_tokens} must be at least 1.")
    if not cfg.generation.temperature > 0 or not math.isfinite(cfg.generation.temperature):
        raise UserError(f"generation.temperature={cfg.generation.temperature} must be positive.")
    if ppo.kl_controller not in ("fixed", "adaptive"):
        raise UserError(f"ppo.kl_controller={ppo.kl_controller} is not one of fixed, adaptive.")
    horizon_ok = ppo.kl_horizon is None or ppo.kl_horizon > 0
    if ppo.kl_controller == "adaptive" and not (ppo.kl_target > 0 and horizon_ok):
        raise UserError(
            f"ppo.kl_target={ppo.kl_target} and ppo.kl_horizon={ppo.kl_horizon} must be positive (the "
            "horizon may be null: a tenth of the run's episodes)."
        )
    if ppo.reward_normalization not in ("sft_samples", "sft_mean", "rm_stats", "whiten", "none"):
        raise UserError(
            f"ppo.reward_normalization={ppo.reward_normalization} is not one of sft_samples, sft_mean, "
            "rm_stats, whiten, none."
        )
    if ppo.missing_eos_penalty is not None and ppo.missing_eos_penalty < 0:
        raise UserError(
            f"ppo.missing_eos_penalty={ppo.missing_eos_penalty} must be positive (it is subtracted)."
        )
