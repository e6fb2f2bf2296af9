"""metrics.jsonl, the record every run writes (ppo_cli/logger.py) and `ppo-cli plot` reads (ppo_cli/plots.py).

Its own module so that the two share it without importing each other, and so that reading a run's
metrics pays for nothing but json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The logged rows of a run directory's metrics.jsonl, oldest first; [] when it has none."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
