"""The PPO stage: `ppo-cli train-ppo` (train.py). The four roles — policy, reference, reward, value — share
one base model (roles.py); rollout.py generates and scores a batch (RolloutMaker), step.py updates on it
(PPOUpdate) and has the PPO step's outline, trainer.py builds both and runs the steps in the shared loop
(checkpoints, console), guards.py speaks up when a run drifts into a known failure, scale.py holds the
reward scale's state and validate.py checks ppo.*."""
