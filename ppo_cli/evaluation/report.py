"""evaluate's output: the results table, the side-by-side samples preview, and the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ppo_cli.data import prompt_text
from ppo_cli.generate import write_text_atomic


def samples_path(output: str | Path) -> Path:
    """Where the samples go: eval.json -> eval.samples.jsonl (any other name gets the suffix appended)."""
    output = Path(output)
    if output.suffix == ".json":
        return output.with_suffix(".samples.jsonl")
    return output.with_name(output.name + ".samples.jsonl")


def print_results(console, result: dict[str, Any], title: str) -> None:
    from rich.table import Table

    def ci(values: list[float] | None) -> str:
        return f" [{values[0]:.4g}, {values[1]:.4g}]" if values else ""

    def num(value: float | None, fmt: str = ".4g") -> str:
        return "n/a" if value is None else format(value, fmt)

    pol, ref = result["policy"], result["reference"]
    table = Table(title=title)
    table.add_column("")
    table.add_column("policy", justify="right")
    table.add_column("reference", justify="right")
    table.add_row(
        "reward (95% interval)",
        num(pol["reward_mean"]) + ci(pol["reward_ci95"]),
        num(ref["reward_mean"]) + ci(ref["reward_ci95"]),
    )
    table.add_row("length (tokens)", num(pol["length_mean"], ".1f"), num(ref["length_mean"], ".1f"))
    table.add_row("EOS rate", num(pol["eos_rate"], ".0%"), num(ref["eos_rate"], ".0%"))
    table.add_row("distinct-2", num(pol["distinct_2"], ".3f"), num(ref["distinct_2"], ".3f"))
    table.add_row(
        "win rate over reference (ties half)",
        num(result["win_rate"], ".3f") + ci(result["win_rate_ci95"]),
        "",
    )
    kl = "n/a (greedy)" if result["kl"] is None else num(result["kl"]) + ci(result["kl_ci95"])
    table.add_row("KL(policy || reference), nats/sequence", kl, "")
    console.print(table)


def preview(console, rows: list[dict[str, Any]], n: int) -> None:
    from rich.table import Table
    from rich.text import Text

    from ppo_cli.generate import _clip
    from ppo_cli.logger import printable

    shown = [r for r in rows if r["sample"] == 0][:n]
    if not shown:
        return
    table = Table(title=f"sample 0 of the first {len(shown)} prompts", show_lines=True)
    table.add_column("prompt", overflow="fold", max_width=50)
    for side in ("policy", "reference"):
        table.add_column(side, overflow="fold", max_width=60)
        table.add_column("reward", justify="right")
    for row in shown:
        # Text, not markup: a completion is any text ("[/]" included), shown as written.
        cells = [Text(printable(_clip(prompt_text(row["prompt"]), 200)))]
        for side in ("policy", "reference"):
            cells += [Text(printable(_clip(row[side]["completion"], 300))), f"{row[side]['reward']:.4g}"]
        table.add_row(*cells)
    console.print(table)


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")
