"""The one way the toolkit loads a trained reward model (PPO, GRPO, RLOO, RewardBench) and its tokenizer.

A reward model must come with a trained score head: loading a causal LM into a sequence-classification class
"works" in transformers (the head is silently initialised at random) and would give meaningless rewards, so a
checkpoint that is not a one-output `*ForSequenceClassification` is refused from its config alone, before any
weights load, and a newly initialised `score` is an error after loading. DBRX checkpoints go through the toolkit's
loader (RoPE base, grouped experts, ZeRO-3 preparation); other architectures (e.g. the Llama 2 reward models DBRX is
compared with) load with the stock Auto class.
"""

from __future__ import annotations

import dataclasses
import logging

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DbrxConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dbrx_tune.args import ModelArguments
from dbrx_tune.build import finish_model, load_pretrained, resolve_dtype
from dbrx_tune.modeling.config import fix_rope_parameters
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification
from dbrx_tune.modeling.weight_files import WeightFileError, check_weight_files
from dbrx_tune.tokenizer import build_dbrx_tokenizer, ensure_pad_token, load_tokenizer

logger = logging.getLogger(__name__)

TRAIN_ONE = (
    "Train one with reward_models/train.py (a causal-LM checkpoint such as an SFT policy belongs in "
    "model_name_or_path or value_model_path)."
)


class RewardModelError(ValueError):
    """The reward model (or rule) named by the recipe cannot be used; the message names it and says why."""


def check_reward_checkpoint(path: str, hint: str = TRAIN_ONE) -> PretrainedConfig:
    """Refuse, from its config alone, a checkpoint that is not a one-output sequence-classification model."""
    try:
        # trust_remote_code=False, explicitly: left unset, transformers asks on the terminal and "y" runs the
        # directory's Python; reward models load with the toolkit's own DBRX classes
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RewardModelError(
            f"reward model {path!r}: cannot read its config.json ({str(err).splitlines()[0]})"
        ) from err
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise RewardModelError(
            f"reward model {path!r} is not a reward model: its architectures are {architectures or 'unset'}, "
            f"expected a *ForSequenceClassification with one output. {hint}"
        )
    if config.num_labels != 1:
        raise RewardModelError(f"reward model {path!r}: num_labels is {config.num_labels}; a reward model has 1")
    return config


def require_trained_reward_weights(path: str, model: PreTrainedModel, loading_info: dict, hint: str) -> None:
    """Refuse a reward model whose checkpoint lacked some weights (`output_loading_info` of `from_pretrained`).

    transformers initialises missing weights at random and carries on: a causal LM loaded into a reward class gets a
    random score head, and its rewards mean nothing. Every stage that scores with a frozen reward model (RewardBench,
    PPO) checks here, and `hint` says what to do instead.
    """
    missing = sorted(loading_info.get("missing_keys", []))
    head_missing = [key for key in missing if not key.startswith(model.base_model_prefix + ".")]
    if head_missing:
        architectures = getattr(model.config, "architectures", None) or []
        raise ValueError(
            f"{path}: has no trained score head (missing {head_missing}; architectures={architectures}). {hint}"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{path}: checkpoint lacks backbone weights ({shown}); it would score at random")


def load_reward_model(
    path: str, model_args: ModelArguments | None = None, *, device_map: str | None = None, hint: str = TRAIN_ONE
) -> PreTrainedModel:
    """The frozen reward model at `path`, in eval mode; not a reward model, or a missing score head, is an error.

    `model_args` carries the run's dtype and experts implementation (default: the checkpoint's dtype, grouped
    experts). `device_map` is passed to `from_pretrained` ("cpu", "cuda:0", or "auto" to spread a model too large
    for one GPU); `hint` ends the error for a checkpoint without a trained head.
    """
    config = check_reward_checkpoint(path, hint)
    try:
        check_weight_files(path)
    except WeightFileError as err:
        raise RewardModelError(f"reward model: {err}") from None
    model_args = model_args or ModelArguments(model_name_or_path=path)
    kwargs = {"output_loading_info": True} | ({"device_map": device_map} if device_map else {})
    if isinstance(config, DbrxConfig):
        fix_rope_parameters(config)
        rm_args = dataclasses.replace(model_args, model_name_or_path=path, random_init=False, use_peft=False)
        model, info = load_pretrained(DbrxForSequenceClassification, rm_args, sync_moe_config(config), **kwargs)
        model = finish_model(model, rm_args)
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            config=config,
            dtype=resolve_dtype(model_args.dtype),
            use_safetensors=True,
            trust_remote_code=False,
            **kwargs,
        )
    try:
        require_trained_reward_weights(path, model, info, hint=hint)
    except ValueError as err:
        raise RewardModelError(f"reward model: {err}") from None
    model.requires_grad_(False)
    return model.eval()


def load_reward_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A trained reward model's tokenizer for online RL (with a pad token); the offline DBRX one only for a DBRX
    checkpoint without one."""
    return load_tokenizer(path)


def load_eval_tokenizer(model_path: str, tokenizer_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer to score with: `tokenizer_path`, else the model's own, else (DBRX only) the offline DBRX one.

    Its chat template is used as shipped: rewriting it would change the text the model is scored on.
    """
    source = tokenizer_path or model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
        if tokenizer_path is None and isinstance(config, DbrxConfig):
            logger.info("%s ships no tokenizer (%s); using the offline DBRX tokenizer", model_path, err)
            tokenizer = build_dbrx_tokenizer()
        else:
            raise ValueError(f"{source}: cannot load a tokenizer ({err}); pass --tokenizer") from err
    ensure_pad_token(tokenizer)
    return tokenizer
