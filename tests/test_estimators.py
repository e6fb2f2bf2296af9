"""The advantage estimators (ppo.advantage_estimator): each one's arithmetic by hand, the settings each
resolves to, and train-ppo with every critic-free one: groups of samples per prompt, no critic, the lr=0
invariants, exact resume. The whitening over ranks that reinforce_plus_plus uses is GAE's
(test_distributed.py::test_helpers_on_two_gloo_ranks)."""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch
from conftest import run_cli_in_process
from ppo_helpers import (
    build_tiny_roles,
    finish,
    make_trainer,
    ppo_config,
    read_metrics,
    start_cli,
    tiny_adapters,
)
from safetensors.torch import load_file

from ppo_cli import checkpoint as ckpt
from ppo_cli import rlhf
from ppo_cli.errors import UserError
from ppo_cli.ppo.estimators import Estimation, critic_free_advantages, resolve_estimation


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-5)


CRITIC_FREE = ["grpo", "rloo", "reinforce_plus_plus"]

# ---------------------------------------------------------------------------------------------
# Pure functions, hand-computed


def test_group_advantages_grpo_and_dr_grpo():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3); group 2: all equal -> 0
    std = math.sqrt(14 / 3)
    expected = [-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0]
    assert rlhf.group_advantages(returns, 4).tolist() == pytest.approx(expected, abs=1e-5)
    unscaled = rlhf.group_advantages(returns, 4, scale_by_std=False)
    assert unscaled.tolist() == [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]


def test_leave_one_out_baseline_excludes_the_sample():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # the others' means: 11/3, 10/3, 10/3... : (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]
    assert rlhf.leave_one_out_advantages(returns, 4).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2"):
        rlhf.leave_one_out_advantages(returns, 1)
    with pytest.raises(ValueError):
        rlhf.group_advantages(returns, 3)  # 4 rows are not groups of 3


def test_reward_to_go_with_discount_and_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert rlhf.reward_to_go(rewards, mask).tolist() == [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]
    # gamma 0.5: 1 + 0.5 (2 + 0.5 * 3) = 2.75, 2 + 1.5 = 3.5; 4 + 2.5 = 6.5
    assert rlhf.reward_to_go(rewards, mask, 0.5).tolist() == [[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]]


def test_kl_estimators_k1_k2_k3():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])  # x = 0.5, -1, (pad)
    assert rlhf.kl_estimate(logprobs, ref, mask, "k1").tolist() == [[0.5, -1.0, 0.0]]
    assert rlhf.kl_estimate(logprobs, ref, mask, "k2").tolist() == [[0.125, 0.5, 0.0]]
    k3 = rlhf.kl_estimate(logprobs, ref, mask, "k3")[0].tolist()
    assert k3 == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1, 0.0])


def test_loss_aggregations():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(rlhf.aggregate_loss(losses, mask, "token_mean")) == pytest.approx(10 / 4)
    assert float(rlhf.aggregate_loss(losses, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    # Dr. GRPO: per-sequence sums over a constant (max_tokens 4), then the mean over sequences
    assert float(rlhf.aggregate_loss(losses, mask, "seq_mean_token_sum", 4)) == pytest.approx(
        (6 / 4 + 4 / 4) / 2
    )


def estimation(estimator: str, group: int = 2, **kw) -> Estimation:
    fields = {"kl_in": "reward", "kl_estimator": "k1", "loss_aggregation": "token_mean", "whiten": False,
              "norm_adv_by_std": True, **kw}  # fmt: skip
    return Estimation(estimator, group, **fields)


def test_group_baselines_with_uneven_eos_use_each_sequences_own_kl():
    """Two samples of one prompt, one stopping after 3 tokens and one after 1: each return is its score
    minus beta x ITS OWN summed KL; the advantage sits on its real tokens only."""
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logprobs, ref = torch.full((2, 3), -1.0), torch.full((2, 3), -1.5)  # k1 = 0.5 per token
    rewards, _ = rlhf.shape_rewards(scores, logprobs, ref, mask, 0.2)
    # returns 1 - 0.2 * 0.5 * 3 = 0.7 and 0 - 0.2 * 0.5 * 1 = -0.1; leave-one-out: +-0.8
    adv, returns = critic_free_advantages(estimation("rloo"), rewards, mask)
    close(adv, [[0.8, 0.8, 0.8], [-0.8, 0.0, 0.0]])
    close(returns, [[0.7, 0.7, 0.7], [-0.1, 0.0, 0.0]])
    # GRPO: mean 0.3, std of (0.7, -0.1) = 0.8 / sqrt(2): +-1/sqrt(2)
    adv, _ = critic_free_advantages(estimation("grpo"), rewards, mask)
    close(adv, [[2**-0.5] * 3, [-(2**-0.5), 0.0, 0.0]])
    # REINFORCE++: the reward-to-go at each token: 1 - 0.1 x (3, 2, 1); -0.1
    adv, _ = critic_free_advantages(estimation("reinforce_plus_plus", 1), rewards, mask)
    close(adv, [[0.7, 0.8, 0.9], [-0.1, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# Settings


def resolved(*overrides: str, tmp_path=None) -> Estimation:
    from ppo_cli.app import precheck

    cfg = precheck(
        "train_ppo", ["model.name_or_path=x", "data.train=x", "reward_fn=m:f", *overrides], "train-ppo"
    )
    return resolve_estimation(cfg.ppo, cfg.generation)


def test_each_estimator_has_its_own_defaults_and_keys_override_them():
    gae = resolved()
    assert (gae.critic, gae.kl_in, gae.kl_estimator, gae.loss_aggregation, gae.whiten) == (
        True, "reward", "k1", "token_mean", True)  # fmt: skip
    grpo = resolved("ppo.advantage_estimator=grpo", "generation.samples_per_prompt=4")
    assert (grpo.critic, grpo.kl_in, grpo.kl_estimator, grpo.loss_aggregation, grpo.whiten) == (
        False, "loss", "k3", "seq_mean_token_mean", False)  # fmt: skip
    rloo = resolved("ppo.advantage_estimator=rloo", "generation.samples_per_prompt=2")
    assert (rloo.kl_in, rloo.kl_estimator, rloo.loss_aggregation, rloo.whiten) == (
        "reward",
        "k1",
        "token_mean",
        False,
    )
    rpp = resolved("ppo.advantage_estimator=reinforce_plus_plus")
    assert (rpp.group_size, rpp.kl_in, rpp.whiten) == (1, "reward", True)
    dr = resolved("ppo.advantage_estimator=grpo", "generation.samples_per_prompt=4", "ppo.norm_adv_by_std=false",
                  "ppo.loss_aggregation=seq_mean_token_sum", "ppo.kl_in=reward", "ppo.whiten_advantages=true")  # fmt: skip
    assert (dr.norm_adv_by_std, dr.loss_aggregation, dr.kl_in, dr.kl_estimator, dr.whiten) == (
        False, "seq_mean_token_sum", "reward", "k1", True)  # fmt: skip


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_refuse_one_sample_per_prompt(estimator):
    with pytest.raises(UserError, match="generation.samples_per_prompt=1"):
        resolved(f"ppo.advantage_estimator={estimator}")


def test_one_sample_per_prompt_is_an_exit_2_before_the_model_loads(tiny, tmp_path):
    out = tmp_path / "run"
    result = run_cli_in_process(
        "train-ppo", f"model.name_or_path={tmp_path / 'no-such-model'}", f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward", "ppo.advantage_estimator=grpo", f"output_dir={out}",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "ppo.advantage_estimator=grpo" in text and "generation.samples_per_prompt=4" in text
    assert "Traceback" not in text and not out.exists()


def test_unknown_estimator_names_the_choices(tiny, tmp_path):
    result = run_cli_in_process(
        "train-ppo", f"model.name_or_path={tiny['model']}", f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward", "ppo.advantage_estimator=ppo2", f"output_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "gae, grpo, rloo, reinforce_plus_plus" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The trainer: groups and no critic


@pytest.fixture(scope="module")
def adapters(tiny):
    return tiny_adapters(tiny)


def test_a_rollout_holds_each_prompts_samples_in_consecutive_rows(tiny, adapters, tmp_path):
    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], None, critic=False)
    cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", "ppo.advantage_estimator=rloo",
                     "generation.samples_per_prompt=3", "train.batch_size=2")  # fmt: skip
    length = lambda qr, mask, prompts, completions: mask.sum(1).float()  # noqa: E731
    trainer = make_trainer(cfg, roles, tokenizer, reward=length)
    assert roles.value_head is None and not trainer.value_params
    assert not any(".value." in n for n, _ in roles.model.named_parameters())
    trainer.train_step(1)
    ro = trainer.last_rollout
    assert len(ro.prompts) == 6 and ro.values is None
    assert ro.prompts[0:3] == [ro.prompts[0]] * 3 and ro.prompts[3:6] == [ro.prompts[3]] * 3
    assert ro.prompts[0] != ro.prompts[3]
    assert trainer.last_metrics["episode"] == 6
    assert "loss/value_avg" not in trainer.last_metrics


# ---------------------------------------------------------------------------------------------
# The CLI on the tiny model


def cli_args(tiny, adapters, out, *extra: str) -> list[str]:
    return [
        "train-ppo", f"sft_checkpoint={adapters['sft']}", f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward", "train.device=cpu", "train.batch_size=2",
        "generation.samples_per_prompt=4", "generation.max_new_tokens=8", "logger.progress=false", "logger.plots=false",
        "sample_every=0", f"output_dir={out}", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_lr0_invariants_and_no_critic(tiny, adapters, tmp_path, estimator):
    """train.lr=0 with each critic-free estimator: ratio 1, KL 0, no clipping at every step; no value
    adapter or head anywhere (checkpoint, final/)."""
    out = tmp_path / estimator
    result = run_cli_in_process(
        *cli_args(
            tiny,
            adapters,
            out,
            f"ppo.advantage_estimator={estimator}",
            "train.lr=0",
            "train.max_steps=2",
            "ppo.num_minibatches=2",
        )  # fmt: skip
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = read_metrics(out)
    assert [m["episode"] for m in metrics] == [8, 16]
    for m in metrics:
        assert m["objective/kl"] == 0.0 and m["policy/approxkl_avg"] == 0.0, m
        assert m["policy/clipfrac_avg"] == 0.0 and m["val/ratio"] == 1.0 and m["policy/first_ratio"] == 1.0, m
        assert m.get("loss/kl_avg", 0.0) == 0.0
    trainable = ckpt.load_checkpoint(out / "checkpoints" / "step-000002").trainable
    assert trainable and not [n for n in trainable if ".value." in n or "value_head" in n]
    assert not (out / "final" / "value").exists()
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_grpo_learns_and_resumes_exactly(tiny, adapters, tmp_path):
    """GRPO (KL as a k3 loss term) at a real learning rate: a run killed after its step-2 checkpoint and
    resumed ends with the same weights and metrics as an uninterrupted one."""
    # the tiny model rarely stops within 8 tokens: every response would score the missing-EOS -1
    common = ["ppo.advantage_estimator=grpo", "train.lr=3e-3", "train.max_steps=4", "train.save_every=2",
              "ppo.missing_eos_score=null"]  # fmt: skip
    full = start_cli(*cli_args(tiny, adapters, tmp_path / "A", *common), log=tmp_path / "logs" / "A")
    killed = start_cli(*cli_args(tiny, adapters, tmp_path / "B", *common), log=tmp_path / "logs" / "B")
    step2 = tmp_path / "B" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 500
    while not step2.is_dir():
        assert killed.poll() is None, finish(killed).stderr[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    finish(killed)
    resumed = start_cli(*cli_args(tiny, adapters, tmp_path / "B", *common), "resume=auto",
                        log=tmp_path / "logs" / "B2")  # fmt: skip
    for proc in (full, resumed):
        result = finish(proc)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    a, b = (load_file(tmp_path / r / "final" / "adapter_model.safetensors") for r in ("A", "B"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def comparable(run):
        return [
            {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in read_metrics(run)
        ]

    metrics = comparable(tmp_path / "A")
    assert metrics == comparable(tmp_path / "B")
    assert metrics[-1]["objective/kl"] != 0.0 and metrics[-1]["loss/kl_avg"] > 0.0  # it moved
