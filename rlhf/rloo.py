"""REINFORCE Leave-One-Out for DBRX with TRL's RLOOTrainer.

    accelerate launch rlhf/rloo.py recipes/dbrx_rloo.yaml [--key value ...]

Like rlhf/grpo.py (same reward keys, same reference handling), but each completion's baseline is the mean reward
of the other completions of its prompt, and the KL to the reference (`beta`, on by default) enters the reward.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from trl import RLOOConfig  # noqa: E402

from dbrx_tune.online_rl import OnlineRewardArguments, build_online_trainer  # noqa: E402
from dbrx_tune.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save  # noqa: E402
from dbrx_tune.trainers import DbrxRLOOTrainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, RLOOConfig, OnlineRewardArguments)
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "prompt", tokenizer)
    trainer = build_online_trainer(DbrxRLOOTrainer, recipe, tokenizer, splits)
    return train_and_save(trainer, recipe, "rloo")


if __name__ == "__main__":
    main()
