"""REINFORCE Leave-One-Out for DBRX with TRL's RLOOTrainer.

    accelerate launch rlhf/rloo.py recipes/dbrx_rloo.yaml [--key value ...]

Like rlhf/grpo.py (same reward keys, same reference handling), but each completion's baseline is the mean reward
of the other completions of its prompt, and the KL to the reference (`beta`, on by default) enters the reward.
"""

from __future__ import annotations

from trl import RLOOConfig

from dbrx_tune.args import OnlineRewardArguments
from dbrx_tune.training.online_rl import build_online_trainer
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save
from dbrx_tune.training.trainers import DbrxRLOOTrainer


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, RLOOConfig, OnlineRewardArguments)
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "prompt", tokenizer)
    trainer = build_online_trainer(DbrxRLOOTrainer, recipe, tokenizer, splits)
    return train_and_save(trainer, recipe, "rloo")


if __name__ == "__main__":
    main()
