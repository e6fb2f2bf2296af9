"""A minibatch split into micro-batches (grad_accum_steps > 1, or several ranks) gives the gradient of the
whole minibatch's loss: a token of a short response weighs what a token of a long one does, whatever
the split. Responses of 6, 6, 1 and 1 tokens make a wrong weighting visible: dividing each micro-batch's
token sum by its own token count would give a token of a 1-token row 1/4 of the weight instead of 1/14.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loss_weighting_worker import UPDATE_OVERRIDES, update_gradients
from ppo_helpers import TESTS_DIR, build_tiny_roles, cli_env, make_trainer, ppo_config, tiny_adapters

from ppo_cli import checkpoint as ckpt
from ppo_cli import rlhf

LENGTHS = [6, 6, 1, 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tiny):
    return tiny_adapters(tiny)


def make(tiny, adapters, out: Path, *overrides: str):
    roles, tokenizer = build_tiny_roles(tiny["model"], adapters["sft"], adapters["rm"])
    cfg = ppo_config(tiny["model"], tiny["prompts"], out, *UPDATE_OVERRIDES, *overrides)
    return make_trainer(cfg, roles, tokenizer)


def fixed_rollout(trainer):
    """A rollout of 4 prompts whose responses count LENGTHS real tokens (old logprobs and values in it)."""
    trainer.fuse_first_pass = False  # the rollout carries its own old logprobs and values
    ckpt.seed_everything(0)
    ro, _ = trainer.rollout(trainer.prompts[:4])
    mask = torch.zeros_like(ro.response_mask)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = True
    return dataclasses.replace(ro, response_mask=mask)


def assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert any(float(g.abs().max()) > 1e-4 for g in a)  # a gradient that says something
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "estimation",
    [
        ("ppo.kl_in=reward",),
        ("ppo.kl_in=loss", "ppo.kl_estimator=k2"),
        ("ppo.kl_in=loss", "ppo.kl_estimator=k2", "ppo.loss_aggregation=seq_mean_token_mean"),
    ],
    ids=["token_mean", "kl_in_loss", "seq_mean_token_mean"],
)
def test_ppo_gradient_does_not_depend_on_grad_accum(tiny, adapters, tmp_path, estimation):
    trainer = make(tiny, adapters, tmp_path / "run", "train.batch_size=4", *estimation)
    ro = fixed_rollout(trainer)
    grads = {}
    for accum in (1, 2, 4):
        trainer.micro = trainer.minibatch // accum
        grads[accum] = update_gradients(trainer, ro)
    assert_same_gradients(grads[1], grads[2])
    assert_same_gradients(grads[1], grads[4])


def test_micro_batch_losses_add_up_to_the_minibatch_loss():
    """By hand: token losses 1 (six tokens, rows 0 and 1) and 10 (one token, rows 2 and 3): the token
    mean is (12 * 1 + 2 * 10) / 14; the two micro-batches [0, 1] and [2, 3] give 12/14 and 20/14."""
    losses = torch.tensor([[1.0] * 6, [1.0] * 6, [10.0] + [0.0] * 5, [10.0] + [0.0] * 5])
    mask = torch.tensor([[1] * 6, [1] * 6, [1] + [0] * 5, [1] + [0] * 5], dtype=torch.bool)
    whole = rlhf.aggregate_loss(losses, mask)
    assert float(whole) == pytest.approx(32 / 14)
    scale = rlhf.LossScale(tokens=14, rows=4)
    parts = [rlhf.aggregate_loss(losses[r], mask[r], scale=scale) for r in (slice(0, 2), slice(2, 4))]
    assert [float(p) for p in parts] == pytest.approx([12 / 14, 20 / 14])
    # The per-sequence modes divide by the minibatch's rows: (1 + 1) / 4 and (10 + 10) / 4.
    seq = [
        rlhf.aggregate_loss(losses[r], mask[r], "seq_mean_token_mean", scale=scale)
        for r in (slice(0, 2), slice(2, 4))
    ]
    assert [float(p) for p in seq] == pytest.approx([2 / 4, 20 / 4])
    assert float(sum(seq)) == pytest.approx(float(rlhf.aggregate_loss(losses, mask, "seq_mean_token_mean")))


@pytest.mark.slow
def test_ppo_gradient_on_two_ranks_equals_one_rank(tiny, adapters, tmp_path):
    """Rank 0 holds the two 6-token rows, rank 1 the two 1-token rows: the gradient averaged over the
    ranks equals the one-rank gradient of all four rows."""
    estimation = ("ppo.kl_in=loss", "ppo.kl_estimator=k2")
    trainer = make(tiny, adapters, tmp_path / "one", "train.batch_size=4", *estimation)
    ro = fixed_rollout(trainer)
    one_rank = update_gradients(trainer, ro)
    rollout = tmp_path / "rollout.pt"
    weights = [p.detach() for p in trainer.policy_params + trainer.value_params]
    torch.save({"weights": weights, **{f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)}}, rollout)
    out = tmp_path / "two"
    out.mkdir()
    env = cli_env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(TESTS_DIR / "loss_weighting_worker.py"), str(tiny["model"]),
        str(adapters["sft"]), str(adapters["rm"]), str(tiny["prompts"]), str(rollout), str(out),
        *estimation,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_gradients(one_rank, torch.load(out / "grads.pt"))


def sft_trainer(model, train: list[dict], evals: list[dict], out: Path, batch_size: int, accum: int = 1):
    """train-sft's trainer (its real loss and item count) on `model` and ready-made examples."""
    from omegaconf import OmegaConf

    from ppo_cli.config import SFTConfig
    from ppo_cli.data import collate_sft
    from ppo_cli.run import StageRun
    from ppo_cli.sft.train import labelled_tokens, sft_loss
    from ppo_cli.supervised import SupervisedTask, SupervisedTrainer

    cfg = OmegaConf.structured(SFTConfig)
    cfg.output_dir, cfg.train.device, cfg.train.max_steps = str(out), "cpu", 1
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_grad_norm = batch_size, accum, 0.0
    collate = lambda rows: collate_sft(rows, 0)  # noqa: E731
    task = SupervisedTask(model, train, evals, collate, sft_loss, None, {}, labelled_tokens)
    return SupervisedTrainer(StageRun(cfg, "sft"), task)


def sft_model_and_examples(tiny, seed: int):
    """The tiny model in fp32 and four examples whose completions label LENGTHS tokens."""
    from ppo_helpers import load_base, tokenizer_of

    from ppo_cli.data import IGNORE_INDEX

    model = load_base(tiny["model"], tokenizer_of(tiny["model"])).float()
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in LENGTHS:
        ids = torch.randint(3, model.config.vocab_size, (4 + n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 4 + ids[4:]})
    return model, examples


def sft_gradient(model, examples, batch_size: int, accum: int, tmp_path: Path) -> list[torch.Tensor]:
    """The gradient of train-sft's first optimizer step over `examples` in batches of `batch_size`."""
    trainer = sft_trainer(model, examples, [], tmp_path / f"sft{accum}", batch_size, accum)
    grads: list[list[torch.Tensor]] = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer.optimizer.step = lambda: grads.append([p.grad.detach().clone() for p in trainable])
    trainer.train_step(1)
    return grads[0]


def test_sft_gradient_does_not_depend_on_grad_accum(tiny, tmp_path):
    """Four examples whose completions label 6, 6, 1 and 1 tokens, in 1, 2 or 4 micro-batches."""
    model, examples = sft_model_and_examples(tiny, seed=0)
    grads = {accum: sft_gradient(model, examples, 4 // accum, accum, tmp_path) for accum in (1, 2, 4)}
    assert_same_gradients(grads[1], grads[2])
    assert_same_gradients(grads[1], grads[4])


def test_sft_eval_loss_is_the_token_mean_whatever_the_batch(tiny, tmp_path):
    """eval/loss is the mean over every labelled token of the evaluation set: evaluating in batches of 1
    must not make a 1-token example weigh as much as a 6-token one."""
    model, examples = sft_model_and_examples(tiny, seed=1)
    whole, one_by_one = (
        sft_trainer(model, examples[:1], examples, tmp_path / f"eval{bs}", bs).evaluate()["eval/loss"]
        for bs in (4, 1)
    )
    assert one_by_one == pytest.approx(whole, abs=1e-6)


def test_the_policy_backpropagates_before_the_critic_forwards(tiny, adapters, tmp_path, monkeypatch):
    """Each micro-batch's policy loss goes backward before the critic's forward pass, so the update holds
    one pass's activations at a time, not two (its peak memory; the gradients are those of the summed
    loss, as the tests above check)."""
    trainer = make(tiny, adapters, tmp_path / "run", "train.batch_size=4")
    ro = fixed_rollout(trainer)
    trainer.micro = trainer.minibatch // 2
    policy_has_gradients = []
    value_estimates = trainer.passes.value_estimates

    def spy(*args):
        policy_has_gradients.append(all(p.grad is not None for p in trainer.policy_params))
        return value_estimates(*args)

    monkeypatch.setattr(trainer.passes, "value_estimates", spy)
    update_gradients(trainer, ro)
    assert policy_has_gradients == [True, True]
