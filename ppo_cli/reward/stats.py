"""The score statistics train-rm stores with an RM (final/ppo_cli.json), read by train-ppo."""

from __future__ import annotations

import json
from pathlib import Path

from ppo_cli.models import PRODUCT_FILE

# Keys of ppo_cli.json in an RM's final/: mean and std of its scores over training sequences.
REWARD_MEAN, REWARD_STD = "reward_mean", "reward_std"


def load_rm_stats(final_dir: str | Path) -> tuple[float, float] | None:
    """(reward_mean, reward_std) stored in an RM's final/ppo_cli.json; None when absent (e.g. a reward
    model not trained by ppo-cli)."""
    info_path = Path(final_dir) / PRODUCT_FILE
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    mean, std = info.get(REWARD_MEAN), info.get(REWARD_STD)
    if mean is None or std is None:
        return None
    return float(mean), float(std)
