"""`ppo-cli evaluate`: a policy against a reference on held-out prompts (see command.py)."""
