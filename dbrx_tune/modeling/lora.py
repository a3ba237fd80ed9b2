"""LoRA for DBRX: attention (`Wqkv`, `out_proj`) and one LoRA per expert on w1/v1/w2, router frozen or trained.

The experts are targeted with PEFT's `target_parameters` on the 3D weights of `DbrxGroupedExperts` (or the 4-bit
`DbrxNF4Experts`), so every expert gets its own rank-r pair and saved adapters are ordinary PEFT adapters that
`PeftModel.from_pretrained` loads onto a model whose experts were swapped by `set_experts_implementation`.

PEFT 0.21 applies a parameter LoRA by re-parametrising the weight as `W + scaling * B @ A` around the module's
forward: a dense (n_experts, out, in) tensor per projection, computed at registration and again on use, whose
backward forms a full-size weight gradient. The `ParamWrapper` below keeps PEFT's parameters, state-dict keys,
merge and unload, and instead hands the per-expert factors to the experts' forward, which applies them to the
routed tokens through the same grouped GEMMs (cost proportional to r). `apply_expert_lora` and
`load_expert_adapter` register it; a plain `PeftModel.from_pretrained` still gives the same numbers, the dense way.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer
from safetensors import safe_open
from torch import nn

from dbrx_tune.modeling.experts import EXPERT_PROJECTIONS, DbrxGroupedExperts, LowRankDelta
from dbrx_tune.modeling.quantized_experts import DbrxNF4Experts

logger = logging.getLogger(__name__)

ATTENTION_TARGETS = ("Wqkv", "out_proj")
EXPERT_TARGETS = tuple(f"ffn.experts.{name}" for name in EXPERT_PROJECTIONS)
ROUTER_MODULE = "router"


class ParamWrapper(lora_layer.ParamWrapper):
    """PEFT's per-parameter LoRA, applied inside the grouped expert GEMMs instead of as a dense weight delta.

    The class keeps PEFT's name on purpose: PEFT 0.21 recognises nested parameter wrappers by class name when it
    wraps the second and third parameter of the same module (`tuners_utils.BaseTuner._inject_parameters`).
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = self.get_base_layer()
        if not isinstance(base, DbrxNF4Experts):
            return super()._get_in_out_features(module)
        # Packed 4-bit storage says nothing about the logical shape; the module does.
        num_experts, out_features, in_features = base.expert_weight_shape(self.parameter_name)
        self.num_experts = num_experts
        self._param_ndim = 3
        return out_features, in_features  # PEFT's pre-swap order for 3D (experts, out, in) weights

    def low_rank_delta(self, adapter_name: str) -> LowRankDelta:
        """The adapter as per-expert factors: down (E, r, in), up (E, out, r); PEFT's `get_delta_weight` layout."""
        weight_a = self.lora_A[adapter_name].weight  # (r * E, in), expert-major rows
        weight_b = self.lora_B[adapter_name].weight  # (out, r * E), expert-minor columns
        down = weight_a.view(self.num_experts, -1, weight_a.shape[-1])
        up = weight_b.view(weight_b.shape[0], -1, self.num_experts).permute(2, 0, 1).contiguous()
        return LowRankDelta(down, up, self.scaling[adapter_name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if isinstance(self.get_base_layer(), DbrxNF4Experts):
            raise ValueError(
                "cannot merge a LoRA into 4-bit experts; merge the saved adapter into the bf16 base checkpoint with "
                "`python -m dbrx_tune.tools.merge --base PATH --adapter PATH --output PATH`"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("LoRA on DBRX experts does not support mixed adapter batches")
        if self.disable_adapters and self.merged:
            self.unmerge()
        if not self.disable_adapters and not self.merged:
            deltas = [self.low_rank_delta(name) for name in self.active_adapters if name in self.lora_A]
            if deltas:
                lora_deltas = dict(kwargs.pop("lora_deltas", None) or {})
                lora_deltas[self.parameter_name] = [*lora_deltas.get(self.parameter_name, ()), *deltas]
                kwargs["lora_deltas"] = lora_deltas
        return self.base_layer(x, *args, **kwargs)


def _register_grouped_lora(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({DbrxGroupedExperts: ParamWrapper, DbrxNF4Experts: ParamWrapper})
    return config


def expert_lora_config(
    r: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    target_attention: bool = True,
    target_experts: bool = True,
    train_router: bool = False,
    task_type: str = "CAUSAL_LM",
) -> LoraConfig:
    """The PEFT config for DBRX LoRA; the router (`ffn.router`) is trained in full when `train_router`.

    With `task_type="SEQ_CLS"` (reward and value models) the new `score` head is trained in full too.
    """
    if not (target_attention or target_experts):
        raise ValueError("lora_target_attention and lora_target_experts are both false: LoRA would train nothing")
    if target_experts and dropout:
        raise ValueError(
            f"lora_dropout={dropout}: LoRA on the experts' weights (PEFT target_parameters) cannot apply dropout; "
            "set lora_dropout: 0.0, or lora_target_experts: false"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(ATTENTION_TARGETS) if target_attention else [],
        target_parameters=list(EXPERT_TARGETS) if target_experts else None,
        modules_to_save=([ROUTER_MODULE] if train_router else []) + (["score"] if task_type == "SEQ_CLS" else [])
        or None,
        bias="none",
        task_type=task_type,
    )
    return _register_grouped_lora(config)


def apply_expert_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_attention: bool = True,
    target_experts: bool = True,
    train_router: bool = False,
    task_type: str = "CAUSAL_LM",
) -> PeftModel:
    """Wrap a DBRX model in LoRA; only adapter (and, with `train_router`, router) parameters require grad.

    The experts must have been swapped to `DbrxGroupedExperts` (or quantized to `DbrxNF4Experts`) first: the stock
    fused 2D experts would get one LoRA shared by all experts.
    """
    if target_experts:
        _require_3d_experts(model)
    config = expert_lora_config(
        r,
        alpha,
        dropout,
        target_attention=target_attention,
        target_experts=target_experts,
        train_router=train_router,
        task_type=task_type,
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%s: %d trainable of %d parameters", r, alpha, trainable, total)
    return peft_model


def load_expert_adapter(
    model: nn.Module, adapter_path: str, *, is_trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """Load a saved DBRX adapter with the grouped-GEMM expert LoRA; a shape mismatch names the tensor."""
    config = LoraConfig.from_pretrained(adapter_path)
    if config.target_parameters:
        _require_3d_experts(model)
    _check_adapter_shapes(model, adapter_path, config)
    return PeftModel.from_pretrained(
        model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable, config=_register_grouped_lora(config)
    )


def merge_expert_adapter(peft_model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights and return the plain model (experts still 3D; save with
    `save_pretrained` to get DBRX's original checkpoint names and shapes)."""
    return peft_model.merge_and_unload(safe_merge=True)


def _require_3d_experts(model: nn.Module) -> None:
    if not any(isinstance(m, (DbrxGroupedExperts, DbrxNF4Experts)) for m in model.modules()):
        raise ValueError(
            "LoRA on DBRX experts needs the 3D expert layout: call "
            "dbrx_tune.modeling.experts.set_experts_implementation(model, 'grouped') (or quantize_experts_4bit) first"
        )


def _expected_adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Shapes a correct adapter file has, keyed like PEFT's saved keys (`base_model.model.<module>.lora_A.weight`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    r = config.r
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[-1] in (config.target_modules or ()):
            shapes[f"base_model.model.{name}.lora_A.weight"] = (r, module.in_features)
            shapes[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, r)
        if isinstance(module, (DbrxGroupedExperts, DbrxNF4Experts)) and config.target_parameters:
            # PEFT nests one wrapper per targeted parameter in registration order (w1, v1, w2): w2 is outermost.
            targeted = [p for p in EXPERT_PROJECTIONS if f"ffn.experts.{p}" in config.target_parameters]
            for depth, projection in enumerate(reversed(targeted)):
                num_experts, out_features, in_features = _logical_shape(module, projection)
                prefix = f"base_model.model.{name}" + ".base_layer" * depth
                shapes[f"{prefix}.lora_A.weight"] = (r * num_experts, in_features)
                shapes[f"{prefix}.lora_B.weight"] = (out_features, r * num_experts)
    return shapes


def _logical_shape(module: nn.Module, projection: str) -> tuple[int, int, int]:
    if isinstance(module, DbrxNF4Experts):
        return module.expert_weight_shape(projection)
    return tuple(getattr(module, projection).shape)


def _check_adapter_shapes(model: nn.Module, adapter_path: str, config: LoraConfig) -> None:
    weights = os.path.join(adapter_path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return  # hub id: PEFT resolves and reports it
    if config.rank_pattern or config.alpha_pattern:
        return  # per-module ranks: PEFT's own load checks the shapes
    expected = _expected_adapter_shapes(model, config)
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            want = expected.get(key)
            got = tuple(handle.get_slice(key).get_shape())
            if want is not None and want != got:
                raise ValueError(
                    f"{weights}: tensor {key} has shape {got}, but this model needs {want}; the adapter was trained "
                    f"on a model of another shape (adapter r={config.r}, base {json.dumps(_model_shape(model))})"
                )


def _model_shape(model: nn.Module) -> dict[str, int]:
    ffn = getattr(getattr(model, "config", None), "ffn_config", None)
    config = getattr(model, "config", None)
    return {
        "d_model": getattr(config, "d_model", -1),
        "n_experts": getattr(ffn, "moe_num_experts", -1),
        "ffn_hidden_size": getattr(ffn, "ffn_hidden_size", -1),
    }
