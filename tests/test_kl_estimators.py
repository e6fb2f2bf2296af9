"""The KL estimators (ppo.kl_estimator): which divergence each one's value and gradient follow, proved by
exact expectations over a small categorical distribution; the clamps; the reward's estimators unchanged;
k1 in the loss refused (exit 2 before any model loads); the trainer hands k3_iw the rollout's logprobs.

The gradient checked is the one the trainer takes: the sampled tokens are fixed, only their log-probs
move, so the expected gradient over tokens x ~ q is sum_x q(x) * grad estimate(x), q held constant (no
score-function term). The "analytic" gradients are the closed forms for pi = softmax(theta):

    d KL(pi || ref) / d theta_j = pi_j * (log(pi_j / ref_j) - KL(pi || ref))
    d KL(ref || pi) / d theta_j = pi_j - ref_j
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli_in_process
from ppo_helpers import build_tiny_roles, make_trainer, ppo_config, tiny_adapters

from ppo_cli import rlhf
from ppo_cli.choices import KLEstimator
from ppo_cli.errors import UserError
from ppo_cli.ppo.estimators import resolve_estimation
from ppo_cli.rlhf.rewards import KL_ESTIMATORS

# Four outcomes; pi (the policy), ref and mu (an older policy that sampled the tokens) all differ, and
# no log-ratio comes near the clamps.
LOGITS = [0.3, -0.2, 0.5, 0.1]
REF = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
MU = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
ALL = torch.ones(1, 4, dtype=torch.bool)


def policy() -> tuple[torch.Tensor, torch.Tensor]:
    """(theta with gradient, log pi = log_softmax(theta)), float64."""
    theta = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    return theta, torch.log_softmax(theta, -1)


def per_outcome(log_pi: torch.Tensor, name: str, old: torch.Tensor | None = None) -> torch.Tensor:
    """The estimator at each of the four outcomes (one row of four 'tokens')."""
    return rlhf.kl_estimate(log_pi[None], REF.log()[None], ALL, name, None if old is None else old[None])[0]


def expectation(q: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_x q(x) values(x), the sampling distribution q held constant (tokens are fixed samples)."""
    return (q.detach() * values).sum()


def grad(f: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(f, theta)[0]


def forward_kl(pi: torch.Tensor) -> float:
    return float((pi * (pi / REF).log()).sum())


def grad_forward_kl(pi: torch.Tensor) -> torch.Tensor:
    """d KL(pi || ref) / d theta, by hand (see the module docstring)."""
    return pi * ((pi / REF).log() - forward_kl(pi))


def grad_reverse_kl(pi: torch.Tensor) -> torch.Tensor:
    """d KL(ref || pi) / d theta, by hand: the softmax cross-entropy gradient."""
    return pi - REF


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_the_closed_forms_are_autograds():
    """The hand-derived gradients above are those of the divergences (so the tests below compare with
    the right thing)."""
    theta, log_pi = policy()
    pi = log_pi.exp()
    close(grad((pi * (log_pi - REF.log())).sum(), theta), grad_forward_kl(pi.detach()))
    theta, log_pi = policy()
    close(grad((REF * (REF.log() - log_pi)).sum(), theta), grad_reverse_kl(log_pi.exp().detach()))


def test_k1_has_the_kl_as_value_and_zero_expected_gradient():
    """E_pi[k1] = KL(pi || ref), but E_pi[grad k1] = E_pi[grad log pi] = 0: no penalty in the loss."""
    theta, log_pi = policy()
    pi = log_pi.exp()
    e = expectation(pi, per_outcome(log_pi, "k1"))
    assert float(e.detach()) == pytest.approx(forward_kl(pi.detach()), rel=1e-12)
    close(grad(e, theta), torch.zeros(4, dtype=torch.float64))


def test_k2_gradient_is_that_of_kl_pi_ref():
    """E_pi[grad x^2/2] = sum_x grad pi(x) log(pi/ref)(x) = grad KL(pi || ref); its value is biased."""
    theta, log_pi = policy()
    pi = log_pi.exp()
    e = expectation(pi, per_outcome(log_pi, "k2"))
    close(grad(e, theta), grad_forward_kl(pi.detach()))
    assert float(e.detach()) != pytest.approx(forward_kl(pi.detach()), rel=1e-3)


def test_k3_value_is_kl_pi_ref_but_its_gradient_is_that_of_kl_ref_pi():
    """E_pi[k3] = sum_x (ref - pi + pi log(pi/ref)) = KL(pi || ref); E_pi[grad k3] = sum_x (pi - ref) grad
    log pi = -sum_x ref grad log pi = grad KL(ref || pi): the reverse direction (GRPO's, verl's)."""
    theta, log_pi = policy()
    pi = log_pi.exp()
    e = expectation(pi, per_outcome(log_pi, "k3"))
    assert float(e.detach()) == pytest.approx(forward_kl(pi.detach()), rel=1e-12)
    g = grad(e, theta)
    close(g, grad_reverse_kl(pi.detach()))
    assert not torch.allclose(g, grad_forward_kl(pi.detach()), atol=1e-3)  # the directions do differ here


def test_k3_plus_has_k3s_value_and_k2s_gradient():
    """verl's k3+: per token the value is k3's and the gradient k2's, exactly; so E_pi of its gradient is
    grad KL(pi || ref) while its value estimates KL(pi || ref) without bias."""
    _, log_pi = policy()
    assert torch.equal(per_outcome(log_pi, "k3_plus"), per_outcome(log_pi, "k3"))
    for x in range(4):  # per outcome: the gradient of the straight-through term is k2's
        theta_a, log_a = policy()
        theta_b, log_b = policy()
        close(grad(per_outcome(log_a, "k3_plus")[x], theta_a), grad(per_outcome(log_b, "k2")[x], theta_b))
    theta, log_pi = policy()
    pi = log_pi.exp()
    e = expectation(pi, per_outcome(log_pi, "k3_plus"))
    assert float(e.detach()) == pytest.approx(forward_kl(pi.detach()), rel=1e-12)
    close(grad(e, theta), grad_forward_kl(pi.detach()))


def test_k3_iw_is_kl_pi_ref_in_value_and_gradient_from_an_older_policys_samples():
    """Tokens sampled from mu != pi (the policy of the rollout, pi having moved within the PPO epochs):
    E_mu[(pi/mu) k3] = E_pi[k3] = KL(pi || ref) as a function of theta, so its gradient, the ratio's
    included, is grad KL(pi || ref) too. Without the weight, k3 and k3_plus are biased off-policy."""
    theta, log_pi = policy()
    pi = log_pi.exp()
    e = expectation(MU, per_outcome(log_pi, "k3_iw", MU.log()))
    assert float(e.detach()) == pytest.approx(forward_kl(pi.detach()), rel=1e-12)
    close(grad(e, theta), grad_forward_kl(pi.detach()))
    # the same samples without the importance weight: neither value nor gradient is the KL's
    theta, log_pi = policy()
    unweighted = expectation(MU, per_outcome(log_pi, "k3"))
    assert float(unweighted.detach()) != pytest.approx(forward_kl(pi.detach()), rel=1e-2)
    theta, log_pi = policy()
    plus = grad(expectation(MU, per_outcome(log_pi, "k3_plus")), theta)
    assert not torch.allclose(plus, grad_forward_kl(pi.detach()), atol=1e-3)


def test_k3_iw_on_policy_is_k3_plus_token_by_token():
    """Sampled by pi itself (old = log pi, detached; the first minibatch of a rollout), the weight is 1
    and d[(pi/old) k3] = (k3 + 1 - ref/pi) grad log pi = x grad log pi: k3's value, k2's gradient."""
    _, log_pi = policy()
    assert torch.equal(per_outcome(log_pi, "k3_iw", log_pi.detach()), per_outcome(log_pi, "k3"))
    assert torch.equal(per_outcome(log_pi, "k3_iw"), per_outcome(log_pi, "k3"))  # None: its own
    for x in range(4):
        theta_a, log_a = policy()
        theta_b, log_b = policy()
        close(grad(per_outcome(log_a, "k3_iw", log_a.detach())[x], theta_a),
              grad(per_outcome(log_b, "k2")[x], theta_b))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The clamps, pads, names


def test_k3_is_clamped_at_extreme_log_ratios():
    """x = -39 gave e^39 = 8.7e16 and x = -100 an inf in fp32; now the log-ratio is clamped to +-20
    and k3 to at most 10 (verl's low_var_kl). Where the clamp binds k3 has no gradient; k3_plus keeps
    k2's (x grad log pi); below the clamp nothing changes."""
    x = torch.tensor([[-39.0, -100.0, 39.0, -2.0, 0.5]])
    logprobs = x.clone().requires_grad_(True)
    ref, mask = torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool)
    for name in ("k3", "k3_plus", "k3_iw"):
        k = rlhf.kl_estimate(logprobs, ref, mask, name, x)  # k3_iw: sampled by this policy, weight 1
        assert torch.isfinite(k).all(), name
        expected = [10.0, 10.0, 10.0, math.exp(2.0) - 3.0, math.exp(-0.5) - 0.5]
        assert k[0].tolist() == pytest.approx(expected, rel=1e-6), name
    k3_grad = torch.autograd.grad(rlhf.kl_estimate(logprobs, ref, mask, "k3").sum(), logprobs)[0]
    assert k3_grad[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert k3_grad[0, 3].item() == pytest.approx(1 - math.exp(2.0), rel=1e-6)  # d k3 / dx = 1 - e^-x
    plus_grad = torch.autograd.grad(rlhf.kl_estimate(logprobs, ref, mask, "k3_plus").sum(), logprobs)[0]
    assert plus_grad[0].tolist() == pytest.approx(x[0].tolist())  # k2's: x
    # k3_iw's weight: a log-ratio of 50 to the sampling policy is clamped to 20 before the exp
    far = rlhf.kl_estimate(torch.tensor([[-2.0]]), torch.zeros(1, 1), torch.ones(1, 1), "k3_iw",
                           torch.tensor([[-52.0]]))  # fmt: skip
    assert far.item() == pytest.approx(math.exp(20.0) * (math.exp(2.0) - 3.0), rel=1e-6)
    # k1 and k2 are not clamped
    assert rlhf.kl_estimate(x, ref, mask, "k1")[0, 0].item() == -39.0
    assert rlhf.kl_estimate(x, ref, mask, "k2")[0, 0].item() == pytest.approx(39.0**2 / 2)


@pytest.mark.parametrize("name", KL_ESTIMATORS)
def test_pads_give_zero_and_no_nan_gradient(name):
    logprobs = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    ref, old = torch.tensor([[-0.5, -1.0]]), torch.tensor([[-1.2, float("nan")]])
    mask = torch.tensor([[1, 0]])
    k = rlhf.kl_estimate(logprobs, ref, mask, name, old)
    assert k[0, 1].item() == 0.0 and torch.isfinite(k).all()
    (g,) = torch.autograd.grad(k.sum(), logprobs)
    assert g[0, 1].item() == 0.0 and torch.isfinite(g).all()


def test_the_config_choices_are_the_estimators():
    assert [m.value for m in KLEstimator] == list(KL_ESTIMATORS)
    with pytest.raises(ValueError, match="k3_plus"):
        rlhf.kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k4")


def test_in_the_reward_k1_k2_k3_are_unchanged_and_the_k3_variants_are_k3():
    """shape_rewards: -beta * k per token, the score on the last real token; k3_plus and k3_iw differ
    from k3 only in a gradient the rewards do not have."""
    scores = torch.tensor([1.0])
    logprobs, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])  # x = 0.5, -1, (pad)
    expected = {
        "k1": [0.5, -1.0],
        "k2": [0.125, 0.5],
        "k3": [math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0],
    }
    for name, k in expected.items():
        rewards, non_score = rlhf.shape_rewards(scores, logprobs, ref, mask, 0.1, name)
        assert non_score[0].tolist() == pytest.approx([-0.1 * k[0], -0.1 * k[1], 0.0], rel=1e-6), name
        assert rewards[0].tolist() == pytest.approx([-0.1 * k[0], 1.0 - 0.1 * k[1], 0.0], rel=1e-6), name
    k3 = rlhf.shape_rewards(scores, logprobs, ref, mask, 0.1, "k3")
    for name in ("k3_plus", "k3_iw"):
        same = rlhf.shape_rewards(scores, logprobs, ref, mask, 0.1, name)
        assert all(torch.equal(a, b) for a, b in zip(same, k3)), name


# ---------------------------------------------------------------------------------------------
# Settings: k1 refused in the loss


def resolved(*overrides: str):
    from ppo_cli.app import precheck

    cfg = precheck(
        "train_ppo", ["model.name_or_path=x", "data.train=x", "reward_fn=m:f", *overrides], "train-ppo"
    )
    return resolve_estimation(cfg.ppo, cfg.generation)


def test_k1_is_refused_in_the_loss_only():
    with pytest.raises(UserError, match=r"ppo.kl_in=loss with ppo.kl_estimator=k1 adds no KL penalty") as e:
        resolved("ppo.kl_in=loss", "ppo.kl_estimator=k1")
    for alternative in ("k3_plus", "k2", "k3_iw", "ppo.kl_in=reward"):
        assert alternative in str(e.value)
    grpo = ("ppo.advantage_estimator=grpo", "generation.samples_per_prompt=2")
    with pytest.raises(UserError, match=r"ppo.kl_in=loss \(ppo.advantage_estimator=grpo's default\)"):
        resolved(*grpo, "ppo.kl_estimator=k1")
    assert resolved("ppo.kl_in=reward", "ppo.kl_estimator=k1").kl_estimator == "k1"
    assert resolved(*grpo, "ppo.kl_in=reward", "ppo.kl_estimator=k1").kl_estimator == "k1"
    for name in ("k2", "k3", "k3_plus", "k3_iw"):
        for kl_in in ("loss", "reward"):
            est = resolved(f"ppo.kl_in={kl_in}", f"ppo.kl_estimator={name}")
            assert (est.kl_in, est.kl_estimator) == (kl_in, name)


def test_k1_in_the_loss_is_one_paragraph_exit_2_before_the_model_loads(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    out = tmp_path / "run"
    result = run_cli_in_process(
        "train-ppo", f"model.name_or_path={tmp_path / 'no-such-model'}", f"data.train={prompts}",
        "reward_fn=ppo_cli.tiny.task:positive_reward", "ppo.kl_in=loss", "ppo.kl_estimator=k1",
        f"output_dir={out}",
    )  # fmt: skip
    everything = result.stdout + result.stderr
    assert result.returncode == 2, everything
    assert "Traceback" not in everything
    paragraph = result.stderr.strip()
    assert paragraph.startswith("ppo-cli train-ppo: error: ppo.kl_in=loss with ppo.kl_estimator=k1")
    assert "\n" not in paragraph, paragraph
    assert "no-such-model" not in everything  # refused before the model was looked for
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The trainer


def test_the_trainer_gives_the_kl_term_the_rollouts_logprobs(tiny, tmp_path, monkeypatch):
    """With the KL in the loss, kl_estimate gets the new logprobs (with gradient) and the old ones, the
    policy's that sampled the rollout (k3_iw's weight): equal to the new ones on the first minibatch,
    before any update (detail 15)."""
    adapters = tiny_adapters(tiny)
    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], None, critic=False)
    cfg = ppo_config(tiny["model"], tiny["prompts"], tmp_path / "run", "ppo.advantage_estimator=grpo",
                     "generation.samples_per_prompt=2", "train.batch_size=2", "ppo.num_minibatches=2",
                     "ppo.kl_estimator=k3_iw", "train.lr=1e-2", "ppo.missing_eos_score=null")  # fmt: skip
    calls, real = [], rlhf.kl_estimate

    def spy(logprobs, ref_logprobs, mask, estimator="k1", old_logprobs=None):
        calls.append((estimator, logprobs, old_logprobs))
        return real(logprobs, ref_logprobs, mask, estimator, old_logprobs)

    monkeypatch.setattr(rlhf, "kl_estimate", spy)
    # scores that differ within a group, so that the policy moves
    varied = lambda qr, mask, prompts, completions: torch.tensor([float(len(c)) for c in completions])  # noqa: E731
    trainer = make_trainer(cfg, roles, tokenizer, reward=varied)
    trainer.train_step(1)
    assert len(calls) == cfg.ppo.epochs * 2  # one per micro-batch
    for estimator, new, old in calls:
        assert estimator == "k3_iw" and new.requires_grad and old is not None and not old.requires_grad
    _, new, old = calls[0]
    assert torch.equal(new.detach(), old)
    assert not all(torch.equal(new.detach(), old) for _, new, old in calls[2:])  # later epochs moved
    assert math.isfinite(trainer.last_metrics["loss/kl_avg"])
