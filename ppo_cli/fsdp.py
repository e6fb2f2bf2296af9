"""train.strategy=fsdp: the base sharded across ranks with PyTorch FSDP2 (`fully_shard`), in every stage.

Under torchrun with train.strategy=fsdp, every decoder layer becomes one FSDP unit, and so do untied input
embeddings and output head; then the stage's outermost module (SFT's and the RM's peft model, PPO's
`Roles`) the root unit, which holds the rest (final norm, score/value heads, tied embeddings). LoRA
adapters live inside the layers they adapt, so they are sharded with them. Each rank keeps 1/world of every unit's parameters; a unit's forward
all-gathers them, and the backward reduce-scatters (averages over ranks) the gradients, as DDP's
all-reduce does. With one process there is nothing to shard: the stage runs as it does under ddp.

Precision: the trainable parameters (LoRA, heads) are fp32 and the frozen base keeps its dtype. FSDP2
all-gathers a unit whose parameters mix dtypes as bytes, and reduce-scatters only gradients, which all
belong to fp32 parameters: no MixedPrecisionPolicy is needed, a bf16 base included.

Loading: rank 0 alone reads the weights, into CPU memory (`load_device`); every other rank builds the
same model on the meta device (its structure: names, shapes, dtypes, no storage). Then, unit by unit,
every rank shards it, the other ranks allocate their (empty) shards, and rank 0 sends each tensor of the
unit whole, each rank keeping its shard, and drops its whole copy once sent (`shard`,
`_receive_from_rank0`): the other ranks never hold more than their shards and one whole tensor (plus
the root's own small tensors, sent whole before the root is sharded). Rank 0 drops each unit's whole
weights once sent, the file's mapped pages included (`drop_file_pages`: the checkpoint is one mapping,
which would otherwise stay resident until the last tensor goes), so it holds at most the whole base, never
the whole base beside all its shards. On a GPU, FSDP moves each unit to the device as it shards it, so no
GPU holds the whole base.
The trainable weights (new LoRA, heads) come from rank 0 with the rest: one source. A quantized base
cannot be built on the meta device (bitsandbytes quantizes while it loads): with model.load_in_4bit every
rank loads it, as under ddp, and `fully_shard` keeps each rank's shard (the trainable weights are
broadcast from rank 0 first); a 4-bit base is a quarter of the bf16 bytes.

Units: each decoder layer, and the input embeddings and the output head where they are not tied
(`embedding_units`); the root holds the rest. A root stays gathered through the step, so with a large
vocabulary keeping untied embeddings out of it halves what a rank holds gathered on a small model.

Checkpoints keep DDP's format: the trainable state and the optimizer state are gathered to full tensors
on save (`full_tensors`, every rank takes part, rank 0 writes), and a resume cuts each rank's shard out
of the full tensors (`copy_full_into`, `shard_optimizer_state`). The trainable state is small, the
files are the ones a ddp run writes, and a checkpoint resumes on any number of ranks and either strategy.
final/ is written from the gathered trainable state (`gathered_state`), as a plain peft adapter.

Only this module and ppo_cli/dist.py touch torch.distributed (tests/test_distributed.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ppo_cli.dist import DistInfo, broadcast_from_rank0, broadcast_parameters
from ppo_cli.errors import UserError
from ppo_cli.models.devices import drop_file_pages, release_freed_cpu_memory


def check_fsdp(cfg: DictConfig) -> None:
    """Refuse, before anything loads, what train.strategy=fsdp cannot run (exit 2): vLLM sampling and an
    8-bit base. Refused with one process too, where fsdp would run unsharded: the same command must not
    fail once scaled out."""
    if str(OmegaConf.select(cfg, "train.strategy", default="ddp")) != "fsdp":
        return
    if str(OmegaConf.select(cfg, "generation.engine", default="hf")) == "vllm":
        raise UserError(
            "generation.engine=vllm cannot sample for train.strategy=fsdp: vLLM needs the whole policy on "
            "each rank, while FSDP keeps only a shard of the base there. Use generation.engine=hf (every "
            "rank generates its own prompts on the shards), or train.strategy=ddp with generation.engine=vllm."
        )
    if cfg.model.load_in_8bit:
        # A 4-bit base shards (bitsandbytes' Params4bit keeps its quantization state through FSDP2's
        # gathers); LLM.int8's Int8Params loses its CB/SCB state in a gathered copy.
        raise UserError(
            "model.load_in_8bit=true cannot be sharded with train.strategy=fsdp: bitsandbytes' 8-bit weights "
            "lose their quantization state in FSDP's gathered copies. Use train.strategy=ddp for an 8-bit "
            "base, or shard a 4-bit one (model.load_in_4bit=true) or a bf16 one (model.dtype=bfloat16)."
        )


def enabled(cfg: DictConfig, dist: DistInfo) -> bool:
    """Whether this run shards: train.strategy=fsdp and more than one rank."""
    return str(cfg.train.strategy) == "fsdp" and dist.enabled


def loads_on_rank0(cfg: DictConfig, dist: DistInfo) -> bool:
    """Whether this run shards a base that only rank 0 reads (every other rank builds it on the meta
    device): fsdp over several ranks, a base that is not quantized."""
    return enabled(cfg, dist) and not (cfg.model.load_in_4bit or cfg.model.load_in_8bit)


def load_device(cfg: DictConfig, dist: DistInfo) -> torch.device | None:
    """Where this rank's loading puts the base's weights (`load_causal_lm`'s load_to): the meta device on
    the ranks that read nothing, the CPU on rank 0 (FSDP moves each unit to the rank's device as it shards
    it, so a GPU never holds the whole base), None (the run's device) when the base does not load on
    rank 0 alone."""
    if not loads_on_rank0(cfg, dist):
        return None
    return torch.device("cpu") if dist.rank == 0 else torch.device("meta")


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` holds FSDP units. (Not whether its parameters are DTensors now: a unit left
    gathered by a forward registers whole tensors until it is resharded.)"""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of the transformers model(s) inside `module`, found generically: the modules
    whose class a model names in `_no_split_modules` (its decoder layer), else the longest ModuleList."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    layers = [sub for sub in module.modules() if type(sub).__name__ in names]
    if layers:
        return layers
    lists = [sub for sub in module.modules() if isinstance(sub, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _mesh(dist: DistInfo):
    """One dimension over every rank, on the device the backend serves (cpu for gloo, cuda for nccl)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world_size,))


def _offload_policy(settings: DictConfig, dist: DistInfo):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    # On a CPU run the shards are in CPU memory already (and pinning needs a GPU).
    if settings.cpu_offload and dist.device.type == "cuda":
        return CPUOffloadPolicy()
    return OffloadPolicy()


def embedding_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embeddings and output heads of the transformers models inside `module`, when they do not
    share their weight (a tied pair must stay in one unit: the root's). As units of their own they are
    gathered only around their own passes instead of for the whole step with the root, which matters:
    with a large vocabulary they are a large share of a small model's weights."""
    from transformers import PreTrainedModel

    units: list[torch.nn.Module] = []
    inside: set[int] = set()  # the modules of a model already seen: its inner model (e.g. LlamaModel,
    # which has no output head of its own) must not make a tied input embedding a unit
    for sub in module.modules():
        if not isinstance(sub, PreTrainedModel) or id(sub) in inside:
            continue
        inside.update(id(m) for m in sub.modules())
        embed, head = sub.get_input_embeddings(), sub.get_output_embeddings()
        if embed is not None and head is not None and embed.weight is head.weight:
            continue
        # (a sequence classifier has no output embeddings: its score head stays in the root)
        units += [m for m in (embed, head) if m is not None and all(m is not u for u in units)]
    return units


def _direct_tensors(
    modules: Iterable[torch.nn.Module], names: dict[int, str]
) -> list[tuple[str, torch.Tensor]]:
    """(qualified name, tensor) of the parameters and buffers that `modules` hold themselves (not their
    children's), each tensor once (a tied weight under its first name), in the same order on every rank.
    names: module id -> its qualified name."""
    seen: set[int] = set()
    out = []
    for sub in modules:
        prefix = names[id(sub)] + "." if names[id(sub)] else ""
        for key, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append((prefix + key, tensor))
    return out


def shard(
    module: torch.nn.Module,
    settings: DictConfig,
    dist: DistInfo,
    forward_methods: Iterable[str] = (),
    from_rank0: bool = False,
) -> torch.nn.Module:
    """Shard `module` in place across the ranks: each decoder layer (with its LoRA adapters) one unit, the
    input embeddings and the output head each one unit where they are not tied (`embedding_units`), then
    `module` the root unit, which holds the rest (norms, score and value heads). settings: train.fsdp.
    forward_methods: methods of `module` other than forward through which its passes enter (e.g.
    Roles.values): FSDP gathers the root unit around them.

    from_rank0: only rank 0 loaded weights (`loads_on_rank0`; the other ranks' `module` is on the meta
    device). Unit by unit, every rank shards it, the others allocate their (empty) shards, and rank 0
    sends each of its tensors, dropping its whole copy once sent: the others never hold more than their
    shards and one whole tensor. The root's own
    tensors (small) are sent whole before it is sharded. Returns `module`, now an FSDPModule."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

    names = {id(sub): name for name, sub in module.named_modules()}
    full: dict[str, torch.Tensor] = {}
    if from_rank0:
        if dist.rank == 0:  # rank 0's whole tensors, each kept until it is sent
            full = dict(_direct_tensors(module.modules(), names))
    else:
        # One source for the trainable weights: rank 0's (the base comes from the same files on every rank).
        broadcast_parameters([p for p in module.parameters() if p.requires_grad], dist)
    mesh, offload = _mesh(dist), _offload_policy(settings, dist)
    # Offloaded shards live in CPU memory.
    shard_device = torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else dist.device
    units = decoder_layers(module) + embedding_units(module)
    for unit in units:
        fully_shard(
            unit,
            mesh=mesh,
            reshard_after_forward=bool(settings.reshard_after_forward),
            offload_policy=offload,
        )
        if from_rank0:
            if dist.rank != 0:
                unit.to_empty(device=shard_device)
            sent = _receive_from_rank0(_direct_tensors(unit.modules(), names), full, dist)
            # Rank 0's sent weights are the file's mapped pages (one mapping, unmapped at the end of the
            # load): drop them now, so that rank 0 never holds the whole base beside its shards. Buffers
            # are not sharded: the unit still reads them.
            in_use = {b.data_ptr() for b in unit.buffers()}
            drop_file_pages(t for t in sent if t.data_ptr() not in in_use)
            del sent
    if from_rank0:  # the root's own tensors, whole on every rank until the root is sharded
        inside = {id(sub) for unit in units for sub in unit.modules()}
        rest = [sub for sub in module.modules() if id(sub) not in inside]
        if dist.rank != 0:
            for sub in rest:
                sub.to_empty(device=dist.device, recurse=False)
        _receive_from_rank0(_direct_tensors(rest, names), full, dist)  # still the root's own: kept
        if full:  # every rank lists the same tensors: one left unsent is a bug, not a user error
            raise RuntimeError(f"fsdp: rank 0 did not send {sorted(full)[:5]}")
        # Rank 0's whole copy was in CPU memory: hand its freed pages back, or the heap keeps them and
        # the step's own allocations come on top (rank 0's peak would stay the whole base's).
        release_freed_cpu_memory(torch.device("cpu"))
    # The root keeps FSDP's default: gathered from its forward to the backward that follows at once.
    fully_shard(module, mesh=mesh, offload_policy=offload)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    return module


def _receive_from_rank0(
    tensors: list[tuple[str, torch.Tensor]], full: dict[str, torch.Tensor], dist: DistInfo
) -> list[torch.Tensor]:
    """Fill `tensors` (allocated, by name) from rank 0's whole ones (`full`, empty on the other ranks), one
    broadcast each: a rank keeps its shard of a sharded parameter, the whole of anything else. Rank 0's
    tensors already hold the values (its shards were cut from them); each whole copy is taken out of
    `full` once sent, and returned (rank 0's; none elsewhere). Every rank must call it, with the same
    names in the same order."""
    sent = []
    for name, tensor in tensors:
        if dist.rank == 0:
            sent.append(full.pop(name).detach())
            whole = sent[-1].to(dist.device)
        else:  # a DTensor's shape is the whole tensor's
            whole = torch.empty(tensor.shape, dtype=tensor.dtype, device=dist.device)
        broadcast_from_rank0(whole, dist)
        if dist.rank != 0:
            copy_full_into(tensor, whole)
        del whole
    return sent


def describe(module: torch.nn.Module, dist: DistInfo, from_rank0: bool = False) -> dict[str, str]:
    """The start panel's row of a sharded run (empty when `module` is not sharded): the units, what rank 0
    holds of the weights, and who read them (`from_rank0`: rank 0 alone)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not is_sharded(module):
        return {}
    units = sum(isinstance(m, FSDPModule) for m in module.modules())
    params = list(module.parameters())
    full = sum(p.numel() * p.element_size() for p in params) / 2**20
    local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params) / 2**20
    return {
        "fsdp": f"sharded over {dist.world_size} ranks: {units} units; rank 0 holds {local:.1f} of "
        f"{full:.1f} MiB of weights; " + ("read by rank 0 alone" if from_rank0 else "read by every rank")
    }


def set_gradient_sync(module: torch.nn.Module, sync: bool) -> None:
    """Gradient accumulation: with sync=False the next backward keeps its gradients unreduced (the
    micro-batches before the last); the last one's backward reduce-scatters the sum. A no-op on a module
    that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)


def to_shards(module: torch.nn.Module) -> None:
    """Put every unit of a sharded module back on its shards, before its parameters are read or changed
    outside a pass. Why: after a forward without gradients the root stays gathered (FSDP's default for a
    root), and so does every layer with reshard_after_forward=false; their registered parameters are then
    the gathered copies, which FSDP frees or overwrites later: a change to them would be lost, and a
    read may meet freed storage. A no-op on a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def full_tensors(value: Any) -> Any:
    """`value` (a tensor, or dicts / lists / tuples of them) with every DTensor shard replaced by the full
    tensor: a collective, which every rank must call on the same structure. Anything else is returned
    as is, so a ddp run's state passes through unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: full_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(full_tensors(v) for v in value)
    return value


def _shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full` laid out as `param` (a DTensor) is: cut locally, no communication
    (every rank read the same full tensor)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full (a checkpoint's tensor): for a shard, this rank's part of it."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            param.to_local().copy_(_shard_like(param, full).to_local())
        else:
            param.copy_(full.to(param.device, param.dtype))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A full optimizer state dict (`full_tensors` of one, as checkpoints hold it) with each state
    tensor shaped like its parameter cut to this rank's shard, for `optimizer.load_state_dict`."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entries in state_dict["state"].items():
        param = params[int(index)]
        state[index] = {
            key: _shard_like(param, value)
            if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in entries.items()
        }
    return {**state_dict, "state": state}


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full trainable tensors of a sharded `module` by parameter name, on the CPU, for its final/
    (save_pretrained(state_dict=...)); None when it is not sharded. Every rank must call it."""
    if not is_sharded(module):
        return None
    to_shards(module)
    trainable = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    # Cloned: a gathered tensor may be a view into FSDP's padded buffer, which safetensors refuses.
    return {name: t.cpu().clone() for name, t in full_tensors(trainable).items()}
