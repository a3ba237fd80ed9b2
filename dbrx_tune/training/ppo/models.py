"""Building the PPO stage's models from a recipe (it then trains and saves through the shared stage life cycle).

Order matters for bad input and memory: the reward checkpoint is checked from its config before any weights
are loaded, and with LoRA the reference is the policy itself (adapters disabled), so no copy is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from dbrx_tune.build import load_causal_lm, load_value_model, prepare_for_training
from dbrx_tune.recipe import Recipe
from dbrx_tune.rewards.loader import check_reward_checkpoint, load_reward_model, load_reward_tokenizer
from dbrx_tune.rewards.rules import parse_reward_function

logger = logging.getLogger(__name__)


def build_ppo_models(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Policy, reference, value model and reward for `PPOTrainer(**models, ...)`."""
    args, model_args = recipe.training, recipe.model
    if model_args.random_init and model_args.use_peft:
        # The policy and value adapters would be saved without their random base weights (two different ones)
        raise ValueError(
            "random_init with use_peft: PPO cannot save the random base weights beside its two adapters, so nothing "
            "could load or merge them; drop use_peft (full fine-tuning of the tiny model) or train from a saved base"
        )
    reward_function = parse_reward_function(args.reward_function) if args.reward_function else None
    if args.reward_model_path:
        check_reward_checkpoint(args.reward_model_path)

    set_seed(args.seed)
    policy = load_causal_lm(model_args, tokenizer)
    ref_model = None
    if not model_args.use_peft:
        # A second build, not a copy: under ZeRO-3 the policy's parameters are partitioned at construction and a
        # deep copy would share their partition bookkeeping. Re-seeding gives a random-init reference the same
        # weights as the policy.
        set_seed(args.seed)
        ref_args = dataclasses.replace(
            model_args, model_name_or_path=args.ref_model_path or model_args.model_name_or_path
        )
        ref_model = load_causal_lm(ref_args, tokenizer)
    elif args.ref_model_path is not None:
        raise ValueError(
            "ref_model_path: with use_peft the reference is the policy with its adapters disabled; "
            "drop ref_model_path (or use_peft)"
        )
    policy = prepare_for_training(policy, model_args)

    value_path = args.value_model_path or args.reward_model_path or model_args.model_name_or_path
    value_model = load_value_model(model_args, value_path)
    reward_model = reward_tokenizer = None
    if args.reward_model_path:
        reward_model = load_reward_model(args.reward_model_path, model_args)
        reward_tokenizer = load_reward_tokenizer(args.reward_model_path)
    return {
        "model": policy,
        "ref_model": ref_model,
        "value_model": value_model,
        "reward_model": reward_model,
        "reward_tokenizer": reward_tokenizer,
        "reward_function": reward_function,
    }
