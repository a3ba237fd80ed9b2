"""Supervised fine-tuning of DBRX with TRL's SFTTrainer.

    accelerate launch sft/train.py recipes/dbrx_sft.yaml [--key value ...]

Everything DBRX-specific (RoPE base, router aux loss, grouped experts, expert LoRA, ZeRO-3 leaf modules,
tokenizer) comes from `dbrx_tune`; this script only wires the pieces together.
"""

from __future__ import annotations

from trl import SFTConfig

from dbrx_tune.build import load_causal_lm, prepare_for_training
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save
from dbrx_tune.training.trainers import DbrxSFTTrainer


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, SFTConfig)
    args = recipe.training
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "sft", tokenizer, max_length=args.max_length)
    model = prepare_for_training(load_causal_lm(recipe.model, tokenizer), recipe.model)
    trainer = DbrxSFTTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
    )
    return train_and_save(trainer, recipe, "sft")


if __name__ == "__main__":
    main()
