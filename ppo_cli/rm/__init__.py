"""The reward-model stage: `ppo-cli train-rm` (train.py) — a LoRA adapter plus a scalar score head trained
on preference pairs (pairs.py) with the pairwise loss, from the SFT adapter; its held-out accuracy and score
statistics go into final/ppo_cli.json for train-ppo."""
