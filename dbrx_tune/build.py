"""Build or load DBRX models the way this toolkit needs them.

One place decides, for every stage: the corrected config (RoPE base, MoE names for TRL), safetensors-only
loading, dtype, the experts implementation, and ZeRO-3 leaf modules. Stage scripts call `load_causal_lm`.

Dense models (Llama 2, for the comparison in notebooks/dbrx_vs_llama2.ipynb) go through the same stages with
the stock transformers classes and PEFT's ordinary LoRA: none of the DBRX corrections apply to them.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DbrxConfig,
    DbrxForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dbrx_tune.args import ModelArguments
from dbrx_tune.modeling.checkpointing import checkpoint_blocks_by_halves
from dbrx_tune.modeling.config import NotDbrxConfigError, load_dbrx_config
from dbrx_tune.modeling.experts import set_experts_precision, set_moe_token_chunk
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.modeling.norms import keep_norms_in_input_dtype
from dbrx_tune.modeling.router import use_out_of_place_jitter
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification
from dbrx_tune.modeling.value_head import DbrxForTokenValue
from dbrx_tune.modeling.weight_files import check_weight_files
from dbrx_tune.parallel.launch import deepspeed_config
from dbrx_tune.parallel.zero3 import apply_experts_implementation, gathered, prepare_for_deepspeed, zero_stage

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str | None) -> torch.dtype | str:
    """Map a recipe's `dtype` to what `from_pretrained` takes ("auto" keeps the checkpoint's dtype)."""
    if name in (None, "auto"):
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def align_special_tokens(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model config's special ids those of the tokenizer that will be saved beside it."""
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "a tokenizer for another model?"
        )


def is_dbrx(model_or_config: PreTrainedModel | PretrainedConfig) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return isinstance(config, DbrxConfig)


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """The config for `model_args.model_name_or_path`: corrected for DBRX, as published for dense models."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a hub id or a local DBRX directory)")
    path = model_args.model_name_or_path
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": model_args.trust_remote_code}
    try:
        config = load_dbrx_config(path, **kwargs)
    except NotDbrxConfigError as not_dbrx:
        if model_args.moe_loss_weight:
            raise ValueError(f"{path}: moe_loss_weight is set but the model is not a DBRX MoE model") from None
        return not_dbrx.config
    return sync_moe_config(config, model_args.moe_loss_weight)


def check_experts_precision(model_args: ModelArguments, deepspeed: str | dict | None) -> None:
    """Refuse `experts_precision: fp8` where it cannot work, before any weights load.

    FP8 runs on the grouped experts (not the stock loop, not NF4 experts, which dequantize per call and would pay a
    second quantization) and caches FP8 copies of whole expert weights, which ZeRO-3 partitions and AutoEP shards."""
    if model_args.experts_precision == "bf16":
        return
    key = f"experts_precision: {model_args.experts_precision}"
    if model_args.experts_implementation != "grouped":
        raise ValueError(f"{key} needs experts_implementation: grouped (got {model_args.experts_implementation!r})")
    if model_args.load_in_4bit:
        raise ValueError(f"{key} is not supported with load_in_4bit (QLoRA's NF4 experts run bf16 GEMMs)")
    if zero_stage(deepspeed_config(deepspeed)) == 3:
        raise ValueError(
            f"{key} is not supported under ZeRO-3 or the AutoEP preset (its FP8 weight copies need whole expert "
            "weights on each GPU): use experts_precision: bf16, or ZeRO stage 0-2"
        )


def prepare_dbrx_blocks(model: PreTrainedModel, *, by_halves: bool) -> None:
    """The block-level steps of `finish_model`, also for models built by hand (bench/qlora_132b.py): out-of-place
    router jitter, LayerNorms without autocast's fp32 input copies, and (`by_halves`) blocks checkpointed by halves."""
    use_out_of_place_jitter(model)
    keep_norms_in_input_dtype(model)
    if by_halves:
        checkpoint_blocks_by_halves(model)


def finish_model(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """Steps every DBRX model goes through after construction, whatever its head: out-of-place router jitter,
    LayerNorms without autocast's fp32 input copies, blocks checkpointed by halves where activation offload keeps
    checkpoint inputs on the host, the experts implementation (also on ZeRO-3 partitioned weights) and precision,
    then ZeRO-3 leaf modules or AutoEP."""
    if not is_dbrx(model):
        return model
    # by halves where activation offload keeps the checkpoint inputs on the host (dbrx_tune.modeling.checkpointing)
    prepare_dbrx_blocks(model, by_halves=model_args.activation_offload)
    apply_experts_implementation(model, model_args.experts_implementation)
    set_experts_precision(model, model_args.experts_precision)
    prepare_for_deepspeed(model)
    return model


def prepare_for_training(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """QLoRA / LoRA on attention and every expert, as the recipe asks; full fine-tuning leaves `model` as is.

    Stock bitsandbytes loading quantizes only `nn.Linear` (attention); the fused experts, ~96% of DBRX, are
    quantized here to NF4 per expert. LoRA targets are chosen by the DBRX keys, not by module-name lists.
    Dense models get PEFT's ordinary LoRA on `lora_target_modules` (default: every linear layer).
    """
    task_type = "SEQ_CLS" if "ForSequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    if not is_dbrx(model):
        if not model_args.use_peft:
            return model
        config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type=task_type,
        )
        return get_peft_model(model, config)
    if model_args.lora_target_modules or model_args.lora_target_parameters:
        raise ValueError(
            "DBRX recipes choose LoRA targets with lora_target_attention / lora_target_experts / train_router; "
            "remove lora_target_modules and lora_target_parameters"
        )
    if model_args.load_in_4bit:
        if not model_args.use_peft:
            raise ValueError("load_in_4bit freezes the base weights: set use_peft: true (QLoRA)")
        from dbrx_tune.modeling.quantized_experts import quantize_experts_4bit

        quantize_experts_4bit(model, experts_per_group=model_args.experts_per_group)
    if model_args.moe_token_chunk:
        set_moe_token_chunk(model, model_args.moe_token_chunk)
    if model_args.use_peft:
        from dbrx_tune.modeling.lora import apply_expert_lora

        model = apply_expert_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_attention=model_args.lora_target_attention,
            target_experts=model_args.lora_target_experts,
            train_router=model_args.train_router,
            task_type=task_type,
        )
    return model


def quantization_config(model_args: ModelArguments):
    """bitsandbytes NF4 for the `nn.Linear` layers (attention) when the recipe asks for QLoRA."""
    if not model_args.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head", "router", "score"],
    )


def load_pretrained(model_class: type, model_args: ModelArguments, config: PretrainedConfig, **kwargs):
    """`from_pretrained` (safetensors only) or a random-init build, with errors that name the checkpoint."""
    dtype = resolve_dtype(model_args.dtype)
    if model_args.random_init:
        logger.info("Building %s with random weights from %s", model_class.__name__, model_args.model_name_or_path)
        build = model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config
        return build(
            config, dtype=None if dtype == "auto" else dtype, attn_implementation=model_args.attn_implementation
        )
    check_weight_files(model_args.model_name_or_path)
    try:
        return model_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            revision=model_args.model_revision,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
            use_safetensors=True,
            quantization_config=quantization_config(model_args),
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise RuntimeError(
            f"could not load weights from {model_args.model_name_or_path!r} "
            f"(safetensors required): {str(err).splitlines()[0]}"
        ) from err


def load_causal_lm(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase | None = None, **from_pretrained_kwargs
) -> PreTrainedModel:
    """A DBRX causal LM with the corrected config and experts implementation, before LoRA/QLoRA.

    `from_pretrained_kwargs` (e.g. `device_map`) go to `from_pretrained`."""
    config = load_model_config(model_args)
    if tokenizer is not None:
        align_special_tokens(config, tokenizer)
    model_class = DbrxForCausalLM if is_dbrx(config) else AutoModelForCausalLM
    model = load_pretrained(model_class, model_args, config, **from_pretrained_kwargs)
    if tokenizer is not None:
        set_generation_tokens(model, tokenizer)
    return finish_model(model, model_args)


def load_reference_model(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """A frozen copy of the starting policy (DPO, PPO). Its router loss is never computed nor trained."""
    model = load_causal_lm(model_args, tokenizer)
    model.config.output_router_logits = False
    model.requires_grad_(False)
    return model.eval()


def load_sequence_classifier(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase | None = None, num_labels: int = 1
) -> PreTrainedModel:
    """A DBRX reward / value model: a causal-LM checkpoint gets a fresh `score` head, a reward model keeps its own."""
    config = load_model_config(model_args)
    config.num_labels = num_labels
    if tokenizer is not None:
        align_special_tokens(config, tokenizer)
    model_class = DbrxForSequenceClassification if is_dbrx(config) else AutoModelForSequenceClassification
    model = load_pretrained(model_class, model_args, config)
    return finish_model(model, model_args)


def set_generation_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation stops at end-of-text and, for chat, at the end of the assistant's turn (`<|im_end|>`)."""
    stops = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in stops:
        stops.append(im_end)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = stops


def load_value_model(model_args: ModelArguments, path: str) -> DbrxForTokenValue | PeftModel:
    """The value model from `path` (a reward model or a causal LM), with the recipe's dtype, experts and LoRA.

    With `use_peft` the value backbone gets the same LoRA as the policy and the head is trained in full; call
    the model through `value_backbone` (the PEFT wrapper's forward is that of a causal LM).
    """
    # Random weights only for the policy's own (random-init) checkpoint; a reward model is always loaded.
    value_args = dataclasses.replace(
        model_args,
        model_name_or_path=path,
        random_init=model_args.random_init and path == model_args.model_name_or_path,
    )
    config = load_model_config(value_args)
    if value_args.random_init:
        model = load_pretrained(DbrxForTokenValue, value_args, config)
        info = {"missing_keys": ["score.weight"]}
    else:
        model, info = load_pretrained(DbrxForTokenValue, value_args, config, output_loading_info=True)
    if "score.weight" in info.get("missing_keys", []):
        logger.info("value model from %s: no trained score head there, starting the value head at zero", path)
        with gathered([model.score.weight], modifier_rank=0), torch.no_grad():
            model.score.weight.zero_()
    else:
        logger.info("value model from %s: backbone and score head loaded", path)
    model = prepare_for_training(finish_model(model, value_args), value_args)
    if isinstance(model, PeftModel):
        model.get_base_model().score.weight.requires_grad_(True)
    return model
