#!/usr/bin/env python
"""The floating-point work of one PPO step, per phase, counted (not estimated) by torch's FlopCounterMode.

    python bench/flops.py -- ppo-cli train-ppo ARGS...    # prints JSON: GFLOP of generate, score, train

bench/run.py runs it on its own train-ppo command (one step) and prints each phase's GFLOP beside its
median time, and the rate achieved (GFLOP/s): set against the machine's matmul rate (bench/README.md), it
says how much of a phase is arithmetic and how much is everything else (Python, memory, page faults).

The count covers what FlopCounterMode knows: matrix products (linear layers, the LoRA factors, the output
head) and attention, forward and backward — nearly all of a transformer's work. Elementwise operations
(norms, activations, softmax, the optimizer) are not counted. The step runs in this process, under the
counter's dispatch, so its own time says nothing: only the counts are reported.
"""

from __future__ import annotations

import json
import sys


def count_step(argv: list[str]) -> dict[str, float]:
    """GFLOP of the phases of the first PPO step of `ppo-cli ARGV` (run in this process; give it one step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ppo_cli.cli import main
    from ppo_cli.ppo.rollout import RolloutMaker
    from ppo_cli.ppo.step import PPOUpdate

    counts: dict[str, float] = {}

    def counted(phase: str, function):
        def wrapper(*args, **kwargs):
            if phase in counts:  # the first step only
                return function(*args, **kwargs)
            with FlopCounterMode(display=False) as counter:
                result = function(*args, **kwargs)
            counts[phase] = counter.get_total_flops() / 1e9
            return result

        return wrapper

    generate, rollout, update = RolloutMaker.generate, RolloutMaker.rollout, PPOUpdate.update
    RolloutMaker.generate = counted("generate", generate)
    RolloutMaker.rollout = counted("rollout", rollout)
    PPOUpdate.update = counted("train", update)
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        RolloutMaker.generate, RolloutMaker.rollout, PPOUpdate.update = generate, rollout, update
    # The rollout's count includes its generate call (nested counters both count it).
    counts["score"] = counts.pop("rollout") - counts["generate"]
    counts["step"] = counts["generate"] + counts["score"] + counts["train"]
    return {phase: round(counts[phase], 2) for phase in ("generate", "score", "train", "step")}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if args[:1] == ["ppo-cli"]:
        args = args[1:]
    print(json.dumps(count_step(args)))
