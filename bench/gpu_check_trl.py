#!/usr/bin/env python
"""bench/trl_baseline.py (TRL 1.12's PPOTrainer) on a model directory that script did not build: gpu-check's
0.5B Qwen2-shaped model, or the tiny Llama of the dry run.

Why a wrapper: trl_baseline.py builds its 30M Llama into --model-dir and rebuilds any directory whose spec
file is not its own, which would overwrite gpu-check's model. Here its build step returns the directory as it
is; everything else (settings, timing, the JSON) is trl_baseline.py's.

    python bench/gpu_check_trl.py --model-dir DIR [trl_baseline.py's other options]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` as a namespace package

from bench import trl_baseline  # noqa: E402


def use_as_is(out_dir, seed: int = 0) -> str:
    """The model directory, unchanged (stands in for trl_baseline.build_bench_model)."""
    return str(out_dir)


def main(argv: list[str] | None = None) -> dict:
    trl_baseline.build_bench_model = use_as_is
    return trl_baseline.main(argv)


if __name__ == "__main__":
    main()
