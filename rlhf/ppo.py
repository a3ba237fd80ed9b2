"""PPO for DBRX: policy from an SFT checkpoint, reward from a reward_models/ checkpoint, our own trainer.

    accelerate launch rlhf/ppo.py recipes/dbrx_ppo.yaml [--key value ...]

TRL 1.x has no PPOTrainer; `dbrx_tune.training.ppo` provides one on accelerate/DeepSpeed. This script only wires the
pieces together.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from dbrx_tune.training.ppo import PPOConfig, PPOTrainer
from dbrx_tune.training.ppo.models import build_ppo_models
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, PPOConfig)
    args = recipe.training
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "prompt", tokenizer, max_length=args.max_prompt_length + args.response_length)
    set_seed(args.seed)
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, train_dataset=splits["train"], **build_ppo_models(recipe, tokenizer)
    )
    return train_and_save(trainer, recipe, "ppo")


if __name__ == "__main__":
    main()
