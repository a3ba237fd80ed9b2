"""Group Relative Policy Optimisation of DBRX with TRL's GRPOTrainer.

    accelerate launch rlhf/grpo.py recipes/dbrx_grpo.yaml [--key value ...]

Each prompt gets `num_generations` sampled completions, scored by a frozen reward model from reward_models/
(`reward_model_path`) and/or a rule (`reward_function`); advantages are the rewards relative to the group's. No
value model. With `beta > 0` a frozen reference (built by the DBRX loader, or the policy with its adapters off
under LoRA) adds a KL penalty. The router load-balancing loss applies to the policy only.
"""

from __future__ import annotations

from trl import GRPOConfig

from dbrx_tune.args import OnlineRewardArguments
from dbrx_tune.training.online_rl import build_online_trainer
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save
from dbrx_tune.training.trainers import DbrxGRPOTrainer


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, GRPOConfig, OnlineRewardArguments)
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "prompt", tokenizer)
    trainer = build_online_trainer(DbrxGRPOTrainer, recipe, tokenizer, splits)
    return train_and_save(trainer, recipe, "grpo")


if __name__ == "__main__":
    main()
