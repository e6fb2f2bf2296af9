"""TRL 1.16's GRPO (`trl.GRPOTrainer`) on a quality-benchmark task with a reward function, run with the Python
of the virtual environment that has trl 1.16 (`make trl-venv`; see bench/README.md, "Quality benchmark"):

    TRL_PY bench/trl_grpo.py BASE SFT_ADAPTER PROMPTS.jsonl OUT_DIR --reward-fn MOD:FUNC
        [--steps 80 --batch-size 8 --num-generations 4 --lr 1e-3 --max-completion-length 64
         --temperature 0.7 --seed 0]

The setting mirrors `ppo-cli train-ppo ppo.advantage_estimator=grpo`'s: the policy starts from the SFT policy
(the SFT adapter merged into the base) with a fresh LoRA of ppo-cli's default shape (r=16, alpha=32, no
dropout, peft's default targets for the architecture: ppo-cli's `lora.target_modules` is null); each step
samples `--num-generations` completions for each of `--batch-size` prompts (one generation batch of
batch_size x num_generations sequences, also the optimizer's batch: `steps_per_generation` 1), at
`temperature` with no top-k/top-p, at most `max_completion_length` new tokens, fp32 on the CPU, no vLLM.
The reward is a Python function of (prompts, completions) (`--reward-fn`, the spec ppo-cli's `reward_fn=`
takes), called on the decoded completions (cut at their first EOS).

Everything else is GRPOConfig's default in TRL 1.16:
  - beta = 0.0: no KL penalty and no reference model at all;
  - loss_type = "dapo": token losses summed over the batch, divided by its number of completion tokens;
  - num_iterations = 1: one gradient step per generation batch (the clipped ratio is 1 at that step),
    epsilon = 0.2 (epsilon_high = epsilon), importance_sampling_level = "token";
  - scale_rewards = "group": advantage = (reward - group mean) / group std;
  - mask_truncated_completions = False, top_entropy_quantile = 1.0, entropy_coef = 0.0;
  - AdamW (weight decay 0), linear decay of the learning rate, no warm-up, max_grad_norm 1.0.
Gradient checkpointing (GRPOConfig's default: on) is off, as in ppo-cli's defaults: it changes the time only.

Writes OUT_DIR/policy/ (the policy merged into one full model directory + the tokenizer),
OUT_DIR/metrics.jsonl (TRL's logged metrics, one JSON line per step) and OUT_DIR/done.json.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from trl_common import load_jsonl, log_recorder, merged_causal, train_and_save  # noqa: E402  (bench/)


def reward_function(spec: str):
    """The `module:function` of ppo-cli's `reward_fn=` (called with prompts and completions), in the form
    GRPOTrainer calls its reward functions: keywords, extra columns and trainer state as **kwargs."""
    module, name = spec.split(":")
    sys.path.insert(0, str(REPO))
    func = getattr(importlib.import_module(module), name)

    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [float(r) for r in func(list(prompts), list(completions))]

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def run(ns: argparse.Namespace) -> None:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    assert trl.__version__.startswith("1.16"), f"expected trl 1.16, found {trl.__version__}"
    torch.manual_seed(ns.seed)
    tok = AutoTokenizer.from_pretrained(ns.sft)  # ppo-cli's SFT product: it holds the pad token
    tok.padding_side = "left"
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in load_jsonl(ns.prompts)]})
    policy = merged_causal(ns.base, ns.sft)
    policy.generation_config.pad_token_id = tok.pad_token_id

    out = Path(ns.out)
    args = GRPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=ns.batch_size * ns.num_generations,  # completions, not prompts
        gradient_accumulation_steps=1,
        num_generations=ns.num_generations,
        max_completion_length=ns.max_completion_length,
        temperature=ns.temperature,
        learning_rate=ns.lr,
        max_steps=ns.steps,
        gradient_checkpointing=False,
        use_vllm=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=ns.seed,
        use_cpu=True,
        bf16=False,
    )
    log: list[dict] = []

    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_function(ns.reward_fn),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ns.lora_targets, task_type="CAUSAL_LM"
        ),
        callbacks=[log_recorder(log)],
    )
    train_and_save(trainer, trainer.model.merge_and_unload, tok, log, out, trl.__version__)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("sft")
    p.add_argument("prompts", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--reward-fn", required=True, help="module:function, as ppo-cli's reward_fn=")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lora-targets", default=None, help="LoRA target modules (default: peft's, as ppo-cli)")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ns.out.mkdir(parents=True, exist_ok=True)
    run(ns)


if __name__ == "__main__":
    main()
