"""Build or load DBRX models the way this toolkit needs them.

One place decides, for every stage: the corrected config (RoPE base, MoE names for TRL), safetensors-only
loading, dtype, the experts implementation, and ZeRO-3 leaf modules. Stage scripts call `load_causal_lm`.
"""

from __future__ import annotations

import logging

import torch
from transformers import DbrxConfig, DbrxForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dbrx_tune.distributed import register_zero3_leaf_modules
from dbrx_tune.modeling.config import load_dbrx_config
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.recipe import ModelArguments

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str | None) -> torch.dtype | str:
    """Map a recipe's `dtype` to what `from_pretrained` takes ("auto" keeps the checkpoint's dtype)."""
    if name in (None, "auto"):
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def align_special_tokens(config: DbrxConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model config's special ids those of the tokenizer that will be saved beside it."""
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "a tokenizer for another model?"
        )


def load_model_config(model_args: ModelArguments) -> DbrxConfig:
    """The corrected DBRX config for `model_args.model_name_or_path`."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a hub id or a local DBRX directory)")
    config = load_dbrx_config(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )
    return sync_moe_config(config, model_args.moe_loss_weight)


def finish_model(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """Steps every DBRX model goes through after construction, whatever its head."""
    if model_args.experts_implementation != "eager":
        from dbrx_tune.modeling.experts import set_experts_implementation

        set_experts_implementation(model, model_args.experts_implementation)
    register_zero3_leaf_modules(model)
    return model


def load_pretrained(model_class: type[PreTrainedModel], model_args: ModelArguments, config: DbrxConfig, **kwargs):
    """`from_pretrained` (safetensors only) or a random-init build, with errors that name the checkpoint."""
    dtype = resolve_dtype(model_args.dtype)
    if model_args.random_init:
        logger.info("Building %s with random weights from %s", model_class.__name__, model_args.model_name_or_path)
        return model_class._from_config(
            config, dtype=None if dtype == "auto" else dtype, attn_implementation=model_args.attn_implementation
        )
    try:
        return model_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            revision=model_args.model_revision,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
            use_safetensors=True,
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise RuntimeError(
            f"could not load weights from {model_args.model_name_or_path!r} "
            f"(safetensors required): {str(err).splitlines()[0]}"
        ) from err


def load_causal_lm(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase | None = None) -> DbrxForCausalLM:
    """A DBRX causal LM with the corrected config, ready for a TRL trainer."""
    config = load_model_config(model_args)
    if tokenizer is not None:
        align_special_tokens(config, tokenizer)
    model = load_pretrained(DbrxForCausalLM, model_args, config)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return finish_model(model, model_args)
