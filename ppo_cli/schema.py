"""What the config schema (ppo_cli/config.py, ppo_cli/command_config.py) knows: its dotted keys, their descriptions, and the keys of a
composed config it does not know.

The comment lines right above each dataclass field in config.py are its documentation, read here from the
source (one place to write them); `--help` shows them next to the config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf


def schema_class(config_name: str) -> type:
    """The dataclass a command's config extends (conf/<config_name>.yaml's `schema_<config_name>`)."""
    from hydra.core.config_store import ConfigStore

    from ppo_cli.config import register_configs

    register_configs()
    return OmegaConf.get_type(ConfigStore.instance().load(f"schema_{config_name}.yaml").node)


def _nested_schema(cls: type, field: dataclasses.Field) -> type | None:
    """The dataclass a field holds (a config group such as `ppo`), else None."""
    hint = typing.get_type_hints(cls).get(field.name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, groups included: model, model.name_or_path, ..."""
    keys: list[str] = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.append(key)
        nested = _nested_schema(cls, field)
        if nested is not None:
            keys.extend(schema_keys(nested, key + "."))
    return keys


@functools.cache
def _comments_by_class() -> dict[str, dict[str, str]]:
    """{class name: {field: the comment lines right above it, joined}} from the config modules' source."""
    from ppo_cli import command_config, config

    found: dict[str, dict[str, str]] = {}
    for module in (config, command_config):
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):  # installed without sources: no descriptions, nothing breaks
            continue
        found.update(_field_comments(source))
    return found


def _field_comments(source: str) -> dict[str, dict[str, str]]:
    """{class name: {field: its comment lines, joined}} of the dataclasses in one module's `source`."""
    lines = source.splitlines()
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                comment: list[str] = []
                row = stmt.lineno - 2  # the line above, 0-based
                while row >= 0 and lines[row].strip().startswith("#"):
                    comment.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                if comment:
                    fields[stmt.target.id] = " ".join(comment)
    return found


def field_descriptions(cls: type, prefix: str = "") -> dict[str, str]:
    """{dotted key: description} for every field of a schema that has one (inherited fields take the
    comment of the class that declares them last)."""
    comments = _comments_by_class()
    out: dict[str, str] = {}
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        owner = next((c for c in cls.__mro__ if field.name in c.__dict__.get("__annotations__", {})), cls)
        text = comments.get(owner.__name__, {}).get(field.name)
        if text:
            out[key] = text
        nested = _nested_schema(cls, field)
        if nested is not None:
            out.update(field_descriptions(nested, key + "."))
    return out


def declared_fields(node: DictConfig) -> set[str] | None:
    """The field names of the schema dataclass that types `node`; None for a plain dict (an open dict such
    as the pipeline's per-stage overrides, or a dict-valued `Any` field), which takes any key."""
    schema = OmegaConf.get_type(node)
    if isinstance(schema, type) and dataclasses.is_dataclass(schema):
        return {f.name for f in dataclasses.fields(schema)}
    return None


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that its schema does not declare (added with `+key=value`)."""
    declared = declared_fields(node) if isinstance(node, DictConfig) else None
    if declared is None:
        return []
    found: list[str] = []
    for key in node:
        dotted = f"{prefix}{key}"
        if key not in declared:
            found.append(dotted)
        else:
            found.extend(unknown_keys(node._get_node(key), dotted + "."))
    return found


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _closeness(typed: str, candidate: str) -> float:
    """How likely `candidate` is the key meant by `typed` (0 = not at all): a typo or a prefix of a key
    of the same group first (lora.rank -> lora.r), then the same name in another group or a typo in the
    group's name (ppo.temperature -> generation.temperature, trian.lr -> train.lr)."""
    head, _, tail = typed.rpartition(".")
    c_head, _, c_tail = candidate.rpartition(".")
    whole = _similarity(typed, candidate)
    if c_head == head and (
        _similarity(tail, c_tail) >= 0.6 or c_tail.startswith(tail) or tail.startswith(c_tail)
    ):
        return 1 + whole
    if c_tail == tail or whole >= 0.8:
        return whole
    return 0.0


def did_you_mean(key: str, known: list[str]) -> str:
    """' Did you mean ppo.kl_coef?' for the nearest of the known keys, or '' when none is near."""
    best = max(known, key=lambda candidate: _closeness(key, candidate), default=None)
    return f" Did you mean {best}?" if best is not None and _closeness(key, best) > 0 else ""


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


_YAML_KEY = re.compile(r"^( *)([A-Za-z_][\w-]*):(?: |$)")


def annotate_config_yaml(text: str, descriptions: dict[str, str], after: str = "== Config ==") -> str:
    """Put each key's description, as a YAML comment, above the key in the block-style YAML that follows
    the line `after` in `text` (Hydra's --help); the text before it is left as it is."""
    out: list[str] = []
    started = False
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    for line in text.splitlines():
        match = _YAML_KEY.match(line) if started else None
        if match:
            indent, key = len(match.group(1)), match.group(2)
            path = [(i, k) for i, k in path if i < indent]
            path.append((indent, key))
            description = descriptions.get(".".join(k for _, k in path))
            if description:
                width = max(40, 100 - indent)
                out.extend(" " * indent + "# " + part for part in _wrap(description, width))
        started = started or line.strip() == after
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
