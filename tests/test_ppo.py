"""train-ppo: the PPO trainer in-process, then the real CLI on the tiny Llama.

Every implementation detail in docs/ppo-details.md has a test; where it lives:

| row | test |
|-----|------|
| 1 pad != eos | test_ppo_roles.py::test_row1_pad_is_its_own_token |
| 2 left padding, position ids | test_ppo_roles.py::test_row2_left_padding_does_not_change_logprobs; test_rlhf.py::test_position_ids_under_left_padding |
| 3 truncate after EOS | test_rlhf.py::test_truncate_after_eos_single_id, ::test_truncate_after_eos_list_of_ids_and_pad_none |
| 4 reward at the last real token | test_ppo_roles.py::test_row4_reward_at_last_real_token_equals_plain_peft_rm; test_rlhf.py::test_shape_rewards_score_at_last_real_token_and_no_kl_at_pads |
| 5 missing-EOS penalty | test_rlhf.py::test_missing_eos_penalty_only_hits_rows_without_eos, ::test_has_eos_empty_row_is_false |
| 6 KL 0 at pads, masked sums | test_row6_kl_and_masked_sums_count_real_tokens_only (here); test_rlhf.py::test_masked_sum_mean_ignore_pads_even_nan, ::test_kl_estimators_hand_computed |
| 7 adaptive KL controller | test_rlhf.py::test_adaptive_kl_controller, ::test_fixed_kl_controller; its state across resume: test_resume_after_sigkill_is_identical |
| 8 same temperature, no top-k/top-p | test_row8_generation_and_scoring_agree (here); test_rlhf.py::test_logprobs_with_temperature_hand_computed |
| 9 dropout off | test_ppo_roles.py::test_row9_dropout_off_in_every_role, ::test_row9_disable_dropout_covers_gpt2_and_lora_dropout |
| 10 critic from the RM | test_ppo_roles.py::test_row10_critic_starts_as_the_reward_model |
| 11 GAE | test_rlhf.py::test_gae_two_rows_with_masked_tail, ::test_gae_lam_gamma_one_is_future_reward_sum_minus_value |
| 12 whitening over valid tokens | test_rlhf.py::test_masked_whiten_mean0_std1_over_mask_and_zero_at_pads, ::test_masked_var |
| 13 clipped losses | test_rlhf.py::test_policy_loss_hand_computed_with_clipping, ::test_value_loss_with_one_clipped_entry, ::test_policy_loss_garbage_at_pads_gives_finite_grads |
| 14 epochs x reshuffled minibatches | test_row14_epochs_over_reshuffled_minibatches (here) |
| 15 ratio 1 before the first update | test_row14_epochs_over_reshuffled_minibatches (first_ratio, in-process); test_row15_16_lr0_run_never_moves (CLI, lr=0); test_first_ratio_is_one_with_minibatches (CLI, normal lr); test_rlhf.py::test_policy_loss_new_equals_old |
| 16 reference = SFT, KL 0 at step 1 | test_row15_16_lr0_run_never_moves; test_first_ratio_is_one_with_minibatches; test_ppo_roles.py::test_reference_is_the_sft_adapter_and_policy_starts_there |
| 17 reward scale fixed on SFT samples | test_first_ratio_is_one_with_minibatches (objective/scores_normalized at step 1); test_rlhf.py::test_normalize_scores |
| 18 per-rank seeds, shared data order | test_row18_rank_seeds_differ_data_order_shared (here) |
| 19 negative-KL alarm | test_row19_negative_kl_alarm (here) |
| 20 RM Bradley-Terry loss | test_rlhf.py::test_pairwise_reward_loss_hand_computed (held-out accuracy: the train-rm tests) |

Runtime guards: test_nan_loss_stops_with_the_last_checkpoint, test_row19_negative_kl_alarm (val/ratio).
End-to-end learning: test_ppo_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli_in_process
from ppo_helpers import (
    assert_never_moved,
    assert_resumed_identically,
    build_tiny_roles,
    cli_env,
    finish,
    hostile_base,
    kill_and_resume,
    leaked_generation_fields,
    make_trainer,
    ppo_config,
    read_metrics,
    record_generation,
    shift_rm_adapter,
    start_cli,
    tiny_adapters,
)
from safetensors.torch import load_file

from ppo_cli import checkpoint as ckpt
from ppo_cli import rlhf
from ppo_cli.data import pad_left
from ppo_cli.dist import DistInfo
from ppo_cli.errors import UserError
from ppo_cli.ppo.roles import POLICY, REWARD
from ppo_cli.ppo.step import step_metrics
from ppo_cli.reward.functions import call_reward_function, load_reward_function

CONTRACT_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "val/num_eos_tokens",
    "lr",
    "episode",
    "objective/kl_coef",
    "time/generate",
    "time/score",
    "time/train",
]


@pytest.fixture(scope="module")
def adapters(tiny):
    return tiny_adapters(tiny)


@pytest.fixture
def trainer_factory(tiny, adapters, tmp_path):
    """trainer_factory(*overrides, dist=None) -> PPOTrainer on fresh roles (SFT policy, RM reward + critic)."""

    def make(*overrides: str, dist: DistInfo | None = None, reward=None):
        roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"])
        cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", *overrides)
        return make_trainer(cfg, roles, tokenizer, reward=reward, dist=dist)

    return make


# ================================================================================================
# In-process: the trainer's pieces on a real rollout
# ================================================================================================


def test_row8_generation_and_scoring_agree(trainer_factory):
    """Rollouts sample from softmax(logits / T) with no top-k/top-p, and the old logprobs are exactly
    that distribution's: generate's own processed scores give the same numbers."""
    # fp32: the agreement asserted is exact to 1e-5 (under bf16 it holds to bf16 rounding only).
    trainer = trainer_factory(
        "generation.temperature=0.7", "generation.max_new_tokens=6", "train.mixed_precision=no"
    )
    gc = trainer.generation_config
    assert gc.do_sample and gc.temperature == 0.7 and gc.top_k == 0 and gc.top_p == 1.0
    assert gc.repetition_penalty == 1.0 and not gc.min_p

    prompts = [p["input_ids"] for p in trainer.prompts[:4]]
    pad = trainer.tokenizer.pad_token_id
    input_ids = pad_left(prompts, pad)
    prompt_mask = pad_left([[1] * len(p) for p in prompts], 0)
    ckpt.seed_everything(0)
    with torch.no_grad(), trainer.roles.role(POLICY):
        out = trainer.roles.model.generate(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            generation_config=trainer.generation_config,
            output_scores=True,
            return_dict_in_generate=True,
        )
    responses, mask = rlhf.truncate_after_eos(out.sequences[:, input_ids.shape[1] :], trainer.eos_ids, pad)
    processed = torch.stack(out.scores, dim=1)  # what generate sampled from, after its logits processors
    # Only the pad token is suppressed (it must never be sampled); no top-k/top-p filter removed others.
    assert gc.suppress_tokens == [pad]
    assert torch.isinf(processed[..., pad]).all()
    others = torch.ones(processed.shape[-1], dtype=torch.bool)
    others[pad] = False
    assert torch.isfinite(processed[mask][:, others]).all(), "a top-k/top-p filter removed tokens"
    sampled_lp = torch.log_softmax(processed.float(), -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)

    qr = torch.cat([input_ids, responses], 1)
    full_mask = torch.cat([prompt_mask, mask.long()], 1)
    with torch.no_grad():
        old = trainer.policy_logprobs(qr, full_mask, responses, POLICY)
        with trainer.roles.role(POLICY):
            logits = trainer.roles.response_logits(qr, full_mask, responses.shape[1])
    logits[..., pad] = float("-inf")
    by_hand = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(old[mask], by_hand[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(old[mask], sampled_lp[mask], atol=1e-5, rtol=0)
    # Teeth: at T = 1 the logprobs are visibly different.
    at_one = rlhf.logprobs_from_logits(logits, responses, 1.0)
    assert (at_one[mask] - old[mask]).abs().max() > 1e-2

    # And the trainer's rollout stores exactly these old logprobs: from its own scoring pass, or
    # (one micro-batch per update) from the first update pass, before any optimizer step.
    for fused in (False, True):
        trainer.fuse_first_pass = fused
        ckpt.seed_everything(0)
        ro, _ = trainer.rollout(trainer.prompts[:4])
        assert torch.equal(ro.responses, responses)
        assert (ro.logprobs is None) == fused
        if fused:
            ro = trainer.update(ro)[0]  # the rollout with the first pass's old logprobs
        torch.testing.assert_close(ro.logprobs[mask], old[mask], atol=1e-6, rtol=0)


def test_row8_rollouts_ignore_the_models_generation_config(tiny, adapters, tmp_path, monkeypatch):
    """A base whose generation_config.json sets top_k=1, penalties, forced tokens, ... : rollouts still
    sample from softmax(z / T) with only the pad token suppressed, the distribution the logprobs use."""
    base, hostile = hostile_base(tiny["model"], tmp_path / "base")
    roles, tokenizer = build_tiny_roles(base, adapters["sft"], adapters["rm"])
    cfg = ppo_config(base, tiny["prompts"], tmp_path / "run", "generation.temperature=1.0")
    trainer = make_trainer(cfg, roles, tokenizer)
    seen = record_generation(roles.model, monkeypatch)
    ckpt.seed_everything(0)
    responses = trainer.generate([trainer.prompts[0]["input_ids"]] * 16)[2]
    assert leaked_generation_fields(seen["config"], hostile) == {}
    (suppress,) = seen["processors"]
    assert type(suppress).__name__ == "SuppressTokensLogitsProcessor"
    assert suppress.suppress_tokens.tolist() == [tokenizer.pad_token_id]
    assert len({tuple(r.tolist()) for r in responses}) > 1, responses
    assert roles.model.get_base_model().generation_config.top_k == hostile["top_k"]  # restored


def test_fused_first_pass_equals_separate_scoring_pass(trainer_factory):
    """One micro-batch per update: old logprobs and values come from the first update pass. The
    result — old numbers, metrics, trained weights — matches the separate no-grad scoring pass."""
    results = []
    for fused in (True, False):
        trainer = trainer_factory("ppo.epochs=2", "train.lr=1e-2", "train.batch_size=4")
        assert trainer.fuse_first_pass
        trainer.fuse_first_pass = fused
        ckpt.seed_everything(0)
        ro, _ = trainer.rollout(trainer.prompts[:4])
        before = [p.detach().clone() for p in trainer.policy_params + trainer.value_params]
        ro, stats, non_score = trainer.update(ro)
        weights = [p.detach().clone() for p in trainer.policy_params + trainer.value_params]
        assert any(not torch.equal(a, b) for a, b in zip(before, weights))  # the update did move them
        results.append((ro, stats, non_score, weights))
    (fused_ro, fused_stats, fused_ns, fused_w), (ro, stats, ns, w) = results
    for a, b in ((fused_ro.logprobs, ro.logprobs), (fused_ro.values, ro.values), (fused_ns, ns)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert fused_stats["policy/first_ratio"] == stats["policy/first_ratio"] == 1.0
    for key in stats:
        assert fused_stats[key] == pytest.approx(stats[key], abs=1e-5), key
    for a, b in zip(fused_w, w):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert stats["val/ratio"] != 1.0  # the second epoch saw the moved policy


@pytest.fixture(scope="module")
def shifted_rm(adapters, tmp_path_factory):
    """The tiny RM with a score bias of +4: its scores sit far from PPO's normalised scale."""
    return shift_rm_adapter(adapters["rm"], tmp_path_factory.mktemp("shifted") / "rm", 4.0)


def test_critic_starts_on_the_normalised_score_scale(tiny, adapters, shifted_rm, tmp_path):
    """The critic copies the RM, whose scores average about +3.5 here, while GAE's returns use the
    scores normalised on the first batch (mean 0). Put on that scale when it is fixed, each value equals
    the normalised RM score of its prefix, and the first steps' value loss and clipped fraction are far
    smaller than for the same critic left on the raw scale (every value ~3 std from its return).
    Compared side by side rather than against fixed numbers, which move with the tiny adapters."""

    def first_steps(rescale: bool) -> tuple[float, float]:
        roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], shifted_rm)
        cfg = ppo_config(
            tiny["model"],
            tiny["prompts"],
            tmp_path / f"run-{rescale}",
            "train.lr=1e-3",
            "train.mixed_precision=no",
        )
        trainer = make_trainer(cfg, roles, tokenizer)
        trainer.fuse_first_pass = False  # the rollout's own value pass must already be on the scale
        trainer.critic_on_scale = not rescale  # "already on the scale": never rescaled
        ckpt.seed_everything(0)
        losses, clipfracs = [], []
        for step in range(2):
            ro, _ = trainer.rollout(trainer.prompts[4 * step : 4 * step + 4])
            assert ro.raw_scores.mean() > 2  # the shift is there
            if step == 0 and rescale:
                # V = the RM's score of each prefix (value adapter = reward adapter at the start), normalised.
                R = ro.responses.shape[1]
                with torch.no_grad(), roles.role(REWARD):
                    hidden = roles.hidden_states(ro.query_responses, ro.attention_mask)[:, -R - 1 : -1]
                    prefix_scores = roles.reward_head(hidden).squeeze(-1)
                expected = rlhf.normalize_scores(prefix_scores, trainer.scale.mean, trainer.scale.std)
                m = ro.response_mask
                torch.testing.assert_close(ro.values[m], expected[m], atol=1e-4, rtol=0)
            stats = trainer.update(ro)[1]
            losses.append(stats["loss/value_avg"])
            clipfracs.append(stats["val/clipfrac_avg"])
        return sum(losses) / 2, sum(clipfracs) / 2

    (loss, clipfrac), (raw_loss, raw_clipfrac) = first_steps(True), first_steps(False)
    assert loss < 0.5 * raw_loss and clipfrac < raw_clipfrac, (loss, clipfrac, raw_loss, raw_clipfrac)


def test_critic_on_rm_stats_scale_from_the_start(tiny, adapters, shifted_rm, tmp_path):
    """reward_normalization=rm_stats: the scale is known before PPO, so the critic is rescaled at
    construction, once (a rollout does not rescale it again)."""
    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], shifted_rm)
    cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", "ppo.reward_normalization=rm_stats")
    ids = pad_left([p["input_ids"] for p in (make_trainer(cfg, roles, tokenizer).prompts[:4])], 0)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        raw_values = roles.values(ids, mask, 3)
    trainer = make_trainer(cfg, roles, tokenizer, rm_stats=(3.0, 0.5))
    with torch.no_grad():
        torch.testing.assert_close(roles.values(ids, mask, 3), (raw_values - 3.0) / 0.5, atol=1e-4, rtol=0)
        ckpt.seed_everything(0)
        trainer.rollout(trainer.prompts[:4])
        torch.testing.assert_close(roles.values(ids, mask, 3), (raw_values - 3.0) / 0.5, atol=1e-4, rtol=0)


def stop_even_rows(trainer) -> None:
    """Make the trainer's rollouts end the even rows with EOS (the tiny policy rarely stops on its own)."""
    sample = trainer.rollouts.generate
    eos, pad = trainer.eos_ids[0], trainer.tokenizer.pad_token_id

    def even_rows_stop(prompt_ids, step):
        ids, prompt_mask, responses, _, sampler_logprobs = sample(prompt_ids, step)
        responses[::2, 1] = eos
        return ids, prompt_mask, *rlhf.truncate_after_eos(responses, eos, pad), sampler_logprobs

    trainer.rollouts.generate = even_rows_stop


def test_defaults_hold_kl_near_a_target_and_score_unfinished_responses_low(trainer_factory):
    """With the defaults, beta starts at 0.15 and the adaptive controller holds KL near 6 nats with a
    horizon of a tenth of the run; a response that never stops scores -1 (one std below the SFT
    policy's mean), whatever the reward source said."""
    trainer = trainer_factory(
        "train.max_steps=80", "train.batch_size=8",
        reward=lambda qr, mask, prompts, completions: torch.tensor([100.0 * len(c) for c in completions]),
    )  # fmt: skip
    ctl = trainer.kl_ctl
    assert isinstance(ctl, rlhf.AdaptiveKLController), type(ctl)
    assert (ctl.value, ctl.target, ctl.horizon) == (0.15, 6.0, pytest.approx(0.1 * 80 * 8))
    stop_even_rows(trainer)
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:8])
    ended = rlhf.has_eos(ro.responses, ro.response_mask, trainer.eos_ids)
    assert ended.any() and not ended.all(), ended
    normalised = (ro.raw_scores - ro.raw_scores.mean()) / ro.raw_scores.std()
    torch.testing.assert_close(ro.scores, torch.where(ended, normalised, -1.0), atol=1e-5, rtol=0)


def test_row5_missing_eos_penalty_is_in_normalised_units(trainer_factory):
    """The penalty comes off the normalised score (1.0 = one std of the SFT samples' scores, whatever
    the reward source's scale), and the scale is fixed on the reward source's own scores."""
    trainer = trainer_factory(
        "ppo.missing_eos_penalty=1.0", "generation.max_new_tokens=3", "train.batch_size=8",
        reward=lambda qr, mask, prompts, completions: torch.tensor([100.0 * len(c) for c in completions]),
    )  # fmt: skip
    stop_even_rows(trainer)
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:8])
    ended = rlhf.has_eos(ro.responses, ro.response_mask, trainer.eos_ids)
    assert ended.any() and not ended.all(), ended  # both kinds of row in the batch
    expected_raw = torch.tensor([100.0 * len(c) for c in ro.completions])
    torch.testing.assert_close(ro.raw_scores, expected_raw)  # the source's scores, unpenalised
    normalised = (expected_raw - expected_raw.mean()) / expected_raw.std()
    torch.testing.assert_close(ro.scores, normalised - 1.0 * (~ended).float(), atol=1e-5, rtol=0)


def test_row7_adaptive_horizon_defaults_to_a_tenth_of_the_run(trainer_factory):
    """kl_horizon=null: a tenth of the run's episodes (steps x prompts per step), so the controller binds
    in a short run; an explicit horizon is kept."""
    auto = trainer_factory("ppo.kl_controller=adaptive", "ppo.kl_horizon=null", "train.max_steps=80")
    assert auto.kl_ctl.horizon == pytest.approx(0.1 * 80 * 4)  # train.batch_size=4 prompts per step
    given = trainer_factory("ppo.kl_controller=adaptive", "ppo.kl_horizon=500", "train.max_steps=80")
    assert given.kl_ctl.horizon == 500


def test_console_says_which_beta_is_in_effect(trainer_factory, capsys):
    """The run's panel names beta, its controller and the units it weighs; once the first batch fixes
    the scale, the console says what beta is in the reward source's own units (TRL's kl_coef)."""
    trainer = trainer_factory(
        "ppo.kl_coef=0.1", "ppo.kl_controller=adaptive", "ppo.kl_horizon=null", "train.max_steps=80",
        reward=lambda qr, mask, prompts, completions: torch.tensor([3.0 * len(c) for c in completions]),
    )  # fmt: skip
    panel = trainer.summary()["kl penalty"]
    assert "beta 0.1" in panel and "target 6 nats" in panel and "horizon 32 episodes" in panel, panel
    assert "std" in trainer.summary()["reward scale"]
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:4])
    said = " ".join(capsys.readouterr().out.split())
    std = float(ro.raw_scores.double().std())
    assert f"std {std:.4g}" in said and f"TRL's kl_coef={0.1 * std:.3g}" in said, said
    assert trainer.beta_summary() == {"kl_coef in raw score units": pytest.approx(0.1 * std, rel=1e-6)}
    raw = trainer_factory("ppo.reward_normalization=none", "ppo.kl_controller=fixed", "ppo.kl_coef=0.05")
    assert (
        raw.summary()["kl penalty"].startswith("beta 0.05 (k1 in the reward), fixed")
        and "TRL" in raw.summary()["reward scale"]
    )


def test_row6_kl_and_masked_sums_count_real_tokens_only(trainer_factory):
    trainer = trainer_factory("ppo.kl_coef=0.1")
    trainer.fuse_first_pass = False  # the rollout carries its old logprobs
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:4])
    B, R = ro.responses.shape
    lengths = torch.tensor([R, 3, 1, 5])
    mask = torch.arange(R).unsqueeze(0) < lengths.unsqueeze(1)
    step = 0.1 * (torch.arange(R) + 1).float()  # logπ − logπ_ref = 0.1·(t+1) on real tokens

    def crafted(garbage: float):
        junk = torch.full_like(ro.logprobs, garbage)
        return dataclasses.replace(
            ro,
            response_mask=mask,
            logprobs=torch.where(mask, ro.logprobs, junk),
            ref_logprobs=torch.where(mask, ro.logprobs - step, -junk),
        )

    results = []
    for garbage in (float("nan"), 1e4):
        case = crafted(garbage)
        rewards, non_score, adv, returns = trainer.updater.advantages(case)
        metrics = step_metrics(case, non_score, trainer.eos_ids, {})
        results.append(metrics)
        assert torch.isfinite(rewards).all() and torch.isfinite(adv).all() and torch.isfinite(returns).all()
        assert (non_score[~mask] == 0).all() and (rewards[~mask] == 0).all() and (adv[~mask] == 0).all()
        # The score sits on the last real token of each row.
        last = lengths - 1
        torch.testing.assert_close(
            rewards[torch.arange(B), last] - non_score[torch.arange(B), last], case.scores, atol=1e-6, rtol=0
        )
    expected_kl = torch.tensor([float(step[:n].sum()) for n in lengths]).mean()
    for metrics in results:
        assert metrics["objective/kl"] == pytest.approx(float(expected_kl), abs=1e-5)
        assert metrics["objective/non_score_reward"] == pytest.approx(-0.1 * float(expected_kl), abs=1e-5)
        assert metrics["val/mean_response_length"] == pytest.approx(float(lengths.float().mean()))
        assert math.isfinite(metrics["objective/entropy"])
    assert results[0] == results[1]  # whatever sits at the pads


def test_row14_epochs_over_reshuffled_minibatches(trainer_factory):
    """ppo.epochs passes over the rollout batch, each a fresh permutation split into minibatches of
    micro-batches; one optimizer step per minibatch; the first minibatch sees ratio exactly 1 (row 15)."""
    trainer = trainer_factory(
        "ppo.epochs=3",
        "ppo.num_minibatches=2",
        "train.grad_accum_steps=2",
        "train.lr=1e-2",
        "train.batch_size=4",
    )
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:4])

    seen: list[int] = []
    original = trainer.policy_logprobs

    def recording(qr, mask, responses, role, **kwargs):
        for row in qr:
            seen.append(
                next(i for i in range(len(ro.query_responses)) if torch.equal(ro.query_responses[i], row))
            )
        return original(qr, mask, responses, role, **kwargs)

    steps = []
    trainer.passes.policy_logprobs = recording  # the passes the update runs
    optimizer_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(len(seen)), optimizer_step(*a, **k))[1]
    before = [p.detach().clone() for p in trainer.policy_params]
    _, stats, _ = trainer.update(ro)

    assert len(seen) == 3 * 4  # 3 epochs x 4 rows, one row per micro-batch (4 / 2 / 2)
    epochs = [seen[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled
    assert steps == [2, 4, 6, 8, 10, 12]  # one optimizer step per minibatch of 2 rows
    assert stats["policy/first_ratio"] == 1.0
    assert stats["val/ratio"] != 1.0  # later minibatches see the moved policy
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy_params))


def test_row18_rank_seeds_differ_data_order_shared(trainer_factory, monkeypatch):
    monkeypatch.setattr("ppo_cli.ppo.trainer.broadcast_parameters", lambda params, dist: None)
    trainers = [trainer_factory(dist=DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    seeds = [t.run.seed for t in trainers]
    assert seeds[0] == trainers[0].cfg.train.seed and seeds[0] != seeds[1]
    orders = [[t.batches.next() for _ in range(3)] for t in trainers]
    assert orders[0] == orders[1]  # one global order of 2 x train.batch_size prompts...
    for batch in orders[0]:
        assert len(batch) == 2 * trainers[0].cfg.train.batch_size
        mine, theirs = batch[0::2], batch[1::2]  # ...each rank takes its slice (as train_step does)
        assert len(mine) == len(theirs) == trainers[0].cfg.train.batch_size and not set(mine) & set(theirs)
    # Same prompts, each rank's seed: different samples; the same seed again: the same samples.
    prompts = [p["input_ids"] for p in trainers[0].prompts[:2]]
    samples = []
    for trainer, seed in zip(trainers + trainers[:1], seeds + seeds[:1]):
        ckpt.seed_everything(seed)
        samples.append(trainer.generate(prompts)[2])
    assert not torch.equal(samples[0], samples[1])
    assert torch.equal(samples[0], samples[2])


def test_row19_negative_kl_alarm(trainer_factory, capsys):
    """A significantly negative KL for 3 steps warns once; noise around 0 does not (guards.py has the
    statistics; here the trainer's wiring of them to the console)."""
    from ppo_cli.ppo.guards import BatchSigns

    trainer = trainer_factory()
    texts = [f"calm river {i}" for i in range(16)]

    def signs(kl: list[float]) -> BatchSigns:
        return BatchSigns(kl_per_sequence=kl, completions=texts, eos_share=1.0, capped_share=0.0)

    noise = [0.2 * math.sin(3 * i) - 0.03 for i in range(16)]  # slightly negative mean, within noise
    negative = [-0.3 + 0.02 * (i % 3) for i in range(16)]

    steps = iter(range(1, 100))

    def console_after(metrics, kl) -> str:
        trainer.guards(next(steps), {"val/ratio": 1.0, **metrics}, signs(kl))
        return " ".join(capsys.readouterr().out.split())

    for _ in range(4):
        assert console_after({"objective/kl": sum(noise) / 16}, noise) == ""
    assert "negative" not in console_after({"objective/kl": -0.28}, negative)
    assert "negative" not in console_after({"objective/kl": -0.28}, negative)
    assert "significantly negative for 3 steps" in console_after({"objective/kl": -0.28}, negative)
    assert "negative" not in console_after({"objective/kl": -0.28}, negative)  # once per streak
    assert console_after({"objective/kl": 0.3}, [0.3] * 16) == ""
    assert "val/ratio=3.000 left [0.5, 2.0]" in console_after(
        {"val/ratio": 3.0, "objective/kl": 1.0}, [1.0] * 16
    )


def test_reward_function_results_are_checked():
    from ppo_rewards import nan, raises, wrong_length

    prompts, completions = ["a", "b"], [" x", " y"]
    for func, spec, message in (
        (
            raises,
            "ppo_rewards:raises",
            "reward_fn=ppo_rewards:raises raised RuntimeError: reward server unreachable",
        ),
        (
            wrong_length,
            "ppo_rewards:wrong_length",
            "reward_fn=ppo_rewards:wrong_length returned 3 scores for 2",
        ),
        (nan, "ppo_rewards:nan", "reward_fn=ppo_rewards:nan returned a non-finite score (nan)"),
        (lambda p, c: None, "m:none", "reward_fn=m:none must return a list of floats, got NoneType"),
    ):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call_reward_function(func, spec, prompts, completions)
    scores = call_reward_function(lambda p, c: [1, 2.5], "m:f", prompts, completions)
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 2.5]
    for spec, message in (
        ("no_colon", "expected the form package.module:function"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("ppo_rewards:nope", "module 'ppo_rewards' has no function 'nope'"),
    ):
        with pytest.raises(UserError, match=message):
            load_reward_function(spec)


def test_entropy_avg_is_the_policy_entropy_over_response_tokens(trainer_factory):
    """policy/entropy_avg is the entropy of softmax(logits / T) (the pad token suppressed, as in
    sampling) averaged over the real response tokens; not the mean -logprob of the sampled tokens."""
    trainer = trainer_factory("generation.temperature=0.7", "ppo.epochs=1", "train.mixed_precision=no")
    assert trainer.fuse_first_pass  # one micro-batch, one epoch: a single value is logged
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:4])
    with torch.no_grad(), trainer.roles.role(POLICY):  # the policy before the update's one step
        logits = trainer.roles.response_logits(ro.query_responses, ro.attention_mask, ro.responses.shape[1])
    logits[..., trainer.tokenizer.pad_token_id] = float("-inf")
    logp = torch.log_softmax(logits.float() / 0.7, -1)
    per_token = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # 0 log 0 = 0 at the pad
    expected = float(per_token[ro.response_mask].mean())

    ro, stats, _ = trainer.update(ro)
    assert stats["policy/entropy_avg"] == pytest.approx(expected, abs=1e-5)
    # Teeth: the mean negative logprob of the sampled tokens is a different number.
    assert abs(float((-ro.logprobs)[ro.response_mask].mean()) - expected) > 1e-2


def test_checkpoint_holds_and_restores_every_rng_state_cuda_included(trainer_factory, monkeypatch):
    """A PPO checkpoint carries what capture_rng sees, the CUDA generators included (simulated: no GPU
    is needed), and resume hands every state back."""
    import random

    import numpy as np

    trainer = trainer_factory()
    saved_cuda = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    cuda_now = {"state": saved_cuda}
    restored_cuda: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in cuda_now["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored_cuda.append)

    ckpt.seed_everything(3)
    before = ckpt.capture_rng()
    trainer.episode = 4
    trainer.loop.save()
    # Move every generator on, then resume from the checkpoint.
    torch.rand(3), random.random(), np.random.rand()
    cuda_now["state"] = [torch.tensor([9], dtype=torch.uint8)]
    trainer.run.resume_from = ckpt.latest_checkpoint(trainer.run.output_dir)
    trainer.episode = 0
    trainer.loop.restore()
    assert trainer.episode == 4

    assert len(restored_cuda) == 1 and len(restored_cuda[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(restored_cuda[0], saved_cuda))
    after = ckpt.capture_rng()
    assert torch.equal(after["torch"], before["torch"])
    assert after["python"] == before["python"] and after["numpy"] == before["numpy"]


def test_logged_lr_with_warmup(trainer_factory):
    """`lr` at step s is the rate step s's updates used, not the next step's. 2 steps, warmup_ratio 0.5
    -> ceil(1.0) = 1 warmup step, then linear decay: the factor at scheduler index 0 is 0/1 = 0, at
    index 1 (2 - 1) / (2 - 1) = 1."""
    trainer = trainer_factory(
        "train.max_steps=2",
        "train.warmup_ratio=0.5",
        "train.lr=1e-3",
        "ppo.epochs=1",
        "generation.max_new_tokens=4",
        "sample_every=0",
    )
    trainer.run.output_dir.mkdir(parents=True)
    trainer.fit()
    metrics = read_metrics(trainer.run.output_dir)
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 1e-3], abs=1e-15)


# ================================================================================================
# The CLI on the tiny model
# ================================================================================================


def ppo_cli_args(tiny, output_dir: Path, *extra: str) -> list[str]:
    return [
        "train-ppo",
        f"data.train={tiny['prompts']}",
        f"output_dir={output_dir}",
        "train.batch_size=4",
        "generation.max_new_tokens=6",
        "ppo.epochs=2",
        "logger.progress=false",
        "logger.plots=false",
        *extra,
    ]


def assert_clean_exit_2(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    text = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_row15_16_lr0_run_never_moves(tiny, adapters, tmp_path, cli, precision):
    """train.lr=0: the policy never moves, so every step sees ratio 1 and KL 0 exactly (rows 15, 16),
    in fp32 and under bf16 (where the shared base is held in bf16 and the trained weights stay fp32);
    the run writes the contract's output tree and metric names."""
    out = tmp_path / "lr0"
    result = cli(
        *ppo_cli_args(
            tiny,
            out,
            f"sft_checkpoint={adapters['sft']}",
            "reward_fn=ppo_cli.tiny.task:positive_reward",
            "train.lr=0",
            "train.max_steps=3",
            "ppo.num_minibatches=2",
            "train.save_every=2",
            f"train.mixed_precision={precision}",
            "ppo.kl_coef=0.1",
            "ppo.missing_eos_score=null",  # the first batch's normalised scores then have mean 0 exactly
        ),
        env=cli_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert_never_moved(metrics)
    for m in metrics:
        assert set(CONTRACT_METRICS) <= m.keys(), set(CONTRACT_METRICS) - m.keys()
        assert m["lr"] == 0.0
    # The default adaptive controller: KL 0 < target, e = -0.2; horizon max(3 x 4 / 10, 2 x 4) = 8
    # episodes, so beta shrinks by 1 - 0.2 * 4 / 8 = 0.9 per step of 4 episodes.
    assert [m["objective/kl_coef"] for m in metrics] == pytest.approx([0.1, 0.09, 0.081], rel=1e-9)
    assert abs(metrics[0]["objective/scores_normalized"]) < 1e-5  # row 17 (first batch defines the scale)
    assert [m["episode"] for m in metrics] == [4, 8, 12]
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    final = out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "ppo_cli.json"):
        assert (final / name).is_file(), name
    assert json.loads((final / "ppo_cli.json").read_text())["stage"] == "ppo"
    assert (final / "value" / "adapter_config.json").is_file()
    assert (final / "value" / "value_head.safetensors").is_file()


def run_in_process(*args: str) -> tuple[int, str, str]:
    """`ppo-cli ARGS` in this process (the imports are paid already): (exit code, stdout, stderr)."""
    result = run_cli_in_process(*args)
    return result.returncode, result.stdout, result.stderr


FAILING = {
    "neither": [],
    "both": ["reward_fn=ppo_cli.tiny.task:positive_reward", "reward_checkpoint={rm}"],
    "not_importable": ["reward_fn=no_such_module_xyz:score"],
    "no_function": ["reward_fn=ppo_rewards:nope"],
    "raises": ["reward_fn=ppo_rewards:raises"],
    "wrong_length": ["reward_fn=ppo_rewards:wrong_length"],
    "nan": ["reward_fn=ppo_rewards:nan"],
}


def run_failing(tiny, adapters, tmp_path, case: str, *extra: str):
    out = tmp_path / case
    args = [a.format(rm=adapters["rm"]) for a in FAILING.get(case, [])]
    code, stdout, stderr = run_in_process(
        *ppo_cli_args(tiny, out, f"model.name_or_path={tiny['model']}", "sample_every=0", *args, *extra)
    )
    return subprocess.CompletedProcess(["ppo-cli"], code, stdout, stderr), out


@pytest.mark.parametrize(
    "case,needles",
    [
        ("neither", ["exactly one reward source", "neither was given"]),
        ("both", ["exactly one reward source", "both were given"]),
        ("not_importable", ["reward_fn=no_such_module_xyz:score: cannot import module 'no_such_module_xyz'"]),
        ("no_function", ["reward_fn=ppo_rewards:nope: module 'ppo_rewards' has no function 'nope'"]),
    ],
)
def test_reward_source_mistakes_exit_2_before_loading(tiny, adapters, tmp_path, monkeypatch, case, needles):
    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded before the reward source was checked")

    monkeypatch.setattr("ppo_cli.ppo.train.load_causal_lm", no_model)
    result, out = run_failing(tiny, adapters, tmp_path, case)
    assert_clean_exit_2(result, *needles)
    assert not out.exists()  # nothing written, no model loaded


@pytest.mark.parametrize(
    "case,needles",
    [
        ("raises", ["reward_fn=ppo_rewards:raises raised RuntimeError: reward server unreachable"]),
        ("wrong_length", ["reward_fn=ppo_rewards:wrong_length returned 5 scores for 4 completions"]),
        ("nan", ["reward_fn=ppo_rewards:nan returned a non-finite score (nan)"]),
    ],
)
def test_bad_reward_function_results_exit_2(tiny, adapters, tmp_path, case, needles):
    result, out = run_failing(tiny, adapters, tmp_path, case)
    assert_clean_exit_2(result, *needles)
    assert not (out / "checkpoints").exists()


def test_nan_loss_stops_with_the_last_checkpoint(tiny, adapters, tmp_path):
    """Scores of 1e30 from step 3 on overflow the losses: the run stops there with exit 2, naming the
    step and the last good checkpoint, which stays intact and resumable."""
    import ppo_rewards

    ppo_rewards._calls["explode_from_third_call"] = 0
    result, out = run_failing(
        tiny,
        adapters,
        tmp_path,
        "explodes",
        "reward_fn=ppo_rewards:explode_from_third_call",
        "ppo.missing_eos_score=null",  # the tiny base never stops: its exploding scores must reach PPO
        "train.max_steps=5",
        "train.save_every=1",
        "train.lr=1e-3",
    )
    last = out / "checkpoints" / "step-000002"
    assert_clean_exit_2(result, "at step 3", str(last))
    assert ckpt.latest_checkpoint(out) == last and ckpt.verify_checkpoint(last) is None
    assert not (out / "final").exists()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_separate_sequence_classifier_reward_model(tiny, tiny_factory, tmp_path):
    """reward_checkpoint = a plain HF sequence-classification model (tiny GPT-2, its own tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    gpt2 = tiny_factory("gpt2")
    rm_dir = tmp_path / "gpt2-rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(gpt2["model"]), num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(str(rm_dir))
    AutoTokenizer.from_pretrained(str(gpt2["model"])).save_pretrained(str(rm_dir))

    out = tmp_path / "separate"
    code, stdout, stderr = run_in_process(
        *ppo_cli_args(
            tiny,
            out,
            f"model.name_or_path={tiny['model']}",
            f"reward_checkpoint={rm_dir}",
            "train.max_steps=2",
            "sample_every=0",
        )
    )
    result = subprocess.CompletedProcess(["ppo-cli"], code, stdout, stderr)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "reward (separate model)" in " ".join(result.stdout.split())
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["objective/scores"]) and m["objective/scores"] != 0 for m in metrics)
    assert (out / "final" / "adapter_model.safetensors").is_file()


# -- checkpoint / resume and final/ ----------------------------------------------------------------
RESUME_ARGS = [
    "train.max_steps=4",
    "train.save_every=2",
    "train.lr=3e-3",
    "ppo.num_minibatches=2",
    "train.grad_accum_steps=2",
    "ppo.kl_controller=adaptive",
    "ppo.kl_coef=0.05",
    "ppo.kl_horizon=100",
    "ppo.missing_eos_score=null",  # the first batch's normalised scores then have mean 0 exactly
    "sample_every=0",
]


@pytest.fixture(scope="module")
def resume_runs(tiny, adapters, tmp_path_factory):
    """An uninterrupted 4-step run A and a run B killed (SIGKILL) after its step-2 checkpoint, then
    resumed with resume=auto. Both use the SFT adapter and the shared RM (reward + critic)."""
    root = tmp_path_factory.mktemp("resume")
    sources = [f"sft_checkpoint={adapters['sft']}", f"reward_checkpoint={adapters['rm']}"]
    args = {name: ppo_cli_args(tiny, root / name, *sources, *RESUME_ARGS) for name in ("A", "B")}
    return kill_and_resume(args["A"], args["B"], root)


def test_resume_after_sigkill_is_identical(resume_runs):
    """Weights, optimizer, scheduler, RNG, data position, KL controller and reward scale all resume."""
    assert_resumed_identically(resume_runs)


def test_without_sft_adapter_the_critic_keeps_training_and_resumes(tiny, adapters, tmp_path):
    """No sft_checkpoint: the reference is the bare base. Its passes must not freeze the value adapter:
    checkpoints hold it, it keeps moving, and a run killed after a checkpoint resumes with resume=auto
    (which checks the checkpoint against the run's trainable parameters)."""
    out = tmp_path / "no-sft"
    args = ppo_cli_args(
        tiny,
        out,
        f"model.name_or_path={tiny['model']}",
        f"reward_checkpoint={adapters['rm']}",
        "train.max_steps=4",
        "train.save_every=1",
        "train.lr=3e-3",
        "ppo.epochs=1",
        "sample_every=0",
    )
    killed = start_cli(*args, log=tmp_path / "logs" / "killed")
    step1 = out / "checkpoints" / "step-000001"
    deadline = time.monotonic() + 300
    while not step1.is_dir():
        assert killed.poll() is None, finish(killed).stderr[-3000:]
        assert time.monotonic() < deadline, "no step-1 checkpoint"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    finish(killed)
    first = ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).trainable  # step 1 or a later one
    resumed = finish(start_cli(*args, "resume=auto", log=tmp_path / "logs" / "resumed"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed at" in resumed.stdout

    last = ckpt.load_checkpoint(out / "checkpoints" / "step-000004").trainable
    value_lora = [k for k in first if ".value." in k and "lora_" in k]
    assert value_lora and first.keys() == last.keys()
    assert any(not torch.equal(first[k], last[k]) for k in value_lora)  # the value adapter trained on


def test_first_ratio_is_one_with_minibatches(resume_runs):
    """Normal lr, 2 minibatches x 2 micro-batches: the first minibatch of every step still sees ratio 1
    (old logprobs come from the same code path and micro-batch shape); KL 0 at step 1 (row 16); the
    first batch's normalised scores have mean 0 (row 17); the policy does move afterwards."""
    metrics = read_metrics(resume_runs["A"][1])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["policy/first_ratio"] == 1.0 for m in metrics), [m["policy/first_ratio"] for m in metrics]
    assert metrics[0]["objective/kl"] == 0.0
    assert abs(metrics[0]["objective/scores_normalized"]) < 1e-5 and metrics[0]["objective/scores"] != 0
    assert any(m["objective/kl"] != 0.0 for m in metrics[1:])
    assert any(m["val/ratio"] != 1.0 for m in metrics)
    coefs = [m["objective/kl_coef"] for m in metrics]
    assert len(set(coefs)) == 4  # the adaptive controller moved every step (its state is resumed above)
    assert coefs[0] == 0.05  # logged: the beta the step used, the initial one at step 1 (not the next step's)


def test_logged_lr_is_the_rate_each_step_used(resume_runs):
    """`lr` at step s is the rate step s's updates used (the resumed run B logs the same: see above).
    train-ppo's defaults: no warmup, linear decay; train.lr=3e-3 over 4 steps: the factor at scheduler
    index i is (4 - i) / 4 = 1, 0.75, 0.5, 0.25 (see test_logged_lr_with_warmup for a warmup)."""
    metrics = read_metrics(resume_runs["A"][1])
    assert [m["lr"] for m in metrics] == pytest.approx([3e-3, 2.25e-3, 1.5e-3, 0.75e-3], abs=1e-12)


def test_final_loads_with_plain_transformers_and_peft(tiny, adapters, resume_runs):
    """final/ is the policy for plain transformers + peft: the same response logits as the run's policy
    (its last checkpoint loaded into the roles); final/value/ holds the critic."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = resume_runs["A"][1]
    final = run_dir / "final"
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32), str(final)
    ).eval()

    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"])
    last = ckpt.load_checkpoint(run_dir / "checkpoints" / "step-000004")
    ckpt.load_trainable_state(roles, last.trainable, "step-000004")
    ids = torch.tensor(
        [tokenizer("Describe the river: good happy river.")["input_ids"] + [tokenizer.eos_token_id]]
    )
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with roles.role(POLICY):
            ours = roles.response_logits(ids, mask, 6)
        theirs = plain(input_ids=ids, attention_mask=mask).logits[:, -7:-1]
        with roles.role("reference"):
            sft = roles.response_logits(ids, mask, 6)
    vocab = theirs.shape[-1]  # the run's model has one more row: the pad token load_tokenizer added
    torch.testing.assert_close(ours[..., :vocab], theirs, atol=1e-5, rtol=0)
    assert (ours - sft).abs().max() > 1e-3  # PPO moved the policy: this is not the SFT adapter again

    value_dir = final / "value"
    assert (value_dir / "adapter_config.json").is_file()
    head = load_file(value_dir / "value_head.safetensors")
    torch.testing.assert_close(head["weight"], last.trainable["value_head.weight"], atol=0, rtol=0)
