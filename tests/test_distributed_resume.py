"""Resuming a run of several ranks: every rank gets its own RNG state back (ppo_cli/checkpoint.py), so
a resumed 2-rank train-ppo run equals an uninterrupted one; another number of ranks falls back to rank 0's
state and fresh seeds for the others.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ppo_helpers import assert_same_products, finish, read_metrics, start_two_ranks

from ppo_cli import checkpoint as ckpt
from ppo_cli.dist import DistInfo
from ppo_cli.loop import TrainingLoop


def rank_states(world: int) -> list[dict]:
    """`capture_rng()` of `world` ranks seeded apart, as a run's ranks are."""
    states = []
    for rank in range(world):
        ckpt.seed_everything(7 + rank)
        states.append(ckpt.capture_rng())
    return states


def written(tmp_path: Path, states: list[dict], step: int = 2) -> ckpt.Checkpoint:
    """A checkpoint holding `states` as the loop writes them, read back as a resume reads it."""
    plain, tensors = ckpt.split_rng_ranks(states)
    path = ckpt.save_checkpoint(tmp_path, step, {"w": torch.ones(2)}, tensors, plain)
    return ckpt.load_checkpoint(path)


def draws() -> tuple:
    """One number from each generator a rank's sampling may use."""
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_checkpoint_gives_each_rank_its_own_rng_state(tmp_path):
    states = rank_states(3)
    loaded = written(tmp_path, states)
    assert ckpt.saved_rng_ranks(loaded.state) == 3
    for rank, state in enumerate(states):
        ckpt.restore_rng(state)
        expected = draws()
        ckpt.restore_rng(ckpt.rank_rng(loaded.state, loaded.objects, rank))
        assert draws() == expected, rank


def test_a_one_rank_checkpoint_keeps_its_layout(tmp_path):
    """One rank: no list of other ranks, so checkpoints of either version resume on one rank alike."""
    (state,) = rank_states(1)
    loaded = written(tmp_path, [state])
    assert ckpt.RNG_OTHER_RANKS not in loaded.state and ckpt.RNG_OTHER_RANKS not in loaded.objects
    assert ckpt.saved_rng_ranks(loaded.state) == 1
    ckpt.restore_rng(state)
    expected = draws()
    ckpt.restore_rng(ckpt.join_rng(loaded.state["rng"], loaded.objects))  # as an older version read it
    assert draws() == expected


class Notes:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def restored_on(loaded: ckpt.Checkpoint, rank: int, world: int, seed: int = 42) -> tuple[tuple, list[str]]:
    """What rank `rank` of `world` draws after the loop restored its RNG from `loaded`, and the notes."""
    dist = DistInfo(rank=rank, world_size=world)
    run = SimpleNamespace(cfg=SimpleNamespace(train=None), dist=dist, seed=seed + rank, logger=Notes())
    TrainingLoop(run, state=None, total_steps=4, stage=None).restore_rng(loaded)
    return draws(), run.logger.warnings


@pytest.mark.parametrize("world", [1, 3])
def test_another_number_of_ranks_keeps_rank_0s_state_and_seeds_the_others(tmp_path, world):
    """A 2-rank checkpoint resumed on 1 or 3 ranks: rank 0 continues its stream, rank 2 (of 3) starts
    from its own seed mixed with the step, and the console says so."""
    states = rank_states(2)
    loaded = written(tmp_path, states, step=2)
    ckpt.restore_rng(states[0])
    expected = draws()
    got, notes = restored_on(loaded, 0, world)
    assert got == expected
    assert len(notes) == 1 and "2 rank(s)" in notes[0] and f"this run has {world}" in notes[0]
    if world == 3:
        ckpt.seed_everything(42 + 2 + 2)  # rank 2's seed + the step
        expected = draws()
        assert restored_on(loaded, 2, world)[0] == expected


def test_the_same_number_of_ranks_restores_quietly(tmp_path):
    states = rank_states(2)
    loaded = written(tmp_path, states)
    ckpt.restore_rng(states[1])
    expected = draws()
    assert restored_on(loaded, 1, 2) == (expected, [])


def wait(proc: subprocess.Popen, timeout: float = 600) -> str:
    """The run's stdout once it finished successfully."""
    result = finish(proc, timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_two_ranks_resume_exactly(tiny, tmp_path):
    """A 4-step run on 2 ranks, and the same run stopped after step 2 (max_steps=2, final/ removed) then
    resumed to 4 steps: the same policy, value adapter and head, and the same metrics. Each rank samples
    from its own RNG stream; with rank 0's state on both ranks (what a checkpoint held before) the
    resumed rollouts of rank 1 would differ. A constant rate and a fixed KL horizon keep the 2-step run
    the first half of the 4-step one (a schedule follows its run's length)."""
    common = [
        "train-ppo",
        f"model.name_or_path={tiny['model']}",
        f"data.train={tiny['prompts']}",
        "reward_fn=ppo_cli.tiny.task:positive_reward",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.lr_scheduler=constant",
        "train.save_every=2",
        "generation.max_new_tokens=6",
        "ppo.epochs=1",
        "ppo.kl_horizon=100",
        "sample_every=0",
        "logger.progress=false",
        "logger.plots=false",
    ]
    a, b = tmp_path / "A", tmp_path / "B"
    full = start_two_ranks(*common, f"output_dir={a}", "train.max_steps=4", log=tmp_path / "A")
    first = start_two_ranks(*common, f"output_dir={b}", "train.max_steps=2", log=tmp_path / "B1")
    wait(first)
    saved = ckpt.load_checkpoint(b / "checkpoints" / "step-000002")
    assert len(saved.state["rng_other_ranks"]) == 1  # rank 1's state beside rank 0's
    shutil.rmtree(b / "final")
    resumed = start_two_ranks(*common, f"output_dir={b}", "train.max_steps=4", log=tmp_path / "B2")
    assert "resumed at" in wait(resumed)
    wait(full)

    assert_same_products(a, b)

    def comparable(run_dir: Path) -> list[dict]:
        # Times and peak memory (process RSS) are not the run's numbers.
        skip = ("time/", "memory/")
        return [{k: v for k, v in m.items() if not k.startswith(skip)} for m in read_metrics(run_dir)]

    assert [m["step"] for m in comparable(a)] == [1, 2, 3, 4]
    assert comparable(a) == comparable(b)
