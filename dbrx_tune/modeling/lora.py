"""LoRA for DBRX: attention (`Wqkv`, `out_proj`) and one LoRA per expert on w1/v1/w2, router frozen or trained.

The experts are targeted with PEFT's `target_parameters` on the 3D weights of `DbrxGroupedExperts` (or the 4-bit
`DbrxNF4Experts`), so every expert gets its own rank-r pair and saved adapters are PEFT adapters (PEFT's tensor
names and config fields) that `load_expert_adapter` loads onto a model whose experts were swapped by
`set_experts_implementation`.

PEFT 0.21 applies a parameter LoRA by re-parametrising the weight as `W + scaling * B @ A` around the module's
forward: a dense (n_experts, out, in) tensor per projection, computed at registration and again on use, whose
backward forms a full-size weight gradient. The `ParamWrapper` below keeps PEFT's parameters, state-dict keys,
merge and unload, and instead hands the per-expert factors to the experts' forward, which applies them to the
routed tokens through the same grouped GEMMs (cost proportional to r). `apply_expert_lora` and
`load_expert_adapter` register it.

Stock transformers has no 3D experts: its DBRX experts are fused 2D `ffn.experts.mlp.{w1,v1,w2}`, so a stock
`PeftModel.from_pretrained(DbrxForCausalLM, adapter)` would match none of `target_parameters`, warn, and drop the
expert LoRA: wrong logits and no error. An adapter saved with expert targets (`ExpertLoraConfig`) therefore carries a
`task_type` that PEFT's config validation rejects, with a message naming dbrx_tune and the way to load or merge it;
the real task type is kept under the `dbrx_tune` key, which `read_adapter_config` restores. The check runs when PEFT
reads the config, before any model is touched, and covers every stock path that goes through `PeftConfig`
(`PeftModel.from_pretrained`, `AutoPeftModel*`, transformers' `load_adapter`). Converting the adapter to a stock one
instead (a rank n_experts * r LoRA on the fused 2D weights is the same update) cannot work with PEFT 0.21: any
`target_parameters` LoRA on the stock `mlp` crashes, because `DbrxExperts.forward` reads `self.mlp.v1` etc. outside
the wrapped forward. Merging (`python -m dbrx_tune.tools.merge`) is the way to a stock checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer
from peft.utils import CONFIG_NAME
from safetensors import safe_open
from torch import nn
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

from dbrx_tune.modeling.experts import EXPERT_PROJECTIONS, DbrxGroupedExperts, LowRankDelta
from dbrx_tune.modeling.quantized_experts import DbrxNF4Experts

logger = logging.getLogger(__name__)

ATTENTION_TARGETS = ("Wqkv", "out_proj")
EXPERT_TARGETS = tuple(f"ffn.experts.{name}" for name in EXPERT_PROJECTIONS)
ROUTER_MODULE = "router"

TOOLKIT_KEY = "dbrx_tune"  # adapter_config.json: {"task_type": the real one, "format": ADAPTER_FORMAT}
ADAPTER_FORMAT = "expert-lora-3d"
STOCK_REFUSAL = (
    "dbrx_tune expert LoRA adapter: one LoRA per expert on the 3D expert weights of dbrx_tune's grouped DBRX experts, "
    "which stock DbrxForCausalLM (fused 2D ffn.experts.mlp.*) does not have, so stock PEFT would silently drop them. "
    "Load it with dbrx_tune.modeling.lora.load_expert_adapter, or merge it into the base first with "
    "`python -m dbrx_tune.tools.merge --base BASE --adapter THIS_DIR --output NEW_DIR` (see README.md here)"
)
README_HEADING = "## Loading this adapter (dbrx-tune)"


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


class ExpertLoraConfig(LoraConfig):
    """`LoraConfig` whose saved adapter stock PEFT refuses to load when it targets the experts (see the module doc).

    The marking happens in `save_pretrained`, which PEFT calls for every adapter save (`PeftModel.save_pretrained`,
    hence `Trainer.save_model`, `checkpoint-N`, PPO's saves), so no save path can forget it. Adapters with only
    attention targets load right in stock PEFT (same module names) and are left as they are.
    """

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        if self.target_parameters:
            path = os.path.join(save_directory, CONFIG_NAME)
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
            values[TOOLKIT_KEY] = {"task_type": values["task_type"], "format": ADAPTER_FORMAT}
            values["task_type"] = STOCK_REFUSAL
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(values, handle, indent=2, sort_keys=True)
            write_adapter_readme(save_directory, self.base_model_name_or_path)


def read_adapter_config(adapter_path: str) -> ExpertLoraConfig:
    """The LoRA config of a saved adapter (directory or hub id), with the task type `ExpertLoraConfig` set aside."""
    local = os.path.join(adapter_path, CONFIG_NAME)
    config_file = local if os.path.isfile(local) else hf_hub_download(adapter_path, CONFIG_NAME)
    values = ExpertLoraConfig.from_json_file(config_file)
    toolkit = values.pop(TOOLKIT_KEY, None)
    if toolkit is not None:
        values["task_type"] = toolkit["task_type"]
    if values.pop("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: not a LoRA adapter (peft_type is not LORA)")
    return ExpertLoraConfig.from_peft_type(**values)


def write_adapter_readme(adapter_dir: str, base: str | None) -> None:
    """Add how to load, merge and serve the adapter to its README.md (PEFT's model card, written first), once."""
    path = os.path.join(adapter_dir, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    if README_HEADING in text:
        return
    base = base or "BASE"
    note = f"""{README_HEADING}

This adapter puts one LoRA on every DBRX expert, on the 3D expert weights of dbrx-tune's grouped experts. Stock
transformers' DBRX has fused 2D experts (`ffn.experts.mlp.*`) where these tensors do not fit, so a stock
`PeftModel.from_pretrained` refuses it (its `task_type` names dbrx_tune) instead of silently dropping the expert LoRA.

- Load (training, evaluation): load the base (`{base}`), swap its experts with
  `dbrx_tune.modeling.experts.set_experts_implementation(model, "grouped")`, then
  `dbrx_tune.modeling.lora.load_expert_adapter(model, "THIS_DIR")`.
- Merge: `python -m dbrx_tune.tools.merge --base {base} --adapter THIS_DIR --output NEW_DIR` (or `dbrx-merge`):
  a plain DBRX checkpoint in the original layout, checked against the adapter model's logits before it is written.
- Serve: merge first; stock transformers, vLLM, TGI and SGLang load the merged checkpoint without dbrx-tune.
"""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{text.rstrip()}\n\n{note}" if text.strip() else note)


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
) -> ExpertLoraConfig:
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
    config = ExpertLoraConfig(
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
    """Load a saved DBRX adapter (also one marked by `ExpertLoraConfig`) with the grouped-GEMM expert LoRA; a shape
    mismatch names the tensor."""
    config = read_adapter_config(adapter_path)
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


def base_model_copy(peft_model: PeftModel) -> nn.Module:
    """A plain copy of the model under the adapters, to save as their base: PEFT's `unload` on a deep copy (adapter
    tensors and wrappers gone, `modules_to_save` originals back) and 4-bit experts dequantized to the grouped layout,
    whose state dict has DBRX's original names and shapes. `peft_model` is left as it is."""
    base = copy.deepcopy(peft_model).unload()
    dtype = base.dtype
    for ffn in base.modules():
        if isinstance(ffn, DbrxFFN) and isinstance(ffn.experts, DbrxNF4Experts):
            ffn.experts = ffn.experts.to_grouped(base.config.ffn_config, dtype)
    return base


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
