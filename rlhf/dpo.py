"""Direct Preference Optimisation of DBRX with TRL's DPOTrainer.

    accelerate launch rlhf/dpo.py recipes/dbrx_dpo.yaml [--key value ...]

The reference model is a frozen copy of the starting checkpoint (partitioned like the policy under ZeRO-3),
or, with LoRA, the same weights with the adapters disabled; `precompute_ref_log_probs: true` scores the
reference once up front. The router load-balancing loss applies to the policy only.
"""

from __future__ import annotations

from trl import DPOConfig

from dbrx_tune.build import load_causal_lm, load_reference_model, prepare_for_training
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save
from dbrx_tune.training.trainers import DbrxDPOTrainer


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, DPOConfig)
    args = recipe.training
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "preference", tokenizer, max_length=args.max_length)
    model = prepare_for_training(load_causal_lm(recipe.model, tokenizer), recipe.model)
    ref_model = None if recipe.model.use_peft else load_reference_model(recipe.model, tokenizer)
    trainer = DbrxDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
    )
    return train_and_save(trainer, recipe, "dpo")


if __name__ == "__main__":
    main()
