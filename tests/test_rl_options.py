"""The DAPO, GSPO and sampler-correction options of train-ppo (docs/ppo-details.md, "Off-policy corrections,
DAPO and GSPO"): each pure function by hand, their wiring into the trainer, the identity of the sampler
correction with the hf engine, the lr=0 invariants with every option on, and the config's refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import run_cli_in_process
from ppo_helpers import (
    assert_never_moved,
    assert_usage_error,
    build_tiny_roles,
    make_trainer,
    ppo_config,
    tiny_adapters,
)

from ppo_cli import checkpoint as ckpt
from ppo_cli import rlhf
from ppo_cli.ppo import step as step_module
from ppo_cli.ppo.step import loss_mask, minibatch_scales, step_metrics
from ppo_cli.ppo.validate import validate_ppo
from ppo_cli.ppo.vllm_rollout import CAPPED_METRIC, GAP_METRIC


def close(actual, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual).detach().float(), torch.as_tensor(expected).float(), atol=tol, rtol=tol
    )


# ---------------------------------------------------------------------------------------------
# Pure functions, hand-computed


def surrogate(ratio: float, advantage: float, **kwargs) -> dict[str, torch.Tensor]:
    """policy_loss on one token whose ratio is `ratio`, and the loss's gradient in its new logprob."""
    new = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = rlhf.policy_loss(new, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), **kwargs)
    out["loss"].backward()
    return {**out, "grad": new.grad[0, 0]}


def test_clip_higher_leaves_a_rising_token_room_the_symmetric_clip_does_not():
    # ratio 1.25, A = 1: the symmetric clip at 1.2 binds (loss -1.2, no gradient, clipped) ...
    sym = surrogate(1.25, 1.0, clip_range=0.2)
    close(sym["loss"], -1.2)
    assert sym["grad"] == 0.0 and sym["clipfrac"] == 1.0
    # ... DAPO's upper 1 + 0.28 does not (loss -1.25, d/dlogp = -A * ratio = -1.25)
    high = surrogate(1.25, 1.0, clip_range=0.2, clip_range_high=0.28)
    close(high["loss"], -1.25)
    close(high["grad"], -1.25)
    assert high["clipfrac"] == 0.0
    # and beyond 1.28 it binds too
    close(surrogate(1.3, 1.0, clip_range=0.2, clip_range_high=0.28)["loss"], -1.28)
    # the lower bound is still clip_range's: ratio 0.7 with A = -1 is clipped at 0.8 either way
    for kwargs in ({}, {"clip_range_high": 0.28}):
        low = surrogate(0.7, -1.0, clip_range=0.2, **kwargs)
        close(low["loss"], 0.8)
        assert low["grad"] == 0.0 and low["clipfrac"] == 1.0
    # clip_range_high=None is the symmetric clip exactly
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5])
    assert torch.equal(rlhf.clipped_ratio(ratio, 0.2, None), torch.clamp(ratio, 0.8, 1.2))
    assert torch.equal(rlhf.clipped_ratio(ratio, None, 0.28), ratio)


def test_sequence_ratio_is_the_geometric_mean_with_each_tokens_gradient():
    # row 0: token ratios 2, 1/2, 4 -> geometric mean (2 * 0.5 * 4)^(1/3) = 4^(1/3); row 1: one token
    # of ratio 3, then pads (their log-ratio junk must not count)
    new = torch.tensor(
        [[math.log(2), -math.log(2), math.log(4)], [math.log(3), 5.0, -7.0]], requires_grad=True
    )
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    log_ratio = torch.where(mask, new - old, torch.zeros(()))
    seq = rlhf.sequence_log_ratio(log_ratio, mask)
    close(seq.exp()[0], [4 ** (1 / 3)] * 3)
    close(seq[1], [math.log(3), 0.0, 0.0])
    # GSPO-token's gradient: d out[b, t] / d new[b, t'] = [t == t'] (the sequence term is detached)
    seq[0].sum().backward()
    close(new.grad, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])

    # In the loss: every token of a row has the row's ratio, clipped once for the whole response.
    adv = torch.ones(2, 3)
    new.grad = None
    out = rlhf.policy_loss(new, old, adv, mask, clip_range=0.2, ratio_level="sequence",
                           aggregation="seq_mean_token_mean")  # fmt: skip
    # row 0: s = 1.587 > 1.2, A > 0 -> clipped at 1.2 on all 3 tokens; row 1: s = 3 -> clipped at 1.2
    close(out["loss"], -1.2)
    close(out["clipfrac"], 1.0)
    close(out["ratio"], (3 * 4 ** (1 / 3) + 3) / 4)
    # unclipped (a wide range): gradient s_b * A / n_b per token (seq_mean_token_mean over 2 rows)
    out = rlhf.policy_loss(new, old, adv, mask, clip_range=10.0, ratio_level="sequence",
                           aggregation="seq_mean_token_mean")  # fmt: skip
    out["loss"].backward()
    s0 = 4 ** (1 / 3)
    close(new.grad, [[-s0 / 3 / 2] * 3, [-3.0 / 2, 0.0, 0.0]], tol=1e-5)
    # approx-KL stays the tokens' own k2
    close(out["approxkl"], (0.5 * (math.log(2) ** 2 * 2 + math.log(4) ** 2 + math.log(3) ** 2)) / 4, tol=1e-5)
    with pytest.raises(ValueError, match="ratio level"):
        rlhf.policy_loss(new, old, adv, mask, ratio_level="sentence")


def test_overlong_penalty_ramps_over_the_buffer():
    # L = 10, buffer 4, penalty 1: 0 up to 6 tokens, -0.5 at 8 (midway), -1 at 10
    lengths = torch.tensor([0, 3, 6, 7, 8, 10])
    close(rlhf.overlong_penalty(lengths, 10, 4, 1.0), [0.0, 0.0, 0.0, -0.25, -0.5, -1.0])
    close(rlhf.overlong_penalty(lengths, 10, 4, 2.0), [0.0, 0.0, 0.0, -0.5, -1.0, -2.0])
    close(rlhf.overlong_penalty(lengths, 10, 10, 1.0), [0.0, -0.3, -0.6, -0.7, -0.8, -1.0])  # whole length
    with pytest.raises(ValueError):
        rlhf.overlong_penalty(lengths, 10, 0, 1.0)
    with pytest.raises(ValueError):
        rlhf.overlong_penalty(lengths, 10, 11, 1.0)


def test_sampler_weights_by_hand_capped_and_the_identity_without_a_sampler():
    # trained/sampler ratios 1.5, 3 (over the cap 2), 1/2; row 1: one token, then a pad where the
    # trained policy's logprob is -inf and the sampler's 0
    old = torch.tensor([[math.log(1.5), math.log(3), -math.log(2)], [math.log(1.1), -math.inf, -math.inf]])
    sampler = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    weights, capped = rlhf.sampler_weights(old, sampler, mask, "tis", 2.0)
    close(weights, [[1.5, 2.0, 0.5], [1.1, 1.0, 1.0]])
    assert capped.tolist() == [[False, True, False], [False, False, False]]
    assert rlhf.capped_share(capped, mask) == 0.25
    # seq_tis: one weight per row, the geometric mean (1.5 * 3 * 0.5)^(1/3) = 2.25^(1/3) = 1.310
    weights, capped = rlhf.sampler_weights(old, sampler, mask, "seq_tis", 2.0)
    close(weights, [[2.25 ** (1 / 3)] * 3, [1.1, 1.0, 1.0]])
    assert not capped.any()
    weights, capped = rlhf.sampler_weights(old, sampler, mask, "seq_tis", 1.2)
    close(weights, [[1.2] * 3, [1.1, 1.0, 1.0]])
    assert capped.tolist() == [[True, True, True], [False, False, False]]
    # no sampler logprobs (engine=hf), or mode none: exactly 1 everywhere, nothing capped
    for sampler_lp, mode in ((None, "tis"), (None, "seq_tis"), (sampler, "none")):
        weights, capped = rlhf.sampler_weights(old, sampler_lp, mask, mode, 2.0)
        assert torch.equal(weights, torch.ones(2, 3)) and not capped.any()
    # the weight multiplies each token's (clipped) loss term, with no gradient of its own
    new = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    w = torch.tensor([[1.5, 2.0, 0.5], [1.1, 1.0, 1.0]], requires_grad=True)
    out = rlhf.policy_loss(new, torch.zeros(2, 3), adv, mask, weights=w)
    close(out["loss"], -(1.5 * 1 + 2.0 * 2 + 0.5 * 3 + 1.1 * 4) / 4)
    out["loss"].backward()
    assert w.grad is None
    close(new.grad, [[-1.5 / 4, -4.0 / 4, -1.5 / 4], [-4.4 / 4, 0.0, 0.0]])


def test_a_loss_mask_takes_tokens_out_of_the_loss_and_its_count_not_out_of_the_diagnostics():
    new = torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    keep = torch.tensor([[True, True], [False, False]])  # row 1 truncated
    out = rlhf.policy_loss(new, old, adv, mask, clip_range=1.0, loss_mask=keep)
    close(out["loss"], -(math.exp(0.1) + math.exp(0.2)) / 2)
    close(out["ratio"], (math.exp(0.1) + math.exp(0.2) + math.exp(0.3)) / 3)  # over all real tokens
    # with a LossScale the divisor is the minibatch's loss tokens
    scaled = rlhf.policy_loss(new, old, adv, mask, clip_range=1.0, loss_mask=keep, scale=rlhf.LossScale(4, 2))
    close(scaled["loss"], -(math.exp(0.1) + math.exp(0.2)) / 4)


def rollout_of(response_mask: torch.Tensor, truncated: torch.Tensor | None, **fields):
    from ppo_cli.ppo.rollout import Rollout

    B, R = response_mask.shape
    zeros = torch.zeros(B, R)
    return Rollout(
        torch.zeros(B, R, dtype=torch.long), response_mask.long(), torch.zeros(B, R, dtype=torch.long),
        response_mask, zeros, zeros, None, torch.zeros(B), torch.zeros(B), [""] * B, [""] * B,
        truncated=truncated, **fields,
    )  # fmt: skip


def test_mask_truncated_removes_their_tokens_from_the_loss_mask_and_the_loss_scale():
    from ppo_cli.dist import DistInfo

    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [True, True, True]])
    truncated = torch.tensor([True, False, False, True])
    ro = rollout_of(mask, truncated)
    assert torch.equal(loss_mask(ro, False), mask)
    expected = mask.clone()
    expected[[0, 3]] = False
    assert torch.equal(loss_mask(ro, True), expected)
    assert torch.equal(loss_mask(rollout_of(mask, None), True), mask)  # nothing known to be cut
    order = torch.arange(4)
    single = DistInfo()
    assert [s.tokens for s in minibatch_scales(loss_mask(ro, True), order, 2, single)] == [1.0, 2.0]
    assert [s.tokens for s in minibatch_scales(loss_mask(ro, False), order, 2, single)] == [4.0, 5.0]
    assert [s.rows for s in minibatch_scales(loss_mask(ro, True), order, 2, single)] == [2.0, 2.0]


def test_clipped_ratio_metric_and_the_sampler_metrics_beside_the_gap():
    eos = 9
    responses = torch.tensor([[1, 9, 0], [1, 2, 3], [9, 0, 0], [1, 2, 3]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False], [True, True, True]])
    ro = dataclasses.replace(rollout_of(mask, None), responses=responses, ref_logprobs=torch.zeros(4, 3))
    metrics = step_metrics(ro, torch.zeros(4, 3), [eos], {})
    assert metrics["completions/clipped_ratio"] == 0.5 and metrics["val/num_eos_tokens"] == 2.0
    assert GAP_METRIC not in metrics and CAPPED_METRIC not in metrics  # engine=hf: no sampler
    # the sampler gave the first token of each row 1/3 of the trained policy's probability: ratio 3 > 2
    sampler = torch.zeros(4, 3)
    sampler[:, 0] = -math.log(3)
    ro = dataclasses.replace(ro, sampler_logprobs=sampler)
    for correction in ("none", "tis"):  # under none: the share tis would cap
        metrics = step_metrics(ro, torch.zeros(4, 3), [eos], {}, correction, 2.0)
        close(metrics[CAPPED_METRIC], 4 / 9)
        close(metrics[GAP_METRIC], -4 * math.log(3) / 9)
    metrics = step_metrics(ro, torch.zeros(4, 3), [eos], {}, "tis", 4.0)
    assert metrics[CAPPED_METRIC] == 0.0


# ---------------------------------------------------------------------------------------------
# The trainer on the tiny model


@pytest.fixture(scope="module")
def adapters(tiny):
    return tiny_adapters(tiny)


def tiny_trainer(tiny, adapters, tmp_path, *overrides: str, reward=None):
    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"])
    cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", *overrides)
    return make_trainer(cfg, roles, tokenizer, reward=reward)


def test_sampler_correction_is_the_identity_with_the_hf_engine(tiny, adapters, tmp_path, monkeypatch):
    """engine=hf: no sampler logprobs, so tis's weights are exactly 1 and a step with tis gives the
    metrics and weights of a step without it, bit for bit."""
    seen = []
    real = rlhf.sampler_weights

    def spy(*args, **kwargs):
        weights, capped = real(*args, **kwargs)
        seen.append((args[1], weights, capped))
        return weights, capped

    monkeypatch.setattr(step_module.rlhf, "sampler_weights", spy)
    runs = {}
    for correction in ("none", "tis"):
        trainer = tiny_trainer(tiny, adapters, tmp_path / correction, f"ppo.sampler_correction={correction}",
                               "ppo.epochs=1", "ppo.num_minibatches=2")  # fmt: skip
        ckpt.seed_everything(0)
        trainer.train_step(1)
        metrics = {k: v for k, v in trainer.last_metrics.items() if not k.startswith(("time/", "memory/"))}
        runs[correction] = (metrics, [p.detach().clone() for p in trainer.policy_params])
    assert seen and all(s is None and torch.equal(w, torch.ones_like(w)) and not c.any() for s, w, c in seen)
    assert runs["none"][0] == runs["tis"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["none"][1], runs["tis"][1]))
    assert CAPPED_METRIC not in runs["tis"][0] and "completions/clipped_ratio" in runs["tis"][0]


def test_the_trainer_weights_the_loss_and_adds_the_overlong_penalty(tiny, adapters, tmp_path):
    """With sampler logprobs (as vLLM gives them) the policy term is weighted by min(pi / pi_vllm, C); the
    overlong ramp is added to the scores PPO uses; mask_truncated leaves the cut responses out."""
    zero = lambda qr, mask, prompts, completions: torch.zeros(qr.shape[0])  # noqa: E731
    trainer = tiny_trainer(
        tiny, adapters, tmp_path, "ppo.sampler_correction=tis", "ppo.overlong_penalty=2.0",
        "ppo.overlong_buffer=4", "ppo.reward_normalization=none", "ppo.missing_eos_score=null",
        reward=zero,
    )  # fmt: skip
    trainer.fuse_first_pass = False  # the rollout carries its old logprobs
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:4])
    lengths = ro.response_mask.sum(1).float()
    close(ro.scores, -2.0 * ((lengths - 4) / 4).clamp(0, 1))  # max_new_tokens 8, ramp from 4 tokens
    assert torch.equal(ro.truncated, ~rlhf.has_eos(ro.responses, ro.response_mask, trainer.eos_ids))

    idx = torch.arange(4)
    scale = rlhf.LossScale(float(ro.response_mask.sum()), 4.0)
    new_lp = ro.logprobs.clone()  # before any update: ratio 1, token loss -A
    adv = torch.arange(1.0, 5.0).unsqueeze(1).expand_as(new_lp)  # row b: advantage b + 1

    def policy_term(ro_):
        return float(trainer.updater.policy_terms(ro_, idx, new_lp, adv, scale)["loss"])

    plain = policy_term(ro)
    assert plain == pytest.approx(-float(rlhf.masked_sum(adv, ro.response_mask)) / scale.tokens, rel=1e-6)
    # the sampler gave every token 1/1.5 of the trained policy's probability: every weight 1.5
    weighted = dataclasses.replace(ro, sampler_logprobs=ro.logprobs - math.log(1.5))
    assert policy_term(weighted) == pytest.approx(1.5 * plain, rel=1e-5)
    # 1/3: capped at 2
    capped = dataclasses.replace(ro, sampler_logprobs=ro.logprobs - math.log(3))
    assert policy_term(capped) == pytest.approx(2.0 * plain, rel=1e-5)
    # mask_truncated: the cut rows' tokens leave the loss (rows 0 and 2 said cut here)
    cut = dataclasses.replace(ro, truncated=torch.tensor([True, False, True, False]))
    assert policy_term(cut) == pytest.approx(plain, rel=1e-6)  # off: every row counts
    trainer.updater.settings = dataclasses.replace(trainer.updater.settings, mask_truncated=True)
    lengths = ro.response_mask.sum(1).float()
    expected = -(2 * lengths[1] + 4 * lengths[3]) / scale.tokens
    assert policy_term(cut) == pytest.approx(float(expected), rel=1e-6)


def cli_args(tiny, adapters, out, *extra: str) -> list[str]:
    return [
        "train-ppo", f"sft_checkpoint={adapters['sft']}", f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward", "train.device=cpu", "train.batch_size=2",
        "generation.max_new_tokens=8", "logger.progress=false", "logger.plots=false", "sample_every=0", f"output_dir={out}", *extra,
    ]  # fmt: skip


ALL_OPTIONS = (
    "ppo.clip_range_high=0.28",
    "ppo.ratio_level=sequence",
    "ppo.mask_truncated=true",
    "ppo.sampler_correction=tis",
    "ppo.overlong_penalty=1.0",
    "ppo.overlong_buffer=4",
)


def positive_reward(qr, mask, prompts, completions) -> torch.Tensor:
    """The tiny task's reward_fn (ppo_cli.tiny.task:positive_reward) in the trainer's signature."""
    from ppo_cli.tiny.task import positive_reward as gold

    return torch.tensor(gold(prompts, completions))


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_lr0_invariants_hold_with_every_option(tiny, adapters, tmp_path, estimator):
    """train.lr=0 with clip-higher, sequence ratios, truncated responses masked, tis and the overlong
    penalty: ratio 1, approx-KL 0, no clipping over both minibatches of both steps (each after an optimizer
    step at lr 0), with a critic (gae) and with the KL in the loss (grpo); the truncation share is logged."""
    critic = estimator == "gae"
    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"] if critic else None,
                                        critic=critic)  # fmt: skip
    extra = [] if critic else ["generation.samples_per_prompt=2", "train.batch_size=2"]
    cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", f"ppo.advantage_estimator={estimator}",
                     "train.lr=0", "ppo.epochs=1", "ppo.num_minibatches=2", *extra, *ALL_OPTIONS)  # fmt: skip
    validate_ppo(cfg)
    trainer = make_trainer(cfg, roles, tokenizer, reward=positive_reward)
    metrics = []
    for step in (1, 2):
        trainer.train_step(step)
        metrics.append(trainer.last_metrics)
    assert_never_moved(metrics)
    for m in metrics:
        assert 0.0 <= m["completions/clipped_ratio"] <= 1.0
        assert m.get("loss/kl_avg", 0.0) == 0.0
        assert ("loss/value_avg" in m) == critic and ("loss/kl_avg" in m) != critic


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("ppo.sampler_correction_cap=0", ["ppo.sampler_correction_cap=0", "positive"]),
        ("ppo.sampler_correction_cap=-1.5", ["ppo.sampler_correction_cap=-1.5"]),
        ("ppo.clip_range_high=-0.1", ["ppo.clip_range_high=-0.1", "at least 0"]),
        ("ppo.overlong_buffer=9", ["ppo.overlong_buffer=9", "generation.max_new_tokens=8"]),
        ("ppo.overlong_buffer=0", ["ppo.overlong_buffer=0"]),
        ("ppo.overlong_penalty=-1", ["ppo.overlong_penalty=-1"]),
        ("ppo.ratio_level=sentence", ["ppo.ratio_level", "sequence"]),
        ("ppo.sampler_correction=is", ["ppo.sampler_correction", "seq_tis"]),
    ],
)
def test_bad_values_exit_2_with_one_paragraph(tiny, adapters, tmp_path, override, needles):
    result = run_cli_in_process(*cli_args(tiny, adapters, tmp_path / "bad", override))
    assert_usage_error(result, "train-ppo", *needles)
