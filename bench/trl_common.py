"""What the TRL baselines (bench/trl_ppo.py with trl 1.12, bench/trl_grpo.py with trl 1.16) share: reading the
prompts, the policy to start from (ppo-cli's SFT adapter merged into the base), recording TRL's log, and the
products bench/quality.py judges (policy/, metrics.jsonl, done.json). Imported from those scripts, which run
in their own virtual environments; nothing here imports ppo_cli."""

from __future__ import annotations

import json
import time
from pathlib import Path


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def merged_causal(base: str, adapter: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def log_recorder(log: list[dict]):
    """A TrainerCallback that appends every log TRL writes, with its step, to `log`."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                log.append({"step": state.global_step, **logs})

    return Record()


def train_and_save(trainer, merged_policy, tok, log: list[dict], out: Path, trl_version: str) -> None:
    """trainer.train(), then out/policy (the policy `merged_policy()` returns, LoRA merged, + tokenizer),
    out/metrics.jsonl (TRL's log) and out/done.json (training seconds), which marks the run complete."""
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    merged = merged_policy()
    merged.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    with (out / "metrics.jsonl").open("w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    (out / "done.json").write_text(json.dumps({"train_seconds": seconds, "trl": trl_version}) + "\n")
