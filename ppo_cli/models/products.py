"""A stage's product (`final/`): the ppo_cli.json written beside every adapter, and the base model an
adapter or checkpoint was trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError
from ppo_cli.models.loading import local_or_hub, looks_local

PRODUCT_FILE = "ppo_cli.json"  # written in every final/: stage, base model, stats for later stages


def write_product_info(final_dir: Path, stage: str, base_model: str, **extra: Any) -> None:
    # A local base is stored as an absolute path, so the product works from any working directory.
    info = {"stage": stage, "base_model": local_or_hub(base_model), **extra}
    (Path(final_dir) / PRODUCT_FILE).write_text(json.dumps(info, indent=1))


def read_product_info(path: str | Path, key: str) -> dict[str, Any]:
    """The ppo_cli.json of a stage's final/ (empty when the directory was not written by ppo-cli).

    `key` is the config key that named the directory, for the error message.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{key}={path}: no such directory.")
    info_path = path / PRODUCT_FILE
    if not info_path.is_file():
        return {}
    return json.loads(info_path.read_text())


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_config(path: str | Path) -> dict[str, Any]:
    """An adapter directory's adapter_config.json (empty when it is no peft adapter)."""
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def adapter_task_type(path: str | Path) -> str | None:
    """The peft task type an adapter was saved with (CAUSAL_LM, SEQ_CLS); None when it is no adapter."""
    return adapter_config(path).get("task_type")


def recorded_base_model(path: str | Path, key: str, override: str | None = None) -> str:
    """The base model under the adapter directory `path` (`key` names it in messages).

    `override` (model.name_or_path, when the user set it) wins; else ppo_cli.json's record, else peft's
    adapter_config.json. A recorded local path that no longer exists is an error at once — without it the
    name would be tried as a Hub id (slow retries, then an unrelated message)."""
    info = read_product_info(path, key)  # names a missing directory
    if override:
        return str(override)
    base = info.get("base_model") or adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{key}={path}: the adapter does not name its base model; set model.name_or_path=BASE."
        )
    base = str(base)
    if looks_local(base) and not Path(base).expanduser().is_dir():
        raise UserError(
            f"{key}={path} was trained on the local base model '{base}', which does not exist any more "
            "(moved or deleted?); set model.name_or_path=BASE to the model's new location."
        )
    return base


def base_model_of_checkpoint(path: str | Path, key: str, expected_stage: str) -> str:
    """The base model a stage product was trained on; checks that the product is of `expected_stage`."""
    info = read_product_info(path, key)
    stage = info.get("stage")
    if stage is not None and stage != expected_stage:
        raise UserError(
            f"{key}={path} is the product of the {stage} stage, not of the {expected_stage} stage."
        )
    if is_adapter_dir(path):
        return recorded_base_model(path, key)
    if (Path(path) / "config.json").is_file():  # a full model (full fine-tuning): it is its own base
        return str(path)
    raise UserError(
        f"{key}={path} holds neither a peft adapter (adapter_config.json) nor a model (config.json)."
    )


def fill_base_model(cfg: DictConfig, key: str, expected_stage: str) -> None:
    """Take model.name_or_path from the checkpoint named by `key` when the user did not set it; when the
    user did set it, check that it matches the checkpoint's base."""
    ckpt = OmegaConf.select(cfg, key)
    if not ckpt:
        return
    base = base_model_of_checkpoint(ckpt, key, expected_stage)
    if OmegaConf.is_missing(cfg.model, "name_or_path"):
        cfg.model.name_or_path = base
    elif is_adapter_dir(ckpt) and not same_model(cfg.model.name_or_path, base):
        raise UserError(
            f"{key}={ckpt} was trained on base model '{base}', but model.name_or_path={cfg.model.name_or_path}; "
            "leave model.name_or_path unset to use the checkpoint's base."
        )


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
