"""`ppo-cli plan`: the memory a run will need, before it starts (estimate.py: the maths; command.py: the CLI)."""
