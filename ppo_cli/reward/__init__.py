"""Rewards: how an RM scores (`scoring`), where PPO's and generate's scores come from (`sources`: an RM
adapter on the shared base, a separate RM (`separate`), a Python function (`functions`)), and the statistics
and health train-rm stores with an RM (`stats`, `health`)."""
