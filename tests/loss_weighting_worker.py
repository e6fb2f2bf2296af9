"""The gradient of one PPO update on a fixed rollout, for tests/test_loss_weighting.py.

In-process: `update_gradients(trainer, ro)`. Under torchrun (two gloo ranks), this file is the worker:

    python -m torch.distributed.run --nproc_per_node 2 tests/loss_weighting_worker.py BASE SFT RM PROMPTS
        ROLLOUT OUT_DIR [OVERRIDE ...]

each rank takes the weights saved with the rollout ROLLOUT and its half of the rows, runs the same update, and rank 0
saves the gradients (averaged over ranks) at the optimizer step to OUT_DIR/grads.pt.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

# The same update settings in every variant: one epoch, one minibatch, no clipping of the gradient (it
# would hide a wrong scale), KL in the loss as well as the critic's value loss, so that every loss term
# is weighed.
UPDATE_OVERRIDES = (
    "ppo.epochs=1",
    "ppo.num_minibatches=1",
    "train.max_grad_norm=0",
    "generation.max_new_tokens=8",
)


def update_gradients(trainer, ro) -> list[torch.Tensor]:
    """The trainable gradients at the update's (only) optimizer step; the weights are left unchanged."""
    grads: list[list[torch.Tensor]] = []
    params = trainer.policy_params + trainer.value_params

    def record(*args, **kwargs):
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])

    trainer.optimizer.step = record
    torch.manual_seed(0)  # the epoch's order: the gradient must not depend on it, but keep runs alike
    trainer.update(ro)
    assert len(grads) == 1, f"expected one optimizer step, saw {len(grads)}"
    return grads[0]


def rows_of(ro, rows: slice):
    """The rollout's rows `rows` (tensors sliced, lists too)."""
    return dataclasses.replace(
        ro,
        **{
            f.name: getattr(ro, f.name)[rows]
            for f in dataclasses.fields(ro)
            if getattr(ro, f.name) is not None
        },
    )


def main(base: str, sft: str, rm: str, prompts: str, rollout: str, out_dir: str, *overrides: str) -> None:
    from ppo_helpers import build_tiny_roles, make_trainer, ppo_config

    from ppo_cli.dist import init_distributed
    from ppo_cli.ppo.rollout import Rollout

    info = init_distributed("cpu")
    per_rank = 2
    roles, tokenizer = build_tiny_roles(base, Path(sft), Path(rm))
    cfg = ppo_config(
        base,
        prompts,
        Path(out_dir) / f"rank{info.rank}",
        f"train.batch_size={per_rank}",
        *UPDATE_OVERRIDES,
        *overrides,
    )
    trainer = make_trainer(cfg, roles, tokenizer, dist=info)
    saved = torch.load(rollout, weights_only=False)
    # The one-rank trainer's weights after its rollout (which put the critic on the reward scale).
    with torch.no_grad():
        for p, w in zip(trainer.policy_params + trainer.value_params, saved.pop("weights")):
            p.copy_(w)
    ro = Rollout(**saved)
    mine = rows_of(ro, slice(info.rank * per_rank, (info.rank + 1) * per_rank))
    grads = update_gradients(trainer, mine)
    if info.rank == 0:
        torch.save(grads, Path(out_dir) / "grads.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
