"""DeepSpeed ZeRO-3 and expert parallelism for built DBRX models.

Under ZeRO-3 every parameter is partitioned and gathered by hooks on the module that uses it. A MoE block only
touches the experts its tokens were routed to, so ranks routing differently would gather different parameters
and deadlock (or index empty partitions). Registering the whole MoE block (`DbrxFFN`) as a ZeRO-3 *leaf module*
makes DeepSpeed gather all of its parameters at once on every rank. No TRL trainer does this.

With expert parallelism (DeepSpeed AutoEP, `"expert_parallel": {"enabled": true, ...}` in the DeepSpeed config)
the MoE blocks are instead replaced at `deepspeed.initialize` by AutoEP layers whose experts are partitioned over
the expert-data-parallel group; `dbrx_tune.parallel.autoep` supplies the DBRX preset. `prepare_for_deepspeed` picks
one of the two for a built model; `apply_experts_implementation` swaps the experts also when ZeRO-3 has already
partitioned them (models built with the HF DeepSpeed config active are partitioned at construction).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

logger = logging.getLogger(__name__)

MOE_LEAF_MODULE_CLASSES: tuple[type[nn.Module], ...] = (DbrxFFN,)


def expert_parallel_size(ds_config: Mapping[str, Any] | None) -> int:
    """The AutoEP size a DeepSpeed config asks for; 1 when expert parallelism is off."""
    block = (ds_config or {}).get("expert_parallel") or {}
    if not block.get("enabled", False):
        return 1
    return block.get("autoep_size", 1)


def zero_stage(ds_config: Mapping[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when absent)."""
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


def prepare_for_deepspeed(model: nn.Module, ds_config: Mapping[str, Any] | None = None) -> str:
    """Get a built DBRX model ready for `deepspeed.initialize`; returns "autoep", "zero3_leaf" or "none".

    `ds_config` defaults to the HF DeepSpeed config active in this process (set by TrainingArguments with
    `deepspeed: ...`). With `expert_parallel.enabled` the DBRX AutoEP preset is registered and the MoE blocks are
    made detectable; otherwise, under ZeRO-3, the MoE blocks become leaf modules.
    """
    if ds_config is None and is_deepspeed_zero3_enabled():
        ds_config = deepspeed_config()
    if expert_parallel_size(ds_config) > 1 or ((ds_config or {}).get("expert_parallel") or {}).get("enabled"):
        from dbrx_tune.parallel.autoep import prepare_dbrx_for_autoep, register_dbrx_autoep_preset

        register_dbrx_autoep_preset()
        count = prepare_dbrx_for_autoep(model)
        logger.info("AutoEP: %d DBRX MoE blocks will be replaced by expert-parallel layers", count)
        return "autoep"
    if zero_stage(ds_config) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        leaves = set_z3_leaf_modules(model, list(MOE_LEAF_MODULE_CLASSES))
        logger.info("ZeRO-3: registered %d DBRX MoE blocks as leaf modules", len(leaves))
        return "zero3_leaf"
    return "none"


def is_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned any parameter of `module` (its parameters carry a `ds_id`)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


def gathered(params: Sequence[nn.Parameter], modifier_rank: int | None = None):
    """ZeRO-3 gather of `params` for the duration of a `with` block; a no-op for parameters that are not partitioned.

    `modifier_rank=None` is a read-only gather; `modifier_rank=0` lets rank 0 write into them in place (the change
    is broadcast to the other ranks' partitions on exit).
    """
    params = [param for param in params if hasattr(param, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The model inside a `DeepSpeedEngine`, else `model` itself."""
    engine_class = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    return model.module if engine_class is not None and isinstance(model, engine_class) else model


def autoep_layer_class() -> type[nn.Module] | None:
    """DeepSpeed's `AutoEPMoELayer`, looked up among the modules already imported: without DeepSpeed's AutoEP module
    loaded there can be no such layer, and importing DeepSpeed only to find out costs seconds."""
    return getattr(sys.modules.get("deepspeed.module_inject.auto_ep_layer"), "AutoEPMoELayer", None)


def has_autoep_layers(model: nn.Module, min_ep_size: int = 1) -> bool:
    """Whether AutoEP replaced any MoE block of `model` (a model or a DeepSpeed engine) with a layer whose experts
    are spread over at least `min_ep_size` ranks."""
    layer_class = autoep_layer_class()
    return layer_class is not None and any(
        isinstance(module, layer_class) and getattr(module, "ep_size", 1) >= min_ep_size
        for module in unwrap_engine(model).modules()
    )


def apply_experts_implementation(model: nn.Module, implementation: str) -> nn.Module:
    """`set_experts_implementation`, also for a model whose parameters ZeRO-3 has already partitioned.

    A model built with the HF DeepSpeed config active (`from_pretrained` or `_from_config`) holds empty partitions;
    the swap then gathers one MoE block's experts at a time, builds the new experts from the full values, and
    partitions them again with `deepspeed.zero.Init(module=...)`.
    """
    from dbrx_tune.modeling.experts import IMPLEMENTATIONS, DbrxGroupedExperts, set_experts_implementation

    if not is_partitioned(model):
        return set_experts_implementation(model, implementation)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    import deepspeed

    ffn_config = model.config.ffn_config
    want_grouped = implementation == "grouped"
    for ffn in [module for module in model.modules() if isinstance(module, DbrxFFN)]:
        experts = ffn.experts
        if isinstance(experts, DbrxGroupedExperts) == want_grouped:
            continue
        with deepspeed.zero.GatheredParameters(list(experts.parameters()), modifier_rank=None):
            swapped = (
                DbrxGroupedExperts.from_stock(experts, ffn_config) if want_grouped else experts.to_stock(ffn_config)
            )
            for param in swapped.parameters():
                param.data = param.data.clone()  # own storage: the gathered buffers are released on exit
        deepspeed.zero.Init(module=swapped, config_dict_or_path=deepspeed_config())
        ffn.experts = swapped
    logger.info("experts_implementation=%s applied to a ZeRO-3 partitioned model", implementation)
    return model
