"""Loading the models and tokenizer a RewardBench run scores with, failing clearly on the wrong kind of checkpoint.

A reward model must come with a trained score head: loading a causal LM into a sequence-classification class
"works" in transformers (the head is silently initialised at random) and would give a meaningless benchmark
number, so a newly initialised `score` is an error here. DBRX configs get their RoPE base corrected as everywhere in
the toolkit; other architectures (e.g. the Llama 2 reward models DBRX is compared with) load unchanged.
"""

from __future__ import annotations

import logging

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DbrxConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import dbrx_tune.modeling.seq_cls  # noqa: F401  (registers DbrxForSequenceClassification with the Auto class)
from dbrx_tune.modeling.config import fix_rope_parameters
from dbrx_tune.modeling.loading import require_trained_reward_weights, resolve_dtype
from dbrx_tune.tokenizer import build_dbrx_tokenizer, ensure_pad_token

logger = logging.getLogger(__name__)

def _config(path: str) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, DbrxConfig):
        fix_rope_parameters(config)
    return config


def load_reward_model(path: str, *, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """A sequence-classification reward model with a trained score head, in eval mode.

    `device` is a device name ("cpu", "cuda:0") or "auto" to spread a model too large for one GPU (DBRX in bf16
    needs about 264 GB) over all visible GPUs.
    """
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=_config(path), dtype=resolve_dtype(dtype), device_map=device, output_loading_info=True
    )
    require_trained_reward_weights(
        path, model, info,
        hint="Train a reward model with reward_models/train.py, or score a DPO policy with --ref-model PATH or "
        "--reference-free.",
    )
    return model.eval()


def load_policy_model(path: str, *, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """A causal LM (a DPO policy or its reference) in eval mode; `device` as for `load_reward_model`."""
    model = AutoModelForCausalLM.from_pretrained(path, config=_config(path), dtype=resolve_dtype(dtype), device_map=device)
    return model.eval()


def load_eval_tokenizer(model_path: str, tokenizer_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer to score with: `tokenizer_path`, else the model's own, else (DBRX only) the offline DBRX one.

    Its chat template is used as shipped: rewriting it would change the text the model is scored on.
    """
    source = tokenizer_path or model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if tokenizer_path is None and isinstance(_config(model_path), DbrxConfig):
            logger.info("%s ships no tokenizer (%s); using the offline DBRX tokenizer", model_path, err)
            tokenizer = build_dbrx_tokenizer()
        else:
            raise ValueError(f"{source}: cannot load a tokenizer ({err}); pass --tokenizer") from err
    ensure_pad_token(tokenizer)
    return tokenizer
