"""The SFT stage: `ppo-cli train-sft` (train.py) — a LoRA adapter fine-tuned on prompt/completion,
conversation or plain-text rows, run in the supervised loop (ppo_cli/supervised.py)."""
