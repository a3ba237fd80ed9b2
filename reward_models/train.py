"""Reward-model training for DBRX with TRL's RewardTrainer (Bradley-Terry on chosen/rejected pairs).

    accelerate launch reward_models/train.py recipes/dbrx_rm.yaml [--key value ...]

The model is `DbrxForSequenceClassification` (a scalar head on the last non-pad token) initialised from a DBRX
causal-LM checkpoint; full fine-tuning, LoRA on attention and experts, or QLoRA, as the recipe says. The saved
checkpoint is a plain HF reward model that RewardBench's runner and `rlhf/ppo.py` load directly (a LoRA run is
merged before saving, so it is too).
"""

from __future__ import annotations

import os

from peft import PeftModel
from trl import RewardConfig

from dbrx_tune.build import load_sequence_classifier, prepare_for_training
from dbrx_tune.modeling.seq_cls import save_reward_model
from dbrx_tune.training.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save
from dbrx_tune.training.trainers import DbrxRewardTrainer


def save_full_reward_model(trainer: DbrxRewardTrainer, output_dir: str) -> None:
    """Save a loadable reward model: LoRA adapters are merged in (QLoRA keeps the adapter only)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        model.save_pretrained(os.path.join(output_dir, "adapter"))
        if trainer.args.process_index == 0 and not getattr(model.config, "quantization_config", None):
            save_reward_model(model.merge_and_unload(), None, output_dir)
        return
    trainer.save_model(output_dir)


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, RewardConfig)
    args = recipe.training
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "preference", tokenizer, max_length=args.max_length)
    model = prepare_for_training(load_sequence_classifier(recipe.model, tokenizer), recipe.model)
    trainer = DbrxRewardTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
    )
    return train_and_save(trainer, recipe, "reward_model", save_model=save_full_reward_model)


if __name__ == "__main__":
    main()
