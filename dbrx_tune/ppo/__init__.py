"""PPO for DBRX: config, value model, rewards and the trainer (TRL 1.x has no PPOTrainer)."""

from dbrx_tune.ppo.config import PPOConfig
from dbrx_tune.ppo.rewards import RewardModelError, RuleReward, ScoringBatch, load_reward_model, parse_reward_function
from dbrx_tune.ppo.trainer import PPOTrainer
from dbrx_tune.ppo.value_model import DbrxForTokenValue, load_value_model

__all__ = [
    "DbrxForTokenValue",
    "PPOConfig",
    "PPOTrainer",
    "RewardModelError",
    "RuleReward",
    "ScoringBatch",
    "load_reward_model",
    "load_value_model",
    "parse_reward_function",
]
