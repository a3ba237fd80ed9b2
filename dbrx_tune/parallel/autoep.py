"""A DeepSpeed AutoEP preset for DBRX: expert parallelism that runs together with ZeRO-3.

DeepSpeed's native MoE layer is rejected under ZeRO-3; AutoEP (DeepSpeed >= 0.19.3) instead replaces each
Hugging Face MoE block by an `AutoEPMoELayer` (router + grouped-GEMM experts + all-to-all) and partitions the
expert weights over the expert-data-parallel group. DeepSpeed ships presets for Mixtral, Qwen-MoE, DeepSeek and
MiniMax, none for DBRX. This module is that preset, laid out like the modules of
`deepspeed/module_inject/auto_ep_presets/` (`PRESET_NAME`, `PRESET`, `PRESET_ADAPTERS`) so it can be upstreamed,
and registered into DeepSpeed's registry at run time by `register_dbrx_autoep_preset`.

The DBRX block it maps (`transformer.blocks.N.ffn`, a `DbrxFFN`):

    router:  `ffn.router.layer`, nn.Linear(d_model, n_experts, bias=False); scores = softmax(logits) over all experts,
             top-k, then divided by their L1 norm (`ffn_config.moe_normalize_expert_weights == 1`)
    experts: `ffn.experts` in the 3D layout of `dbrx_tune.modeling.experts.DbrxGroupedExperts`:
             w1 (gate) (E, ffn, d), v1 (up) (E, ffn, d), w2 (down) (E, d, ffn); SwiGLU (silu), scores applied after
             the experts; the stock 2D experts must be swapped first (`experts_implementation: grouped`)
    router logits: transformers records the raw router logits from `DbrxRouter` for the DBRX load-balancing loss;
             after replacement they are recorded from the AutoEP router's gate (same (tokens, E) raw logits).

Two DBRX/transformers specifics need more than a preset table:

- AutoEP looks the router up as a direct child holding `.weight`; DBRX nests it (`router.layer`). Until DeepSpeed
  resolves dotted router paths, `prepare_dbrx_for_autoep` gives each `DbrxFFN` an unregistered attribute
  `router_gate` pointing at `router.layer` (not a submodule: state dicts and parameter lists are unchanged).
- DeepSpeed 0.19.8's router-logit retargeting calls `_CAN_RECORD_REGISTRY.get(key, default)`, but transformers
  5.2x made that registry a `dict` subclass whose `get(model)` takes one argument, so conversion dies with a
  `TypeError` (it worked with transformers 5.20.2). `DbrxAutoEPAdapter` retargets the recorders through plain `dict`
  methods instead, which work with both registry versions, and restores the class-level registry afterwards so other
  DBRX models in the process (a DPO reference model) keep recording from `DbrxRouter`.

AutoEP's router has no input jitter: DBRX's `moe_jitter_eps` (0.01 in dbrx-base) is not applied under EP, and a
warning says so.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

from torch import nn
from transformers import PreTrainedModel
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

from dbrx_tune.modeling.experts import DbrxGroupedExperts
from dbrx_tune.modeling.moe_loss import sync_moe_config

logger = logging.getLogger(__name__)

PRESET_NAME = "dbrx"
ROUTER_GATE_ALIAS = "router_gate"
"""Unregistered attribute of `DbrxFFN` through which AutoEP finds the router's nn.Linear (`router.layer`)."""

_MISSING = object()


def _deepspeed_preset_api():
    """DeepSpeed's AutoEP preset classes; a clear error when DeepSpeed is missing or predates AutoEP."""
    try:
        from deepspeed.module_inject.auto_ep_presets import base, registry
    except ImportError as err:
        raise ImportError(
            "expert parallelism for DBRX needs DeepSpeed >= 0.19.3 (AutoEP); install the version pinned in setup.cfg"
        ) from err
    return base, registry


def build_preset():
    """The DBRX `MoEModelPreset` (a function so importing this module never needs DeepSpeed)."""
    base, _ = _deepspeed_preset_api()
    return base.MoEModelPreset(
        moe_layer_pattern=r"(?:.+\.)?transformer\.blocks\.\d+\.ffn",
        router_pattern=ROUTER_GATE_ALIAS,
        experts_pattern="experts",
        expert_storage="fused_3d",
        expert_w1="w1",
        expert_w2="w2",
        expert_w3="v1",
        num_experts_attr="num_experts",  # set from ffn_config by dbrx_tune.modeling.moe_loss.sync_moe_config
        top_k_attr="num_experts_per_tok",
        score_func="softmax",
        score_apply="post",
        route_norm=True,
        gate_bias=False,
        supports_expert_bias=False,
        preset_adapter=PRESET_NAME,
        hf_model_types=(PRESET_NAME,),
        min_transformers_version="5.0.0",
        validated_transformers_versions="5.24.0",
        docs_support_notes="Needs the 3D expert layout (dbrx_tune experts_implementation='grouped').",
    )


def _make_adapter_class():
    base, _ = _deepspeed_preset_api()

    class DbrxAutoEPAdapter(base.AutoEPPresetAdapter):
        """DBRX rules on top of AutoEP's defaults: routing from `ffn_config`, router-logit recording."""

        def validate_compatibility(self, preset_name, preset, model_config) -> None:
            super().validate_compatibility(preset_name, preset, model_config)
            ffn_config = getattr(model_config, "ffn_config", None)
            if ffn_config is None:
                return
            activation = (getattr(ffn_config, "ffn_act_fn", None) or {}).get("name", "silu")
            if activation != "silu":
                raise ValueError(
                    f"AutoEP preset 'dbrx': ffn_config.ffn_act_fn={activation!r}, but the preset computes SwiGLU "
                    "(silu gate); set expert_parallel.expert_activation to the model's form"
                )
            norm = getattr(ffn_config, "moe_normalize_expert_weights", 1.0)
            if norm not in (None, 1, 1.0):
                raise ValueError(
                    f"AutoEP preset 'dbrx': ffn_config.moe_normalize_expert_weights={norm} (an L{norm} norm of the "
                    "top-k weights); AutoEP's router renormalises by L1 or not at all (1 or null)"
                )
            jitter = getattr(ffn_config, "moe_jitter_eps", None)
            if jitter:
                logger.warning(
                    "AutoEP preset 'dbrx': ffn_config.moe_jitter_eps=%s is not applied under expert parallelism "
                    "(AutoEP's router has no input jitter)",
                    jitter,
                )

        def resolve_route_norm(self, config, preset, model_config) -> bool:
            if config.route_norm is not None:
                return config.route_norm
            ffn_config = getattr(model_config, "ffn_config", None)
            if ffn_config is None:
                return preset.route_norm
            return getattr(ffn_config, "moe_normalize_expert_weights", 1.0) is not None

        def adjust_forward_contract(self, contract):
            # DbrxFFN returns a tensor; transformers records raw logits from the router module. Capture from the
            # replacement's `router` child itself so AutoEP adds no alias submodule (no extra state-dict keys).
            return replace(
                contract,
                return_router_logits=False,
                capture_target="router",
                capture_index=0,
                capture_layer_name="router",
                router_logits_capture_mode="raw",
            )

        def retarget_transformers_output_recorders(
            self,
            model: nn.Module,
            spec,
            replacement: nn.Module,
            retargeted_keys: set[str],
            remove_output_capture_hooks: Callable[[nn.Module], int],
        ) -> None:
            gate = getattr(getattr(replacement, "router", None), "gate", None)
            if gate is None:
                return
            retarget_router_logit_recorders(model, type(gate), remove_output_capture_hooks)

    return DbrxAutoEPAdapter


def retarget_router_logit_recorders(
    model: nn.Module, gate_class: type[nn.Module], remove_output_capture_hooks: Callable[[nn.Module], int]
) -> int:
    """Make transformers record `router_logits` from AutoEP's `router.gate` in the DBRX models of `model`.

    Works with the registry of transformers 5.2x (a dict subclass keyed by class name with a one-argument `get`) and
    with a plain dict. The retargeted recorders are installed as hooks on this model instance only; the class-level
    registry is restored afterwards. Returns the number of DBRX (sub)models retargeted.
    """
    from transformers.utils import output_capturing

    registry = output_capturing._CAN_RECORD_REGISTRY
    entries: dict[str, dict[str, Any]] = {}
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or getattr(module.config, "model_type", None) != PRESET_NAME:
            continue
        key = str(module.__class__)
        base_outputs = dict.get(registry, key) or getattr(module, "_can_record_outputs", None) or {}
        if "router_logits" not in base_outputs:
            continue
        entries[key] = {
            **base_outputs,
            "router_logits": output_capturing.OutputRecorder(gate_class, index=0, layer_name="router.gate"),
        }
    if not entries:
        logger.warning("AutoEP preset 'dbrx': no DBRX model with a router_logits recorder found; aux loss unavailable")
        return 0

    remove_output_capture_hooks(model)
    for module in model.modules():
        if hasattr(module, "_output_capturing_hooks_installed"):
            module._output_capturing_hooks_installed = False
    originals = {key: dict.get(registry, key, _MISSING) for key in entries}
    try:
        dict.update(registry, entries)
        output_capturing.maybe_install_capturing_hooks(model)
    finally:
        for key, original in originals.items():
            if original is _MISSING:
                dict.pop(registry, key, None)
            else:
                dict.__setitem__(registry, key, original)
    logger.info("AutoEP preset 'dbrx': router_logits now recorded from router.gate in %d model(s)", len(entries))
    return len(entries)


def register_dbrx_autoep_preset() -> None:
    """Add the DBRX preset and adapter to DeepSpeed's AutoEP registry (idempotent).

    Call before `deepspeed.initialize` (the loaders do, when the DeepSpeed config enables `expert_parallel`);
    afterwards `"preset_model": "dbrx"` is accepted and `model_type == "dbrx"` is auto-detected.
    """
    _, registry = _deepspeed_preset_api()
    if PRESET_NAME in registry.PRESET_MODELS:
        return
    registry._PRESET_ADAPTERS[PRESET_NAME] = _make_adapter_class()()
    registry.PRESET_MODELS[PRESET_NAME] = build_preset()
    registry._validate_registered_preset_adapters()
    logger.info("registered the DBRX AutoEP preset with DeepSpeed")


def prepare_dbrx_for_autoep(model: nn.Module) -> int:
    """Make the DBRX MoE blocks of `model` detectable by the AutoEP preset; returns how many blocks.

    Requires the 3D experts (`DbrxGroupedExperts`). Sets `config.num_experts` / `num_experts_per_tok` from
    `ffn_config` and the unregistered `router_gate` alias on every `DbrxFFN`.
    """
    ffns = [module for module in model.modules() if isinstance(module, DbrxFFN)]
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no DbrxFFN blocks; the DBRX AutoEP preset does not apply")
    for index, ffn in enumerate(ffns):
        if not isinstance(ffn.experts, DbrxGroupedExperts):
            raise ValueError(
                f"DBRX MoE block {index} has {type(ffn.experts).__name__} experts; expert parallelism needs the 3D "
                "layout: set experts_implementation: grouped (and no PEFT/4-bit wrapping of the experts)"
            )
        ffn.__dict__[ROUTER_GATE_ALIAS] = ffn.router.layer  # plain attribute: not a submodule, not in state_dict
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "ffn_config"):
        sync_moe_config(config)
    return len(ffns)
