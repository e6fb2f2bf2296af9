"""`ppo-cli export`: merge a stage's LoRA adapter into its base and save a standalone model directory.

    ppo-cli export checkpoint=outputs/ppo/RUN/final output=merged/

- An SFT or PPO final/ (a CAUSAL_LM adapter) becomes an `AutoModelForCausalLM` directory.
- An RM final/ (a SEQ_CLS adapter whose `score` head is in modules_to_save) becomes an
  `AutoModelForSequenceClassification` directory with num_labels=1 and the pad token set, so that the
  score is the logit at the last non-pad token, as in ppo-cli.

The merge (`merge_and_unload`) runs in float32 whatever the saved dtype, so the merged weights are
W + (alpha/r) B A computed once at full precision; the tokenizer (with the pad token ppo-cli added) and the
generation config are saved beside the weights. Loading the result needs neither peft nor ppo-cli, and
its logits equal those of base + adapter. The output directory must not exist or be empty; the model is
written to a temporary sibling and renamed into place, so a failed export leaves nothing half-written.

An adapter trained on a 4/8-bit base (model.load_in_4bit / load_in_8bit) is merged into the
full-precision base all the same: export ignores those keys and says so in one line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.text import Text

from ppo_cli.app import hydra_app
from ppo_cli.errors import UserError
from ppo_cli.logger import make_console
from ppo_cli.models import (
    adapter_task_type,
    is_adapter_dir,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    quantization_key,
    read_product_info,
    recorded_base_model,
    resolve_device,
)
from ppo_cli.resume_config import RUN_MARKER

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def validate(cfg: DictConfig) -> Path:
    checkpoint = Path(cfg.checkpoint).expanduser()
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint={cfg.checkpoint}: no such directory.")
    if not is_adapter_dir(checkpoint):
        hint = (
            " It is already a full model (full fine-tuning): copy it as it is."
            if (checkpoint / "config.json").is_file()
            else ""
        )
        raise UserError(
            f"checkpoint={cfg.checkpoint} holds no peft adapter (adapter_config.json), so there is nothing to "
            f"merge.{hint}"
        )
    task = adapter_task_type(checkpoint)
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UserError(
            f"checkpoint={cfg.checkpoint} is a {task} adapter; export handles CAUSAL_LM (SFT, PPO) and SEQ_CLS (RM)."
        )
    output = Path(cfg.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output={cfg.output} already exists and is not empty; choose a new directory.")
    if output.resolve() == checkpoint.resolve():
        raise UserError("output must differ from checkpoint.")
    return checkpoint


def saved_dtype(cfg_dtype: str, model) -> torch.dtype:
    """The dtype to save in: model.dtype, or for auto the base's stored dtype (float32 when unknown)."""
    if cfg_dtype != "auto":
        return _DTYPES[cfg_dtype]
    stored = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def quantized_base_note(checkpoint: Path, cfg: DictConfig) -> str | None:
    """One line when the command line or the adapter's run (its config.yaml beside final/) asks for a
    4/8-bit base: export merges into the full-precision base whatever they say, since folding
    W + (alpha/r) B A into quantized weights would round the adapter away."""
    run_config = checkpoint.resolve().parent / RUN_MARKER
    run_model = OmegaConf.load(run_config).get("model") if run_config.is_file() else None
    asked = quantization_key(cfg.model)
    trained = quantization_key(run_model) if isinstance(run_model, DictConfig) else None
    if asked is None and trained is None:
        return None
    said = (
        f"{asked}=true is ignored"
        if asked
        else f"the adapter was trained on a base loaded with {trained}=true"
    )
    return (
        f"{said}: export merges the adapter into the full-precision base, never a quantized one (set "
        "model.dtype to choose the saved dtype)."
    )


def merge(checkpoint: Path, cfg: DictConfig):
    """(merged model, tokenizer, task type, base): the adapter folded into a float32 copy of its base."""
    from peft import PeftModel

    device = resolve_device(cfg.device)
    task = adapter_task_type(checkpoint)
    base = recorded_base_model(str(checkpoint), "checkpoint", override=cfg.model.name_or_path)
    tokenizer = load_tokenizer(str(checkpoint), cfg.model.trust_remote_code)
    load_cfg = cfg.model.copy()
    load_cfg.dtype = "float32"  # merge at full precision; cast when saving
    load_cfg.load_in_4bit = load_cfg.load_in_8bit = False  # never into quantized weights
    load = load_sequence_classifier if task == "SEQ_CLS" else load_causal_lm
    model = load(load_cfg, tokenizer, device, name_or_path=base)
    stored = saved_dtype(cfg.model.dtype, model)
    model = PeftModel.from_pretrained(model, str(checkpoint)).to(device)
    merged = model.merge_and_unload()
    merged.eval()
    return merged.to(stored), tokenizer, task, base


def run(cfg: DictConfig) -> Path:

    console = make_console()
    checkpoint = validate(cfg)
    note = quantized_base_note(checkpoint, cfg)
    if note:
        console.print(Text.assemble(("ppo-cli export", "bold"), f": {note}"))
    output = Path(cfg.output).expanduser()
    merged, tokenizer, task, base = merge(checkpoint, cfg)
    info = read_product_info(checkpoint, "checkpoint")
    merged.config.pad_token_id = tokenizer.pad_token_id
    if task == "SEQ_CLS":
        merged.config.num_labels = 1
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "export_info.json").write_text(
            json.dumps(
                {
                    "exported_from": str(checkpoint.resolve()),
                    "base_model": base,
                    "stage": info.get("stage"),
                    "task_type": task,
                    "dtype": str(merged.dtype).removeprefix("torch."),
                },
                indent=1,
            )
            + "\n"
        )
        if output.exists():  # an empty directory: replace it
            output.rmdir()
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in written_lines(output, checkpoint, base, task, merged):
        console.print(line, soft_wrap=True)  # whole lines: they hold paths to copy
    return output


def written_lines(output: Path, checkpoint: Path, base: str, task: str, merged) -> list[Text]:
    """What export says it did: where the new model is, and what it was made from. The base is only
    read (a copy of it is merged), which "merged X into BASE" would leave in doubt."""
    kind = "AutoModelForSequenceClassification" if task == "SEQ_CLS" else "AutoModelForCausalLM"
    n_params = sum(p.numel() for p in merged.parameters())
    dtype = str(merged.dtype).removeprefix("torch.")
    return [
        Text.assemble(
            ("ppo-cli export", "bold"), f": wrote {output} ({kind}, {n_params:,} parameters, {dtype})"
        ),
        Text(f"  made from: the adapter {checkpoint} merged into a copy of the base {base} (left unchanged)"),
        Text(f"  load it with: {kind}.from_pretrained('{output}')"),
    ]


@hydra_app("export", "export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
