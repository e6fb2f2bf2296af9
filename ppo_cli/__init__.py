"""ppo-cli: SFT, reward modelling and PPO on LoRA adapters, driven by Hydra configs."""

__version__ = "0.1.0"
