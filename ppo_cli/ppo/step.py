"""One PPO step, in the order of its outline ("detail N": docs/ppo-details.md):

1. sample train.batch_size prompts (data order shared by all ranks, each rank takes its slice; the loop);
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
8. KL controller update (detail 7), metrics with TRL's names (the loop checkpoints).

Steps 2-5 are rollout.py's RolloutMaker; the rest of 4 and 5-7 are PPOUpdate here, 8 is `step_metrics`
here and the KL controller's update in PPOTrainer.ppo_step (trainer.py), which runs the two in turn.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ppo_cli import rlhf
from ppo_cli.dist import DistInfo, all_reduce_sum, average_gradients
from ppo_cli.ppo.estimators import Estimation, critic_free_advantages
from ppo_cli.ppo.roles import POLICY, Roles
from ppo_cli.ppo.rollout import ForwardPasses, Rollout
from ppo_cli.ppo.vllm_rollout import CAPPED_METRIC, GAP_METRIC, sampler_logprob_gap
from ppo_cli.run import StageRun
from ppo_cli.supervised import check_finite, optimizer_step

# What the first update pass computed for every row of a fused rollout, reused as epoch 0's only
# micro-batch: (order, new logprobs, values, entropy).
FirstPass = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def whiten_advantages(adv: torch.Tensor, mask: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """Advantages whitened over the real tokens of every rank's rows, so every rank scales them alike."""
    if not dist_info.enabled:
        return rlhf.masked_whiten(adv, mask)
    moments = all_reduce_sum(rlhf.masked_moments(adv, mask), dist_info)
    return rlhf.whiten_from_moments(adv, mask, moments)


def loss_mask(ro: Rollout, mask_truncated: bool) -> torch.Tensor:
    """(B, R) the tokens that carry loss: the real response tokens, less those of the truncated responses
    under ppo.mask_truncated (DAPO's overlong filtering: a response the length limit cut was judged on text
    that never ended, so its score says little about its tokens)."""
    if not mask_truncated or ro.truncated is None:
        return ro.response_mask
    return ro.response_mask & ~ro.truncated.to(ro.response_mask.device).unsqueeze(-1)


def minibatch_scales(
    mask: torch.Tensor, order: torch.Tensor, minibatch: int, dist_info: DistInfo
) -> list[rlhf.LossScale]:
    """Each minibatch's LossScale for one epoch's `order`: its real tokens summed over ranks (one
    collective for the epoch) over the world size, and its rows (every rank has as many)."""
    starts = range(0, len(order), minibatch)
    tokens = torch.stack([mask[order[s : s + minibatch]].sum() for s in starts]).double()
    tokens = all_reduce_sum(tokens, dist_info) / dist_info.world_size
    rows = [len(order[s : s + minibatch]) for s in starts]
    return [rlhf.LossScale(tokens=float(t), rows=float(r)) for t, r in zip(tokens, rows)]


@dataclass(frozen=True)
class UpdateSettings:
    """The numbers one update runs on, read once from the config (PPOUpdate)."""

    estimation: Estimation  # the advantage estimator, KL placement and loss aggregation
    epochs: int  # ppo.epochs
    minibatch: int  # rows per optimizer step: the rank's rollout rows / ppo.num_minibatches
    micro: int  # rows per forward/backward pass: minibatch / train.grad_accum_steps
    clip_range: float
    clip_range_value: float
    vf_coef: float
    gamma: float
    lam: float
    max_grad_norm: float  # 0: no clipping
    max_new_tokens: int  # generation.max_new_tokens: the constant some loss aggregations divide by
    gradient_checkpointing: bool  # model.gradient_checkpointing, in the update's train mode
    # docs/ppo-details.md, "Off-policy corrections, DAPO and GSPO": the upper clip (None: clip_range),
    # token or sequence ratios, truncated responses out of the loss, the sampler's importance weights.
    clip_range_high: float | None = None
    ratio_level: str = "token"
    mask_truncated: bool = False
    sampler_correction: str = "none"
    sampler_correction_cap: float = 2.0

    @classmethod
    def from_config(cls, cfg: DictConfig, estimation: Estimation, rows: int) -> UpdateSettings:
        """The settings of a run whose rollouts hold `rows` rows on each rank."""
        minibatch = rows // cfg.ppo.num_minibatches
        return cls(
            estimation=estimation,
            epochs=cfg.ppo.epochs,
            minibatch=minibatch,
            micro=minibatch // cfg.train.grad_accum_steps,
            clip_range=cfg.ppo.clip_range,
            clip_range_value=cfg.ppo.clip_range_value,
            vf_coef=cfg.ppo.vf_coef,
            gamma=cfg.ppo.gamma,
            lam=cfg.ppo.lam,
            max_grad_norm=cfg.train.max_grad_norm,
            max_new_tokens=cfg.generation.max_new_tokens,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            clip_range_high=cfg.ppo.clip_range_high,
            ratio_level=str(cfg.ppo.ratio_level),
            mask_truncated=bool(cfg.ppo.mask_truncated),
            sampler_correction=str(cfg.ppo.sampler_correction),
            sampler_correction_cap=float(cfg.ppo.sampler_correction_cap),
        )


class PPOUpdate:
    """Steps 4-7 on a rollout: old logprobs and values, rewards and advantages, ppo.epochs of updates.

    passes: the policy's logprobs and the critic's values (the rollout's own code path, detail 15);
    roles: switched to train mode for the update and back; optimizer: AdamW over `params` (the policy's
    trainable parameters, then the value adapter's and head's); kl_ctl: beta, in the rewards or the
    loss; run: its dist info (whitening, loss scales, gradient all-reduce), device, and the context of a
    divergence's error message.
    """

    def __init__(
        self,
        settings: UpdateSettings,
        passes: ForwardPasses,
        roles: Roles,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        kl_ctl: rlhf.FixedKLController | rlhf.AdaptiveKLController,
        run: StageRun,
    ):
        self.settings, self.passes, self.roles = settings, passes, roles
        self.optimizer, self.params, self.kl_ctl, self.run = optimizer, params, kl_ctl, run

    def update(self, ro: Rollout, step: int) -> tuple[Rollout, dict[str, float], torch.Tensor]:
        """Steps 4-7 on a rollout: old logprobs and values (from the first update pass when the rollout
        lacks them), rewards and advantages, ppo.epochs of clipped updates. Returns the rollout with its
        old logprobs and values, the update's stats, and the per-token non-score reward. `step`: the
        step being taken (1-based), for error messages."""
        self.roles.train(self.settings.gradient_checkpointing)  # dropout is off either way (detail 9)
        ro, first = self.old_logprobs_and_values(ro)
        _, non_score, adv, returns = self.advantages(ro)
        stats = self.train_epochs(ro, adv, returns, first, step)
        self.roles.eval()
        return ro, stats, non_score

    def old_logprobs_and_values(self, ro: Rollout) -> tuple[Rollout, FirstPass | None]:
        """The rollout with its old logprobs and values, and the first update pass when it gave them.

        When the whole rollout batch is one micro-batch, the first update pass runs on the unchanged
        policy and value weights over every row: its logprobs and values ARE the old ones (detached).
        """
        if ro.logprobs is not None:
            return ro, None
        order = torch.randperm(ro.responses.shape[0])  # epoch 0's order, drawn where the epochs would
        qr, mask = ro.query_responses[order], ro.attention_mask[order]
        new_lp, entropy = self.passes.policy_logprobs(
            qr, mask, ro.responses[order], POLICY, with_entropy=True
        )
        critic = self.settings.estimation.critic
        vpred = self.passes.value_estimates(qr, mask, ro.responses.shape[1]) if critic else None
        ro = dataclasses.replace(
            ro,
            logprobs=torch.empty_like(new_lp).index_copy_(0, order, new_lp.detach()),
            values=None if vpred is None else torch.empty_like(vpred).index_copy_(0, order, vpred.detach()),
        )
        return ro, (order, new_lp, vpred, entropy)

    def advantages(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 5-6: (rewards, non-score rewards, advantages, returns), each (B, R).

        The KL penalty is in the rewards unless the estimator puts it in the loss (train_epochs); the
        critic-free estimators take their baseline from the rollout itself (ppo/estimators.py)."""
        cfg = self.settings
        est = cfg.estimation
        beta = self.kl_ctl.value if est.kl_in == "reward" else 0.0
        rewards, non_score = rlhf.shape_rewards(
            ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, beta, est.kl_estimator
        )
        if est.critic:
            adv, returns = rlhf.gae(rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)
        else:
            adv, returns = critic_free_advantages(est, rewards, ro.response_mask, cfg.gamma)
        if est.whiten:
            adv = whiten_advantages(adv, ro.response_mask, self.run.dist)
        return rewards, non_score, adv, returns

    def train_epochs(
        self, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor, first: FirstPass | None, step: int
    ) -> dict[str, float]:
        """Step 7: ppo.epochs over reshuffled minibatches of micro-batches, one optimizer step each."""
        stats: dict[str, list[float]] = defaultdict(list)
        B = ro.responses.shape[0]
        cfg, params, run = self.settings, self.params, self.run
        for _epoch in range(cfg.epochs):
            # Reshuffled every epoch (detail 14); the torch RNG is checkpointed.
            order = first[0] if first is not None else torch.randperm(B)
            scales = minibatch_scales(loss_mask(ro, cfg.mask_truncated), order, cfg.minibatch, run.dist)
            for mb_start, scale in zip(range(0, B, cfg.minibatch), scales):
                mb = order[mb_start : mb_start + cfg.minibatch]
                for mi_start in range(0, len(mb), cfg.micro):
                    idx = mb[mi_start : mi_start + cfg.micro]
                    # Epoch 0's one micro-batch of a fused rollout: already forwarded.
                    forwarded, first = (first[1:], None) if first is not None else (None, first)
                    for key, value in self.train_micro(ro, idx, adv, returns, scale, forwarded, step).items():
                        stats[key].append(value)
                average_gradients(params, run.dist)
                if cfg.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    check_finite(norm, "the gradient norm", step, run)
                optimizer_step(self.optimizer, step, run)
                self.optimizer.zero_grad(set_to_none=True)
        result = {k: sum(v) / len(v) for k, v in stats.items()}
        # The very first minibatch, before any update: ratio must be exactly 1 there (detail 15).
        result["policy/first_ratio"] = stats["val/ratio"][0]
        return result

    def train_micro(
        self,
        ro: Rollout,
        idx: torch.Tensor,
        adv: torch.Tensor,
        returns: torch.Tensor,
        scale: rlhf.LossScale,
        forwarded: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
        step: int,
    ) -> dict[str, float]:
        """One micro-batch's gradients, added to the parameters' .grad: the policy's loss, then the
        critic's, each forwarded and backpropagated in turn. The two share no trainable parameter (the
        base is frozen), so their gradients are those of the summed loss, while only one pass's
        activations are alive at a time: the update's peak memory is one pass, not two (measured in
        bench/README.md). `forwarded`: (logprobs, values, entropy) of a fused first pass, whose two
        passes both exist already. Returns the micro-batch's metrics."""
        qr, mask = ro.query_responses[idx], ro.attention_mask[idx]
        if forwarded is not None:
            new_lp, vpred, entropy = forwarded
        else:
            new_lp, entropy = self.passes.policy_logprobs(
                qr, mask, ro.responses[idx], POLICY, with_entropy=True
            )
            vpred = None
        terms = self.policy_terms(ro, idx, new_lp, adv, scale)
        # Each term is already this micro-batch's share of the minibatch's loss (LossScale).
        self.backward(terms.pop("loss") + terms.pop("kl_term", 0.0), step)
        del new_lp
        if self.settings.estimation.critic:
            if vpred is None:
                vpred = self.passes.value_estimates(qr, mask, ro.responses.shape[1])
            value = self.value_terms(ro, idx, vpred, returns, scale)
            self.backward(value.pop("value_term"), step)
            terms.update(value)
        terms["policy/entropy_avg"] = rlhf.masked_mean(entropy, ro.response_mask[idx])
        return {key: float(value.detach()) for key, value in terms.items()}

    def backward(self, loss: torch.Tensor, step: int) -> None:
        check_finite(loss.detach(), "the PPO loss", step, self.run)
        loss.backward()

    def policy_terms(
        self, ro: Rollout, idx: torch.Tensor, new_lp: torch.Tensor, adv: torch.Tensor, scale: rlhf.LossScale
    ) -> dict[str, torch.Tensor]:
        """One micro-batch's policy loss terms ("loss": the clipped policy loss; "kl_term": beta x the KL
        estimate, when the KL is in the loss), each its share of the minibatch's loss (`scale`), and the
        metrics beside them (this micro-batch's own means), with TRL's names. The loss's tokens are
        `loss_mask`'s; with the sampler correction each token's term is weighted by the trained policy's
        truncated importance ratio against vLLM's (exactly 1 with the hf engine: no sampler logprobs)."""
        cfg, mask = self.settings, ro.response_mask[idx]
        est = cfg.estimation
        lmask = loss_mask(ro, cfg.mask_truncated)[idx]
        sampler = None if ro.sampler_logprobs is None else ro.sampler_logprobs[idx]
        weights, _ = rlhf.sampler_weights(
            ro.logprobs[idx], sampler, mask, cfg.sampler_correction, cfg.sampler_correction_cap
        )
        pg = rlhf.policy_loss(
            new_lp,
            ro.logprobs[idx],
            adv[idx],
            mask,
            cfg.clip_range,
            est.loss_aggregation,
            cfg.max_new_tokens,
            scale,
            clip_range_high=cfg.clip_range_high,
            ratio_level=cfg.ratio_level,
            weights=weights,
            loss_mask=lmask,
        )
        out = {
            "loss": pg["loss"],
            "policy/approxkl_avg": pg["approxkl"],
            "policy/clipfrac_avg": pg["clipfrac"],
            "loss/policy_avg": pg["mean_loss"],
            "val/ratio": pg["ratio"],
        }
        if est.kl_in == "loss":
            # The old logprobs: k3_iw weights each token by pi / pi_old, the policy that sampled it.
            kl = rlhf.kl_estimate(new_lp, ro.ref_logprobs[idx], mask, est.kl_estimator, ro.logprobs[idx])
            max_tokens = cfg.max_new_tokens
            kl_loss = rlhf.aggregate_loss(kl, lmask, est.loss_aggregation, max_tokens, scale)
            kl_mean = rlhf.aggregate_loss(kl.detach(), lmask, est.loss_aggregation, max_tokens)
            out.update({"kl_term": self.kl_ctl.value * kl_loss, "loss/kl_avg": kl_mean})
        return out

    def value_terms(
        self,
        ro: Rollout,
        idx: torch.Tensor,
        vpred: torch.Tensor,
        returns: torch.Tensor,
        scale: rlhf.LossScale,
    ) -> dict[str, torch.Tensor]:
        """One micro-batch's critic term ("value_term": vf_coef x the clipped value loss, its share of the
        minibatch's loss) and its metrics; over `loss_mask`'s tokens, as the policy's."""
        cfg, mask = self.settings, loss_mask(ro, self.settings.mask_truncated)[idx]
        vf = rlhf.value_loss(vpred, ro.values[idx], returns[idx], mask, cfg.clip_range_value, scale)
        return {"value_term": cfg.vf_coef * vf["loss"], "loss/value_avg": vf["mean_loss"],
                "val/clipfrac_avg": vf["clipfrac"]}  # fmt: skip


def sampler_metrics(ro: Rollout, correction: str, cap: float) -> dict[str, float]:
    """engine=vllm: how far the sampler's policy is from the trained one (a quantized base: not 0), and
    the share of real tokens whose sampler weight the cap binds (under ppo.sampler_correction=none: the
    share tis would cap, so the log says whether the correction would act). {} with the hf engine."""
    if ro.sampler_logprobs is None:
        return {}
    mask, mode = ro.response_mask, "tis" if correction == "none" else correction
    _, capped = rlhf.sampler_weights(ro.logprobs, ro.sampler_logprobs, mask, mode, cap)
    return {
        GAP_METRIC: sampler_logprob_gap(ro.sampler_logprobs, ro.logprobs, mask),
        CAPPED_METRIC: rlhf.capped_share(capped, mask),
    }


def step_metrics(
    ro: Rollout,
    non_score: torch.Tensor,
    eos_ids: list[int],
    timings: dict[str, float],
    correction: str = "none",
    cap: float = 2.0,
) -> dict[str, float]:
    """Step 8's metrics of this rank's rollout (TRL's names), its non-score reward and `timings`;
    `correction`, `cap`: ppo.sampler_correction and its cap (`sampler_metrics`)."""
    mask = ro.response_mask
    # k1 per sequence: TRL's objective/kl
    kl = rlhf.masked_sum(ro.logprobs - ro.ref_logprobs, mask, dim=1)
    non_score_total = rlhf.masked_sum(non_score, mask, dim=1)
    eos_count = sum(int((ro.responses == e).logical_and(mask).sum()) for e in eos_ids)
    # The share of responses the length limit cut (no EOS): TRL's completions/clipped_ratio.
    truncated = ~rlhf.has_eos(ro.responses, mask, eos_ids)
    return {
        "objective/kl": float(kl.mean()),
        "objective/entropy": float(rlhf.masked_sum(-ro.logprobs, mask, dim=1).mean()),
        "objective/non_score_reward": float(non_score_total.mean()),
        "objective/rlhf_reward": float((ro.scores + non_score_total).mean()),
        "objective/scores": float(ro.raw_scores.mean()),
        "objective/scores_normalized": float(ro.scores.mean()),
        "val/num_eos_tokens": float(eos_count),
        "completions/clipped_ratio": float(truncated.float().mean()),
        "val/mean_response_length": float(mask.sum(1).float().mean()),
        **sampler_metrics(ro, correction, cap),
        **timings,
    }
