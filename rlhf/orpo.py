"""Odds-Ratio Preference Optimisation of DBRX with TRL's ORPO trainer (`trl.experimental.orpo`).

    accelerate launch rlhf/orpo.py recipes/dbrx_orpo.yaml [--key value ...]

ORPO needs no reference model: SFT and preference alignment in one stage, from the base model.
"""

from __future__ import annotations

from dbrx_tune.build import load_causal_lm, prepare_for_training
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save
from dbrx_tune.training.trainers import DbrxORPOTrainer, ORPOConfig


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, ORPOConfig)
    args = recipe.training
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "preference", tokenizer, max_length=args.max_length)
    model = prepare_for_training(load_causal_lm(recipe.model, tokenizer), recipe.model)
    trainer = DbrxORPOTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
    )
    return train_and_save(trainer, recipe, "orpo")


if __name__ == "__main__":
    main()
