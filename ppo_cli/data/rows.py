"""Reading data files into rows (JSONL/JSON/Parquet/CSV, a dataset folder, or a Hub dataset), the
train/eval split, and the field checks whose errors name the file, the row number and the field."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from ppo_cli.errors import UserError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Row:
    """One data row and where it came from (for error messages)."""

    data: dict[str, Any]
    source: str
    index: int  # 1-based row number within its file

    def where(self) -> str:
        return f"{self.source}, row {self.index}"


# ---------------------------------------------------------------------------------------------
# Loading


def _as_list(spec: Any) -> list[str]:
    if isinstance(spec, list | tuple | ListConfig):
        return [str(s) for s in spec]
    return [str(spec)]


def _looks_local(spec: str) -> bool:
    return (
        Path(spec).suffix.lower() in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")) or Path(spec).exists()
    )


def load_rows(spec: Any, key: str, split: str = "train") -> list[Row]:
    """All rows of `spec` (a file, a list of files, or a Hub dataset id). `key` names the config key."""
    rows: list[Row] = []
    for item in _as_list(spec):
        rows.extend(_load_one(item, key, split))
    if not rows:
        raise UserError(f"{key}={spec}: no rows (the data is empty).")
    return rows


def _load_one(spec: str, key: str, split: str) -> list[Row]:
    if _looks_local(spec):
        path = Path(spec).expanduser()
        if path.is_dir():  # a folder of data files, or a dataset saved with `save_to_disk`
            return _read_hub(str(path), key, split)
        if not path.is_file():
            raise UserError(f"{key}={spec}: file not found.")
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise UserError(
                f"{key}={spec}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .csv)."
            )
        if suffix in (".jsonl", ".json"):
            rows = _read_json_rows(path, key)
        else:
            rows = _read_with_datasets(LOCAL_SUFFIXES[suffix], str(path), key)
        if not rows:
            raise UserError(f"{key}={spec}: the file is empty.")
        return [Row(r, str(path), i + 1) for i, r in enumerate(rows)]
    return _read_hub(spec, key, split)


def _read_json_rows(path: Path, key: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{key}: {path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        rows = data
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{key}: {path}, line {lineno} is not valid JSON ({exc.msg}).") from exc
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{key}: {path}, row {i} is a {type(row).__name__}, not a JSON object.")
    return rows


def _read_with_datasets(builder: str, path: str, key: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
        raise UserError(
            f"{key}: cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return [dict(r) for r in ds]


def _read_hub(spec: str, key: str, split: str) -> list[Row]:
    import datasets

    local = Path(spec)
    try:
        if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))  # written by Dataset(Dict).save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if local.is_dir():
            raise UserError(
                f"{key}={spec}: cannot load this dataset folder (split {split}): {reason}"
            ) from exc
        raise UserError(
            f"{key}={spec}: not a local file, and loading it as a Hub dataset failed: {reason}"
        ) from exc
    return [Row(dict(r), f"{spec}[{split}]", i + 1) for i, r in enumerate(ds)]


def load_train_eval_rows(data_cfg, seed: int) -> tuple[list[Row], list[Row]]:
    """data.train's rows and the eval rows: data.eval when given, else a held-out data.eval_fraction."""
    rows = load_rows(data_cfg.train, "data.train", data_cfg.split)
    if data_cfg.eval:
        return rows, load_rows(data_cfg.eval, "data.eval", data_cfg.split)
    return split_eval(rows, data_cfg.eval_fraction, seed)


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of the rows (at least one, when fraction > 0 and there are 2+ rows)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _require(row: Row, *fields: str) -> None:
    for name in fields:
        if name not in row.data or row.data[name] is None:
            raise UserError(
                f"{row.where()}: missing field '{name}' (have: {', '.join(row.data) or 'nothing'})."
            )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _check_text_or_conversation(row: Row, name: str) -> None:
    value = row.data[name]
    if not (isinstance(value, str) or _is_conversation(value)):
        raise UserError(
            f"{row.where()}: field '{name}' must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}."
        )
