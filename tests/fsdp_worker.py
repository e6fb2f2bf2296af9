"""One rank of tests/test_fsdp.py's sharding checks, started by torchrun: the tiny base with a LoRA
adapter, loaded as the stages load it under train.strategy=fsdp (rank 0 reads the weights, rank 1 builds
the model on the meta device and receives its shards), sharded by ppo_cli.fsdp, reports into
OUT/rank<R>.json what this rank held before sharding, what it holds after, and what a training step and a
checkpoint round trip give.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py MODEL_DIR OUT DTYPE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from ppo_cli import checkpoint as ckpt
from ppo_cli import dist, fsdp
from ppo_cli.models import keep_trainable_in_fp32, load_causal_lm, load_tokenizer
from ppo_cli.plan.command import compose


def local_bytes(params) -> int:
    """Bytes this rank holds of `params` (a shard's local part, or the whole tensor)."""
    total = 0
    for p in params:
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def main(model_dir: str, out: str, dtype: str) -> None:
    info = dist.init_distributed("cpu")
    ckpt.seed_everything(0)
    cfg = compose(
        "train-sft", [f"model.name_or_path={model_dir}", f"model.dtype={dtype}", "train.strategy=fsdp"]
    )
    tokenizer = load_tokenizer(model_dir)
    base = load_causal_lm(cfg.model, tokenizer, info.device, load_to=fsdp.load_device(cfg, info))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    keep_trainable_in_fp32(model)
    # LoRA B starts at zero: give it weights, so that a step's gradients reach every adapter tensor
    # (rank 0's: the other rank's are on the meta device, and come from rank 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    frozen_full = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    loaded_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    settings = OmegaConf.create({"reshard_after_forward": True, "cpu_offload": False})
    layers = len(fsdp.decoder_layers(model))
    fsdp.shard(model, settings, info, from_rank0=fsdp.loads_on_rank0(cfg, info))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # What every rank received, against the files and rank 0's adapter (gathered: a collective).
    received = fsdp.full_tensors({n: p.detach() for n, p in model.named_parameters()})
    files_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    reference, reference_buffers = files_model.state_dict(), dict(files_model.named_buffers())
    base_mismatches = []
    for name, tensor in received.items():
        if "lora_" in name:
            continue
        files = reference[name.removeprefix("base_model.model.").replace(".base_layer", "")]
        # The embedding rows the files have (loading adds one for the tokenizer's pad token).
        if not torch.equal(tensor[: files.shape[0]], files):
            base_mismatches.append(name)
    lora_b = [received[n] for n in received if "lora_B" in n]
    buffers_match = all(
        torch.equal(b, reference_buffers[n.removeprefix("base_model.model.")])
        for n, b in model.named_buffers()
    )

    # One training step on this rank's own rows (FSDP averages the gradients over the ranks).
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.arange(8).reshape(2, 4) + 10 + info.rank
    loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()

    # The checkpoint round trip: full tensors out, this rank's shards back in, unchanged.
    state = fsdp.full_tensors(ckpt.trainable_state(model))
    opt_state = fsdp.full_tensors(optimizer.state_dict())
    before = [p.to_local().clone() for p in trainable]
    opt_before = [
        t.to_local().clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, DTensor)
    ]
    with torch.no_grad():
        for p in trainable:
            p.to_local().zero_()
    ckpt.load_trainable_state(model, state, "round trip")
    optimizer.load_state_dict(fsdp.shard_optimizer_state(optimizer, opt_state))
    after = [p.to_local() for p in trainable]
    opt_after = [t.to_local() for s in optimizer.state.values() for t in s.values() if isinstance(t, DTensor)]
    report = {
        "rank": info.rank,
        "loaded_bytes": loaded_bytes,
        "base_mismatches": base_mismatches,
        "buffers_match_files": buffers_match,
        "lora_b_norms": [round(float(t.norm()), 6) for t in lora_b],
        "layers": layers,
        "frozen_full_bytes": frozen_full,
        "frozen_local_bytes": local_bytes(frozen),
        "frozen_dtypes": sorted({str(p.dtype) for p in frozen}),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "all_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "loss": float(loss),
        "grad_norm": float(norm.full_tensor() if isinstance(norm, DTensor) else norm),
        "state_shapes": {k: list(v.shape) for k, v in state.items()},
        "state_is_full": all(not isinstance(v, DTensor) for v in state.values()),
        "weights_round_trip": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "optimizer_round_trip": len(opt_before) > 0
        and all(torch.equal(a, b) for a, b in zip(opt_before, opt_after, strict=True)),
        "gathered_keys": sorted(fsdp.gathered_state(model) or {}),
    }
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(report))
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])  # torchrun helpers append logger.progress=false
