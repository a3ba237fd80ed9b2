"""PPO for DBRX (TRL 1.x has no PPOTrainer): its config, the trainer, the PPO arithmetic, and building its models."""

from dbrx_tune.training.ppo.config import PPOConfig
from dbrx_tune.training.ppo.trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
