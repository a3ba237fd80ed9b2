"""What TRL's online trainers (GRPOTrainer, RLOOTrainer) need from this project to train DBRX.

Both trainers take the same pieces, so `rlhf/grpo.py` and `rlhf/rloo.py` build them here:

- rewards: a frozen reward model from `reward_models/` and/or a rule (`rule:contains_answer`). The reward model is
  handed to TRL as a model, not wrapped in a callable, so TRL partitions it under ZeRO-3 like the policy and scores
  text it re-renders with the reward model's own tokenizer and chat template: a reward model whose tokenizer differs
  from the policy's is re-tokenised, never fed the policy's ids;
- the reference (KL to it when `beta > 0`, full fine-tuning): TRL rebuilds it with
  `AutoModelForCausalLM.from_pretrained(<policy path>)`, which for DBRX skips the RoPE-theta fix and the grouped
  experts and cannot rebuild a random-init policy at all. `dbrx_reference_builder` has TRL build it through our
  loader instead (frozen, never asked for router logits). With LoRA, TRL disables the adapters, as for DPO;
- the router load-balancing loss: `sync_moe_config` (applied by our loader) gives DBRX's config the generic names
  TRL reads (`router_aux_loss_coef`, `num_experts`, `num_experts_per_tok`), so TRL adds DBRX's own
  `moe_loss_weight` times the policy's aux loss once per step (logged as `aux_loss`); the reference and the
  reward model keep `output_router_logits` off and never compute it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from accelerate.utils import set_seed
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from dbrx_tune.args import ModelArguments, OnlineRewardArguments
from dbrx_tune.build import load_causal_lm, load_reference_model, prepare_for_training
from dbrx_tune.recipe import Recipe
from dbrx_tune.rewards.loader import RewardModelError, check_reward_checkpoint, load_reward_model, load_reward_tokenizer
from dbrx_tune.rewards.rules import RuleRewardFunc, parse_reward_function

logger = logging.getLogger(__name__)


def check_rewards(stage_args: OnlineRewardArguments) -> None:
    """Refuse a recipe with no reward, an unknown rule or a non-reward checkpoint, before any weights load."""
    if not stage_args.reward_model_path and not stage_args.reward_function:
        raise RewardModelError("set reward_model_path (a reward_models/ output) and/or reward_function (rule:NAME)")
    if stage_args.reward_function:
        parse_reward_function(stage_args.reward_function)
    if stage_args.reward_model_path:
        check_reward_checkpoint(stage_args.reward_model_path)


def build_rewards(
    stage_args: OnlineRewardArguments, model_args: ModelArguments
) -> tuple[list[Any], list[PreTrainedTokenizerBase | None]]:
    """TRL's `reward_funcs` and `reward_processing_classes`: the reward model (with its own tokenizer), then the
    rule."""
    check_rewards(stage_args)
    funcs: list[Any] = []
    processing_classes: list[PreTrainedTokenizerBase | None] = []
    if stage_args.reward_model_path:
        funcs.append(load_reward_model(stage_args.reward_model_path, model_args))
        processing_classes.append(load_reward_tokenizer(stage_args.reward_model_path))
    if stage_args.reward_function:
        funcs.append(RuleRewardFunc(stage_args.reward_function))
        processing_classes.append(None)
    return funcs, processing_classes


@contextlib.contextmanager
def dbrx_reference_builder(
    trainer_class: type[Trainer], model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Iterator[None]:
    """While `trainer_class` is constructed, its reference model comes from `load_reference_model`.

    TRL's trainers build the reference inline in `__init__` through their module's `create_model_from_path`; this
    swaps that one name, for the construction only. Re-seeding gives a random-init reference the policy's weights
    (the policy must have been built right after `set_seed(seed)`): a second build, not a copy, because under ZeRO-3
    a deep copy would share the policy's partition bookkeeping.
    """
    module = next(
        (
            sys.modules[cls.__module__]
            for cls in trainer_class.__mro__  # the TRL class among the bases
            if hasattr(sys.modules.get(cls.__module__), "create_model_from_path")
        ),
        None,
    )
    if module is None:
        raise TypeError(
            f"{trainer_class.__name__} builds no reference through a TRL module's "
            "`create_model_from_path`; pass TRL's GRPOTrainer or RLOOTrainer, or a subclass"
        )
    original = module.create_model_from_path

    def build_reference(model_id: str, **_: Any) -> PreTrainedModel:
        logger.info("building the frozen reference from %s with the DBRX loader", model_args.model_name_or_path)
        set_seed(seed)
        return load_reference_model(model_args, tokenizer)

    module.create_model_from_path = build_reference
    try:
        yield
    finally:
        module.create_model_from_path = original


def build_online_trainer(
    trainer_class: type[Trainer], recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: DatasetDict
) -> Trainer:
    """`trainer_class` (TRL's GRPOTrainer or RLOOTrainer, or a subclass such as
    `dbrx_tune.training.trainers.DbrxGRPOTrainer`) on the recipe's policy, reward and prompt splits."""
    args, model_args = recipe.training, recipe.model
    check_rewards(recipe.stage)  # before the policy's weights load
    set_seed(args.seed)
    policy = prepare_for_training(load_causal_lm(model_args, tokenizer), model_args)
    reward_funcs, reward_processing_classes = build_rewards(recipe.stage, model_args)
    with dbrx_reference_builder(trainer_class, model_args, tokenizer, args.seed):
        return trainer_class(
            model=policy,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=splits["train"],
            eval_dataset=splits.get("test"),
            processing_class=tokenizer,
            reward_processing_classes=reward_processing_classes,
        )
