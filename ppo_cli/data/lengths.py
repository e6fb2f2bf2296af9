"""Holding encoded examples to data.max_length (truncate or drop) and reporting what was cut."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ppo_cli.data.rows import Row


@dataclass
class LengthReport:
    """How many examples were truncated or dropped for being longer than data.max_length, or dropped for
    having no token to learn (`empty`)."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    empty: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, what: str, where: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.examples) < 3:
            self.examples.append(where)

    def describe(self, max_length: int) -> str | None:
        parts = []
        if self.truncated or self.dropped:
            parts.append(
                f"{self.truncated} of {self.total} examples truncated and {self.dropped} dropped at "
                f"data.max_length={max_length}"
            )
        if self.empty:
            parts.append(
                f"{self.empty} of {self.total} examples dropped for having no token to learn (empty)"
            )
        if not parts:
            return None
        return f"{'; '.join(parts)} (e.g. {', '.join(self.examples)})"


def fit_examples(
    rows: list[Row],
    encode: Callable[[Row], dict[str, Any]],
    keys: tuple[str, ...],
    max_length: int,
    overflow: str,
    keep: str = "start",
    is_empty: Callable[[dict[str, Any]], bool] | None = None,
    is_useless: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[list[dict[str, Any]], LengthReport]:
    """Encode every row and hold the token lists under `keys` to `max_length`, counting what was cut.

    An example that `is_empty` finds without a token to learn is dropped as empty. One with a list longer
    than `max_length` is dropped (overflow=drop) or has all of them cut, keeping their `keep` end ("start"
    or "end"); an example that `is_useless` rejects after the cut is dropped too.
    """
    report = LengthReport()
    examples = []
    for row in rows:
        report.total += 1
        example = encode(row)
        if is_empty is not None and is_empty(example):
            report.note("empty", row.where())
            continue
        if any(len(example[key]) > max_length for key in keys):
            if overflow == "drop":
                report.note("dropped", row.where())
                continue
            cut = slice(None, max_length) if keep == "start" else slice(-max_length, None)
            example = {**example, **{key: example[key][cut] for key in keys}}
            if is_useless is not None and is_useless(example):
                report.note("dropped", row.where())
                continue
            report.note("truncated", row.where())
        examples.append(example)
    return examples, report
