"""A stage's product (final/) records its base model so that it works from any working directory."""

from __future__ import annotations

import json
import time

import pytest

from ppo_cli.errors import UserError
from ppo_cli.models import PRODUCT_FILE, recorded_base_model, write_product_info


def fake_adapter(folder, base: str):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


def test_a_relative_local_base_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "tiny" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    final = tmp_path / "final"
    final.mkdir()
    write_product_info(final, "sft", "tiny/model", lora=True)
    recorded = json.loads((final / PRODUCT_FILE).read_text())["base_model"]
    assert recorded == str((tmp_path / "tiny" / "model").resolve())
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the record still names the model
    assert recorded_base_model(final, "sft_checkpoint") == recorded


def test_a_hub_id_is_recorded_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_product_info(tmp_path, "sft", "Qwen/Qwen2.5-0.5B")
    assert json.loads((tmp_path / PRODUCT_FILE).read_text())["base_model"] == "Qwen/Qwen2.5-0.5B"


def test_a_recorded_local_base_that_moved_is_named_at_once(tmp_path):
    final = fake_adapter(tmp_path / "final", str(tmp_path / "gone" / "model"))
    (final / PRODUCT_FILE).write_text(
        json.dumps({"stage": "sft", "base_model": str(tmp_path / "gone" / "model")})
    )
    with pytest.raises(UserError, match="does not exist any more"):
        recorded_base_model(final, "sft_checkpoint")


def test_generate_names_a_moved_base_without_touching_the_network(tmp_path, cli):
    final = fake_adapter(tmp_path / "final", str(tmp_path / "gone" / "model"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    start = time.monotonic()
    out = cli(
        "generate",
        f"checkpoint={final}",
        f"data.prompts={prompts}",
        f"output={tmp_path / 'o.jsonl'}",
        env={"HF_HUB_OFFLINE": "0"},
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "does not exist any more" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "o.jsonl").exists()
