"""Reward models for DBRX: training (`reward_models/train.py`) and RewardBench evaluation/export
(`python -m reward_models.rewardbench`)."""
