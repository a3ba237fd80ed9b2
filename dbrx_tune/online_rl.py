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
from dataclasses import dataclass, field
from typing import Any

from accelerate.utils import set_seed
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from dbrx_tune.modeling.loading import load_causal_lm, load_reference_model, prepare_for_training
from dbrx_tune.ppo.rewards import (
    RULES,
    RewardModelError,
    check_reward_checkpoint,
    load_reward_model,
    load_reward_tokenizer,
    parse_reward_function,
)
from dbrx_tune.recipe import ModelArguments, Recipe

logger = logging.getLogger(__name__)


@dataclass
class OnlineRewardArguments:
    """Recipe keys naming the reward of a GRPO / RLOO run (TRL's configs have none: they take reward objects)."""

    reward_model_path: str | None = field(
        default=None,
        metadata={"help": "A reward_models/train.py output (one-output *ForSequenceClassification), local or hub id."},
    )
    reward_function: str | None = field(
        default=None,
        metadata={"help": "A rule reward, 'rule:NAME[:ARG]' (e.g. rule:contains_answer), alone or beside the model."},
    )


class RuleRewardFunc:
    """A project rule reward (`dbrx_tune.ppo.rewards.RULES`) in TRL's reward-function interface.

    TRL calls it with the prompts, the completions (text, or a one-message list for conversational data) and every
    other dataset column as a keyword list (e.g. `answer`); it returns one float per completion.
    """

    def __init__(self, spec: str):
        rule = parse_reward_function(spec)
        self.rule, self.argument = RULES[rule.name], rule.argument
        self.__name__ = spec  # TRL logs each reward as rewards/<__name__>/mean

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        texts = [completion if isinstance(completion, str) else completion[-1]["content"] for completion in completions]
        row_keys = [key for key, values in columns.items() if isinstance(values, list) and len(values) == len(texts)]
        rows = [{key: columns[key][index] for key in row_keys} for index in range(len(texts))]
        return self.rule(texts, rows, self.argument)


def check_rewards(stage_args: OnlineRewardArguments) -> None:
    """Refuse a recipe with no reward, an unknown rule or a non-reward checkpoint, before any weights load."""
    if not stage_args.reward_model_path and not stage_args.reward_function:
        raise RewardModelError("set reward_model_path (a reward_models/ output) and/or reward_function (rule:NAME)")
    if stage_args.reward_function:
        parse_reward_function(stage_args.reward_function)
    if stage_args.reward_model_path:
        check_reward_checkpoint(stage_args.reward_model_path)


def build_rewards(stage_args: OnlineRewardArguments,
                  model_args: ModelArguments) -> tuple[list[Any], list[PreTrainedTokenizerBase | None]]:
    """TRL's `reward_funcs` and `reward_processing_classes`: the reward model (with its own tokenizer), then the rule."""
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
def dbrx_reference_builder(trainer_class: type[Trainer], model_args: ModelArguments,
                           tokenizer: PreTrainedTokenizerBase, seed: int) -> Iterator[None]:
    """While `trainer_class` is constructed, its reference model comes from `load_reference_model`.

    TRL's trainers build the reference inline in `__init__` through their module's `create_model_from_path`; this
    swaps that one name, for the construction only. Re-seeding gives a random-init reference the policy's weights
    (the policy must have been built right after `set_seed(seed)`): a second build, not a copy, because under ZeRO-3
    a deep copy would share the policy's partition bookkeeping.
    """
    module = next((sys.modules[cls.__module__] for cls in trainer_class.__mro__  # the TRL class among the bases
                   if hasattr(sys.modules.get(cls.__module__), "create_model_from_path")), None)
    if module is None:
        raise TypeError(f"{trainer_class.__name__} builds no reference through a TRL module's "
                        "`create_model_from_path`; pass TRL's GRPOTrainer or RLOOTrainer, or a subclass")
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


def build_online_trainer(trainer_class: type[Trainer], recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                         splits: DatasetDict) -> Trainer:
    """`trainer_class` (TRL's GRPOTrainer or RLOOTrainer, or a subclass such as `dbrx_tune.trainers.DbrxGRPOTrainer`)
    on the recipe's policy, reward and prompt splits."""
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
