"""PPO for train-ppo: rollout.py (generate and score a batch), step.py (one PPO step, in the order of its
outline), trainer.py (the loop: checkpoints, guards, console), scale.py (the reward scale's state),
validate.py (the ppo.* settings)."""
