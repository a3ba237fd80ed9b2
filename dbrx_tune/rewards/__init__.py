"""Rewards: the one reward-model loader (`loader`), the one reward-model scorer (`scorer`), and rule rewards
(`rules`), for PPO, GRPO, RLOO and RewardBench."""
