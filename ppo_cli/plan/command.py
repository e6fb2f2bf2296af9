"""`ppo-cli plan COMMAND [OVERRIDES] [--json]`: the peak memory a train-sft, train-rm or train-ppo run will
need, before it starts.

How the command line composes: the first argument is the training command. Every override outside
`plan.` is that command's and composes exactly as the command composes it (its conf/<command>.yaml and
schema; an unknown key, a wrong type or a value outside a key's choices is exit 2), and train-rm and
train-ppo take model.name_or_path from sft_checkpoint as they do. Keys under `plan.` are plan's own
(PlanConfig in ppo_cli/command_config.py): `plan.device_memory_gb=24` compares the total with 24 GB instead of
the memory of the device the command sees; `plan.device=cuda` plans for that device instead of the one
train.device resolves to here (a GPU run planned from a machine without one); `plan.world_size=N` plans one
rank of N (torchrun): under train.strategy=fsdp each rank holds 1/N of the base and of the trainable state
(estimate.shard_parts), under ddp everything. `--json` prints one JSON object instead of the table.

Only the model's config is read (AutoConfig: a Hub id or a local directory), never its weights; the
numbers are ppo_cli/plan/estimate.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError
from ppo_cli.plan.estimate import (
    ModelShape,
    RunShape,
    Sharding,
    estimate,
    fits,
    gb,
    shard_parts,
    total,
    with_vllm,
)
from ppo_cli.plan.shape import (
    checkpoint_file_bytes,
    data_length,
    load_model_config,
    model_shape,
    run_shape,
    separate_reward_model_bytes,
    stored_dtype_bytes,
)

COMMAND = "plan"


TRAIN_COMMANDS = ("train-sft", "train-rm", "train-ppo")


STAGES = {"train-sft": "sft", "train-rm": "rm", "train-ppo": "ppo"}


def usage() -> str:
    return (
        "usage: ppo-cli plan COMMAND [key=value ...] [plan.device_memory_gb=GB] [plan.device=DEVICE]\n"
        "                    [plan.world_size=N] [--json]\n\n"
        "The peak memory a run of COMMAND (train-sft, train-rm or train-ppo) with these overrides will need\n"
        "on the device it would use, and whether it fits: base weights, LoRA weights, gradients, AdamW\n"
        "state, activations, logits and (train-ppo) the rollout KV cache. Reads the model's config only.\n\n"
        "  plan.device_memory_gb=GB  compare with GB instead of the device's memory\n"
        "  plan.device=DEVICE        plan for DEVICE (cpu, cuda, cuda:1) instead of train.device's device here\n"
        "  plan.world_size=N         plan one rank of N (train.strategy=fsdp: each holds 1/N of the base)\n"
        "  --json                    one JSON object: total_bytes, parts, device, fits, suggestions (and\n"
        "                            per_rank with plan.world_size or train.strategy=fsdp)"
    )


def device_memory(device, override_gb: float | None) -> float | None:
    """Bytes the run may use: plan.device_memory_gb, else free CUDA memory, else total RAM."""
    if override_gb is not None:
        return float(override_gb) * 1e9
    if device.type == "cuda":
        import torch

        if not torch.cuda.is_available():  # plan.device=cuda on a machine without one
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    if device.type == "cpu":
        try:
            return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            return None
    return None


def memory_source(device, override_gb: float | None) -> str:
    if override_gb is not None:
        return "plan.device_memory_gb"
    if device_memory(device, None) is None:
        return "unknown"
    return {"cuda": "free CUDA memory", "cpu": "total RAM"}.get(device.type, "unknown")


COUNTED = {
    "cpu": (
        "peak RSS of the process: the Python process with torch and transformers imported, the checkpoint "
        "file's pages and the converted weights while it loads (a 4/8-bit base is read in full precision, "
        "then quantized; where its unquantized layers keep the file's dtype, the whole file stays mapped for "
        "the run), and the training step's tensors"
    ),
    "cuda": (
        "peak memory allocated by tensors (torch.cuda.max_memory_allocated): the weights as they sit on the "
        "GPU (a 4/8-bit base quantized, layer by layer as it loads) and the training step's tensors; the "
        "checkpoint file is read in CPU RAM, not counted here; the CUDA context (~0.3-1 GB) and the caching "
        "allocator's slack come on top"
    ),
}


def peak(shape: ModelShape, run: RunShape, sharding: Sharding | None = None) -> int:
    """The total of `run`'s parts: one process's, or one rank's under fsdp (`sharding`)."""
    parts = estimate(shape, run)
    return total(parts if sharding is None else shard_parts(shape, run, parts, sharding))


def suggestions(
    shape: ModelShape, run: RunShape, cfg: DictConfig, limit: float | None, sharding: Sharding | None = None
) -> list[dict]:
    """Changes, each on top of the previous ones, until the total (a rank's under fsdp) fits: gradient
    checkpointing, 4-bit (CUDA only: bitsandbytes), then halving the micro-batch (more accumulation keeps
    the batch)."""
    if limit is None or peak(shape, run, sharding) <= limit:
        return []
    found: list[dict] = []
    overrides: list[str] = []

    def add(change: str, new: RunShape) -> RunShape:
        """Record `change` when it lowers the total (past a point, e.g. the checkpoint load, it does not)."""
        new_total = peak(shape, new, sharding)
        if new_total >= (found[-1]["total_bytes"] if found else peak(shape, run, sharding)):
            return new
        overrides[:] = [o for o in overrides if o.split("=")[0] not in change]
        overrides.append(change)
        found.append({"overrides": list(overrides), "total_bytes": new_total, "fits": new_total <= limit})
        return new

    if not run.gradient_checkpointing:
        run = add("model.gradient_checkpointing=true", dataclasses.replace(run, gradient_checkpointing=True))
    if found and found[-1]["fits"]:
        return found
    if run.quant_bits is None and not run.cpu and run.lora_r is not None:
        run = add("model.load_in_4bit=true", dataclasses.replace(run, quant_bits=4))
    batch, accum = int(cfg.train.batch_size), int(cfg.train.grad_accum_steps)
    while not (found and found[-1]["fits"]) and run.micro_batch > 1:
        accum *= 2
        change = f"train.grad_accum_steps={accum}"
        if run.stage != "ppo":
            batch = max(1, batch // 2)
            change = f"train.batch_size={batch} {change}"
        run = add(change, dataclasses.replace(run, micro_batch=max(1, run.micro_batch // 2)))
    return found


def vllm_engine_bytes(cfg: DictConfig, config, shape, run, device, override_gb: float | None) -> int:
    """vLLM's engine in train-ppo: on a GPU the share gpu_memory_utilization gives it of the device (its
    weights and cache live in it); otherwise, or with generation.vllm.kv_cache_gb, the base at the
    sampling dtype plus the KV cache it is given (on CPU: one rollout batch's, as vllm_sampler sizes it)."""
    import torch

    from ppo_cli.plan.estimate import VLLM_CPU_OVERHEAD
    from ppo_cli.vllm_sampler import kv_cache_bytes as vllm_kv_cache_bytes

    settings = cfg.generation.vllm
    limit = device_memory(device, override_gb)
    if device.type == "cuda" and settings.kv_cache_gb is None and limit is not None:
        return int(float(settings.gpu_memory_utilization) * limit)
    dtype = torch.bfloat16 if run.act_bytes == 2 else torch.float32
    if settings.kv_cache_gb is not None:
        kv = int(float(settings.kv_cache_gb) * 2**30)
    else:
        kv = vllm_kv_cache_bytes(config, dtype, run.rollout_batch, run.seq_len)
    overhead = VLLM_CPU_OVERHEAD if device.type == "cpu" else 0
    return int(shape.params * run.act_bytes) + kv + overhead


def strategy_of(cfg: DictConfig) -> str:
    """train.strategy: ddp or fsdp (ddp where the config has no such key)."""
    return str(OmegaConf.select(cfg, "train.strategy", default="ddp"))


def sharding_of(cfg: DictConfig, stage: str, device, world_size: int) -> Sharding | None:
    """How one rank of `world_size` holds the model: None where it holds all of it (ddp, or one process,
    which fsdp leaves unsharded as the run does)."""
    if strategy_of(cfg) != "fsdp" or world_size <= 1:
        return None
    reshard = bool(OmegaConf.select(cfg, "train.fsdp.reshard_after_forward", default=True))
    accum = int(OmegaConf.select(cfg, "train.grad_accum_steps", default=1))
    offload = bool(OmegaConf.select(cfg, "train.fsdp.cpu_offload", default=False))
    quantized = bool(cfg.model.load_in_4bit or cfg.model.load_in_8bit)
    return Sharding(
        world_size=world_size,
        gathered_layers=2 if reshard else 10**9,  # every layer, capped at the model's count
        unsharded_grads=stage != "ppo" and accum > 1,
        offload=offload and device.type == "cuda",  # on a CPU run the shards are in its memory anyway
        # a quantized base loads whole on every rank, shards kept beside it; any other on rank 0 alone,
        # into CPU memory, which drops each unit once sent
        whole_load=quantized or device.type == "cpu",
        load_keeps_shards=quantized,
        frees_returned=device.type == "cpu",  # StageRun: sharded on CPU, freed blocks are unmapped at once
    )


def per_rank(
    cfg: DictConfig,
    parts: dict[str, int],
    shape: ModelShape,
    run: RunShape,
    sharding: Sharding | None,
    world_size: int,
    limit: float | None,
) -> dict[str, Any]:
    """The --json object's `per_rank`: one rank's total and parts (fsdp's shards; ddp's are the whole)."""
    mine = parts if sharding is None else shard_parts(shape, run, parts, sharding)
    return {
        "strategy": strategy_of(cfg),
        "world_size": world_size,
        "total_bytes": total(mine),
        "fits": fits(total(mine), limit),
        "parts": mine,
    }


def make_plan(
    cfg: DictConfig,
    command: str,
    device=None,
    override_gb: float | None = None,
    data_tokens: int | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """The plan of `command` with the composed `cfg`: one dict (the --json object). `data_tokens`: the
    longest sequence of the data when the caller has already encoded it (a stage at start-up); otherwise
    the plan reads data.train itself (`data_length`). `world_size`: the ranks the run will have; with more
    than one, or train.strategy=fsdp, the plan gains `per_rank` and `fits` is one rank's verdict."""
    from ppo_cli.models import resolve_device

    stage = STAGES[command]
    device = device if device is not None else resolve_device(str(cfg.train.device))
    config = load_model_config(cfg.model)
    shape = model_shape(config)
    if stage == "rm":  # a sequence classifier: a score head instead of the lm_head
        shape = dataclasses.replace(shape, tie_word_embeddings=True)
    file_bytes = checkpoint_file_bytes(cfg.model.name_or_path, shape, config)
    if data_tokens is None:
        data_tokens, lengths = data_length(cfg, stage)
    else:
        lengths = f"longest sequence of data.train as the run encoded it: {data_tokens} tokens"
    run = run_shape(cfg, stage, shape, device, file_bytes, stored_dtype_bytes(config), data_tokens)
    parts = estimate(shape, run)
    if stage == "ppo" and cfg.generation.engine == "vllm":
        parts = with_vllm(
            parts,
            vllm_engine_bytes(cfg, config, shape, run, device, override_gb),
            device.type == "cuda" and bool(cfg.generation.vllm.sleep_during_update),
        )
    separate = separate_reward_model_bytes(cfg, run) if stage == "ppo" else 0
    if separate:
        parts["separate reward model"] = separate
    limit = device_memory(device, override_gb)
    total_bytes = total(parts)
    sharding = sharding_of(cfg, stage, device, world_size)
    plan = {
        "command": command,
        "model": str(cfg.model.name_or_path),
        "parameters": shape.params,
        "device": str(device),
        "device_memory_bytes": None if limit is None else int(limit),
        "device_memory_of": memory_source(device, override_gb),
        "total_bytes": total_bytes,
        "fits": fits(total_bytes, limit),
        "parts": parts,
        "lengths": lengths,
        "counted": COUNTED.get(device.type, COUNTED["cuda"]),
        "suggestions": suggestions(shape, run, cfg, limit, sharding),
    }
    if world_size > 1 or strategy_of(cfg) == "fsdp":
        plan["per_rank"] = per_rank(cfg, parts, shape, run, sharding, world_size, limit)
        plan["fits"] = plan["per_rank"]["fits"]
    return plan


def summary_row(cfg: DictConfig, stage: str, device, data_tokens: int | None = None) -> str | None:
    """The stages' start-up row: the plan's total, or None when it cannot be made (never an error).
    `data_tokens`: the longest sequence of the examples the stage has already loaded (`longest_tokens`), so
    that start-up does not read and tokenize data.train a second time."""
    try:
        plan = make_plan(cfg, f"train-{stage}", device, data_tokens=data_tokens)
    except Exception:  # noqa: BLE001 - a plan is a hint: it must never stop a run
        return None
    return (
        f"{gb(plan['total_bytes'])} peak on {plan['device']} (ppo-cli plan train-{stage} ... for the parts)"
    )


def table_title(plan: dict[str, Any]) -> str:
    """The table's title; with `per_rank`, whose memory it is: "per rank (fsdp over 2 ranks)"."""
    title = f"ppo-cli plan {plan['command']}: peak memory"
    rank = plan.get("per_rank")
    if rank is not None:
        title += f" per rank ({rank['strategy']} over {rank['world_size']} ranks)"
    return f"{title} on {plan['device']}"


def print_table(plan: dict[str, Any]) -> None:
    """The console's plan: the parts (one rank's with `per_rank`), the total, the device and the changes."""
    from rich.table import Table

    from ppo_cli.logger import make_console

    console = make_console()
    shown = plan.get("per_rank", plan)
    table = Table(title=table_title(plan), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for name, value in shown["parts"].items():
        if value:  # e.g. a checkpoint load that needs nothing beyond the step
            table.add_row(name, gb(value))
    table.add_row("[bold]total[/]", f"[bold]{gb(shown['total_bytes'])}[/]", end_section=True)
    if shown is not plan:
        table.add_row("one process, unsharded", gb(plan["total_bytes"]))
    limit = plan["device_memory_bytes"]
    if limit is not None:
        table.add_row(f"device memory ({plan['device_memory_of']})", gb(limit))
        table.add_row("fits", "yes" if plan["fits"] else "[bold red]no[/]")
    console.print(table)
    console.print(f"model: {plan['model']} ({plan['parameters']:,} parameters)")
    console.print(f"sequence lengths: {plan['lengths']}.")
    console.print(f"counted on {plan['device']}: {plan['counted']}.")
    for i, change in enumerate(plan["suggestions"], 1):
        verdict = "fits" if change["fits"] else "does not fit yet"
        console.print(f"{i}. {' '.join(change['overrides'])}: {gb(change['total_bytes'])} ({verdict})")


def plan_overrides(overrides: list[str]) -> DictConfig:
    """plan.* keys, checked against PlanConfig: its values."""
    from ppo_cli.command_config import PlanConfig
    from ppo_cli.schema import did_you_mean

    schema = OmegaConf.structured(PlanConfig)
    for item in overrides:
        key, _, value = item.partition("=")
        name = key.removeprefix("plan.")
        if name not in schema:
            hint = did_you_mean(name, list(schema.keys())).replace(" Did you mean ", " Did you mean plan.")
            raise UserError(f"unknown key {key}: ppo-cli plan has no such setting.{hint}")
        try:
            schema.merge_with_dotlist([f"{name}={value}"])
        except Exception as exc:  # noqa: BLE001 - a wrong type
            raise UserError(f"{key}={value}: {str(exc).splitlines()[0]}") from exc
    value = schema.device_memory_gb
    if value is not None and not value > 0:
        raise UserError(f"plan.device_memory_gb={value} must be a number of GB above 0.")
    if schema.world_size < 1:
        raise UserError(f"plan.world_size={schema.world_size} must be a number of ranks, 1 or more.")
    if schema.device is not None:
        import torch

        try:
            kind = torch.device(schema.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda", "mps"):
            raise UserError(f"plan.device={schema.device} is not a device: use cpu, cuda, cuda:N or mps.")
    return schema


def compose(command: str, overrides: list[str]) -> DictConfig:
    """`command`'s config with `overrides`, as the command composes it (errors exit 2 as plan's)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ppo_cli.app import config_name_of, describe_composition_error, reject_unknown_keys
    from ppo_cli.config import register_configs
    from ppo_cli.paths import conf_dir

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name_of(command), overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - every composition failure is a user error
        raise UserError(describe_composition_error(exc, command)) from exc
    finally:
        GlobalHydra.instance().clear()
    reject_unknown_keys(cfg, command)
    return cfg


def main(args: list[str]) -> None:
    from ppo_cli.app import fail, quiet_libraries

    if not args or args[0] == "help" or {"-h", "--help"}.intersection(args):
        print(usage())
        sys.exit(0)
    command, rest = args[0], args[1:]
    if command not in TRAIN_COMMANDS:
        fail(
            f"plan needs a training command first: one of {', '.join(TRAIN_COMMANDS)}, not '{command}'.",
            COMMAND,
        )
    flags = [a for a in rest if a.startswith("-")]
    unknown = [f for f in flags if f != "--json"]
    if unknown:
        fail(f"unknown flag {unknown[0]}: plan takes --json and overrides (key=value).", COMMAND)
    overrides = [a for a in rest if not a.startswith("-")]
    quiet_libraries()
    try:
        own = plan_overrides([o for o in overrides if o.startswith("plan.")])
        cfg = compose(command, [o for o in overrides if not o.startswith("plan.")])
        module = {"train-sft": None, "train-rm": "ppo_cli.rm.train", "train-ppo": "ppo_cli.ppo.train"}[
            command
        ]
        if module is not None:
            import importlib

            importlib.import_module(module).prepare(cfg)
        if OmegaConf.is_missing(cfg.model, "name_or_path"):
            raise UserError(
                "missing required value for model.name_or_path: set it on the command line, e.g. "
                "model.name_or_path=Qwen/Qwen2.5-0.5B."
            )
        if own.device is not None:
            import torch

            device = torch.device(own.device)
        else:
            device = None
        from ppo_cli.fsdp import check_fsdp

        check_fsdp(cfg)  # what train.strategy=fsdp refuses, the plan refuses too (exit 2)
        plan = make_plan(cfg, command, device, own.device_memory_gb, world_size=int(own.world_size))
    except UserError as exc:
        fail(str(exc), COMMAND)
    if "--json" in flags:
        print(json.dumps(plan, indent=2))
    else:
        print_table(plan)
