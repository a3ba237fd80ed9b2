"""Odds-Ratio Preference Optimisation of DBRX with TRL's ORPO trainer (`trl.experimental.orpo`).

    accelerate launch rlhf/orpo.py recipes/dbrx_orpo.yaml [--key value ...]

ORPO needs no reference model: SFT and preference alignment in one stage, from the base model.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.16

from trl.experimental.orpo import ORPOConfig  # noqa: E402

from dbrx_tune.modeling.loading import load_causal_lm, prepare_for_training  # noqa: E402
from dbrx_tune.modeling.moe_loss import request_router_logits  # noqa: E402
from dbrx_tune.stage import load_stage_datasets, load_stage_tokenizer, start_stage, train_and_save  # noqa: E402
from dbrx_tune.trainers import DbrxORPOTrainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    recipe = start_stage(argv, ORPOConfig)
    args = recipe.training
    tokenizer = load_stage_tokenizer(recipe)
    splits = load_stage_datasets(recipe, "preference", tokenizer, max_length=args.max_length)
    model = load_causal_lm(recipe.model, tokenizer)
    request_router_logits(model.config)
    trainer = DbrxORPOTrainer(
        model=prepare_for_training(model, recipe.model),
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("test"),
        processing_class=tokenizer,
    )
    return train_and_save(trainer, recipe, "orpo")


if __name__ == "__main__":
    main()
