"""Holding encoded examples to data.max_length (truncate or drop) and reporting what was cut."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ppo_cli.data.rows import Row

# How many rows of each kind a report names: enough to find the pattern, short enough for one line.
SHOWN_ROWS = 3

# Why an example truncated to max_length can be left with nothing to learn (fit_examples' `is_useless`).
PROMPT_FILLS = (
    "the prompt alone is at least data.max_length={max_length} tokens long, leaving no completion token "
    "to learn"
)


@dataclass
class LengthReport:
    """How many examples were truncated or dropped for being longer than data.max_length, or dropped for
    having no token to learn (`empty`). `dropped` counts both drops for length: the examples longer than
    max_length under overflow=drop, and those of them (`no_room`) that truncation left with nothing to
    learn, for the reason `no_room_why` gives."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    no_room: int = 0
    empty: int = 0
    no_room_why: str = PROMPT_FILLS
    # The first SHOWN_ROWS rows of each kind ("truncated", "too_long", "no_room", "empty").
    rows: dict[str, list[Row]] = field(default_factory=dict)

    def note(self, kind: str, row: Row) -> None:
        if kind != "too_long":
            setattr(self, kind, getattr(self, kind) + 1)
        if kind in ("too_long", "no_room"):
            self.dropped += 1
        shown = self.rows.setdefault(kind, [])
        if len(shown) < SHOWN_ROWS:
            shown.append(row)

    def describe(self, max_length: int, noun: str = "examples") -> str | None:
        """One line: each kind of cut with its count and the rows it hit (the first SHOWN_ROWS of them);
        None when nothing was cut."""
        counts = {
            "truncated": self.truncated,
            "too_long": self.dropped - self.no_room,
            "no_room": self.no_room,
            "empty": self.empty,
        }
        what = {
            "truncated": f"truncated to data.max_length={max_length}",
            "too_long": f"dropped for being longer than data.max_length={max_length} (data.overflow=drop)",
            "no_room": f"dropped: {self.no_room_why.format(max_length=max_length)}",
            "empty": "dropped for having no token to learn (empty)",
        }
        parts = []
        for kind, count in counts.items():
            if count:
                shown = self.rows.get(kind, [])
                some = "e.g. " if count > len(shown) else ""
                parts.append(f"{count} of {self.total} {noun} {what[kind]} ({some}{where(shown)})")
        return "; ".join(parts) or None


def where(rows: list[Row]) -> str:
    """'FILE rows 1, 2, 3': each file named once, then its row numbers."""
    by_source: dict[str, list[int]] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row.index)
    return "; ".join(
        f"{source} row{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))}"
        for source, indices in by_source.items()
    )


def fit_examples(
    rows: list[Row],
    encode: Callable[[Row], dict[str, Any]],
    keys: tuple[str, ...],
    max_length: int,
    overflow: str,
    keep: str = "start",
    is_empty: Callable[[dict[str, Any]], bool] | None = None,
    is_useless: Callable[[dict[str, Any]], bool] | None = None,
    useless_why: str = PROMPT_FILLS,
) -> tuple[list[dict[str, Any]], LengthReport]:
    """Encode every row and hold the token lists under `keys` to `max_length`, counting what was cut.

    An example that `is_empty` finds without a token to learn is dropped as empty. One with a list longer
    than `max_length` is dropped (overflow=drop) or has all of them cut, keeping their `keep` end ("start"
    or "end"); an example that `is_useless` rejects after the cut is dropped too, the report saying
    `useless_why` (formatted with max_length) about it.
    """
    report = LengthReport(no_room_why=useless_why)
    examples = []
    for row in rows:
        report.total += 1
        example = encode(row)
        if is_empty is not None and is_empty(example):
            report.note("empty", row)
            continue
        if any(len(example[key]) > max_length for key in keys):
            if overflow == "drop":
                report.note("too_long", row)
                continue
            cut = slice(None, max_length) if keep == "start" else slice(-max_length, None)
            example = {**example, **{key: example[key][cut] for key in keys}}
            if is_useless is not None and is_useless(example):
                report.note("no_room", row)
                continue
            report.note("truncated", row)
        examples.append(example)
    return examples, report
