"""TRL 1.12's PPO (`trl.experimental.ppo.PPOTrainer`) on a quality-benchmark task, run with the Python of
a virtual environment that has trl==1.12.0 (see bench/README.md, "Quality benchmark"):

    TRL_PY bench/trl_ppo.py BASE SFT_ADAPTER PROMPTS.jsonl OUT_DIR (--reward-fn MOD:FUNC | --reward-model DIR)
        [--steps 80 --batch-size 32 --lr 1e-3 --kl-coef 0.05 --response-length 64 --temperature 0.7 --seed 0]

The setting mirrors `ppo-cli train-ppo`'s: the policy starts from the SFT policy (the SFT adapter merged
into the base) with a fresh LoRA of ppo-cli's default shape (r=16, alpha=32, no dropout, peft's default
targets), and the reference is that SFT policy (`ref_model=None`: TRL disables the adapter); one rollout
of `batch_size` prompts per step, 1 minibatch, 4 PPO epochs, sampling at `temperature` with no top-k/top-p,
`stop_token="eos"` (responses are truncated after their first EOS and scored there), no missing-EOS
penalty and `kl_coef` on the raw scores (TRL's defaults), linear decay of the learning rate, fp32.

The reward is a reward model (`--reward-model`: a sequence-classification LoRA adapter on the base, as
TRL's RewardTrainer or ppo-cli's train-rm saves it, merged for TRL; the value model starts from it as in
TRL's examples) or a Python function of (prompts, completions) (`--reward-fn`). TRL 1.12's PPOTrainer takes
only a model, so for a function the trainer's `get_reward` is wrapped: a call with the placeholder reward
model decodes the responses and calls the function; every other call (the value model) is TRL's own.
The value model then starts from the SFT policy's weights with a fresh score head.

Writes OUT_DIR/policy/ (the policy merged into one full model directory + the tokenizer) and
OUT_DIR/metrics.jsonl (TRL's logged metrics per step).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from trl_common import load_jsonl, log_recorder, merged_causal, train_and_save  # noqa: E402  (bench/)


def _merged_classifier(base: str, adapter: str | None, pad_token_id: int, sft_adapter: str | None = None):
    """A sequence classifier on the base: with a reward adapter merged, or (value model for a reward
    function) the SFT adapter's weights merged and a fresh score head."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_token_id
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    causal = merged_causal(base, sft_adapter)
    missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
    assert all(k.startswith("score") for k in missing), missing
    return model


class FunctionReward:
    """Stands in for TRL's reward model; `get_reward` below calls the function instead."""

    def __init__(self, spec: str, tokenizer, prompts_by_ids: dict[tuple[int, ...], str]):
        module, name = spec.split(":")
        sys.path.insert(0, str(REPO))
        self.func = getattr(importlib.import_module(module), name)
        self.tokenizer = tokenizer
        self.prompts_by_ids = prompts_by_ids

    def to(self, *args, **kwargs):  # TRL moves its models to the device
        return self

    def eval(self):
        return self

    def modules(self):  # TRL disables dropout module by module
        return iter(())

    def scores(self, query_responses, pad_token_id: int, context_length: int):
        import torch

        queries = [
            tuple(t for t in row.tolist() if t != pad_token_id) for row in query_responses[:, :context_length]
        ]
        responses = query_responses[:, context_length:]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        prompts = [self.prompts_by_ids.get(q, "") for q in queries]
        return torch.tensor(self.func(prompts, texts), dtype=torch.float32, device=query_responses.device)


def run(ns: argparse.Namespace) -> None:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    assert trl.__version__ == "1.12.0", f"expected trl 1.12.0, found {trl.__version__}"
    torch.manual_seed(ns.seed)
    tok = AutoTokenizer.from_pretrained(ns.sft)  # ppo-cli's SFT product: it holds the pad token
    tok.padding_side = "left"
    rows = load_jsonl(ns.prompts)
    encoded = [tok(r["prompt"])["input_ids"] for r in rows]
    dataset = Dataset.from_dict({"input_ids": encoded})
    policy = merged_causal(ns.base, ns.sft)
    policy.generation_config.pad_token_id = tok.pad_token_id
    if ns.reward_model:
        reward = _merged_classifier(ns.base, ns.reward_model, tok.pad_token_id)
        value = _merged_classifier(ns.base, ns.reward_model, tok.pad_token_id)
    else:
        reward = FunctionReward(ns.reward_fn, tok, {tuple(e): r["prompt"] for e, r in zip(encoded, rows)})
        value = _merged_classifier(ns.base, None, tok.pad_token_id, sft_adapter=ns.sft)
        original = trl_ppo_module.get_reward

        def get_reward(model, query_responses, pad_token_id, context_length):
            if model is reward:
                return None, reward.scores(query_responses, pad_token_id, context_length), None
            return original(model, query_responses, pad_token_id, context_length)

        trl_ppo_module.get_reward = get_reward

    out = Path(ns.out)
    args = PPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=ns.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=4,
        local_rollout_forward_batch_size=ns.batch_size,
        total_episodes=ns.steps * ns.batch_size,
        learning_rate=ns.lr,
        kl_coef=ns.kl_coef,
        response_length=ns.response_length,
        temperature=ns.temperature,
        stop_token="eos",
        missing_eos_penalty=ns.missing_eos_penalty,
        num_sample_generations=0,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=ns.seed,
        use_cpu=True,
        bf16=False,
    )
    log: list[dict] = []

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM"),
        callbacks=[log_recorder(log)],
    )
    train_and_save(trainer, trainer.model.policy.merge_and_unload, tok, log, out, trl.__version__)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("sft")
    p.add_argument("prompts", type=Path)
    p.add_argument("out", type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reward-fn")
    src.add_argument("--reward-model")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--missing-eos-penalty", type=float, default=None)
    p.add_argument("--response-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ns.out.mkdir(parents=True, exist_ok=True)
    run(ns)


if __name__ == "__main__":
    main()
