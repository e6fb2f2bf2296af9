"""The reward-model stage: `ppo-cli train-rm` (train.py) — a LoRA adapter plus a scalar score head trained
on preference pairs (pairs.py) with the pairwise loss, starting from the SFT adapter (from_sft.py); its
held-out accuracy and score statistics go into final/ppo_cli.json for train-ppo."""
