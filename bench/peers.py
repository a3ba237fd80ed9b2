"""The peers a user could run instead of our experts, holding the same DBRX weights: transformers' own MoE experts
(`MixtralExperts` with `config._experts_implementation = "grouped_mm"`, the path 60-odd transformers MoE models take
and DBRX does not), PEFT's `target_parameters` LoRA on them, and liger-kernel's fused MoE (same weight layout).

Nothing here re-implements a peer: the weights are copied into the peer's own module and its own forward runs.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import MixtralConfig
from transformers.models.dbrx.modeling_dbrx import DbrxFFN
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from dbrx_tune.modeling.experts import DbrxGroupedExperts

TRANSFORMERS_PEER = "transformers MixtralExperts, experts_implementation=grouped_mm"
LIGER_PEER = "liger-kernel LigerFusedMoEFunction"


def transformers_experts(source: DbrxGroupedExperts, top_k: int) -> MixtralExperts:
    """transformers' grouped-GEMM experts holding `source`'s weights: gate_up = [w1; v1], down = w2 (no transpose)."""
    config = MixtralConfig(
        hidden_size=source.hidden_size,
        intermediate_size=source.ffn_hidden_size,
        num_local_experts=source.num_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        peer = MixtralExperts(config)
    with torch.no_grad():
        gate_up = torch.cat([source.w1.detach(), source.v1.detach()], dim=1)
        peer.gate_up_proj = nn.Parameter(gate_up, requires_grad=source.w1.requires_grad)
        peer.down_proj = nn.Parameter(source.w2.detach().clone(), requires_grad=source.w2.requires_grad)
    return peer


class PeerExperts(nn.Module):
    """A peer experts module in DBRX's FFN slot: DBRX passes (batch, seq, d) hidden states, the peer takes tokens."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.experts(tokens, top_k_index, top_k_weights).view_as(hidden_states)


def use_transformers_experts(model: nn.Module) -> nn.Module:
    """Swap every DBRX FFN's experts (ours, grouped) for transformers' grouped-GEMM experts with the same weights."""
    top_k = model.config.ffn_config.moe_top_k
    for ffn in [module for module in model.modules() if isinstance(module, DbrxFFN)]:
        if not isinstance(ffn.experts, DbrxGroupedExperts):
            raise TypeError("use_transformers_experts expects DbrxGroupedExperts (set_experts_implementation first)")
        ffn.experts = PeerExperts(transformers_experts(ffn.experts, top_k))
    return model


def peft_lora_on_transformers_experts(model: nn.Module, r: int) -> nn.Module:
    """PEFT's own LoRA: attention (Wqkv, out_proj) as modules, the peer's 3D experts through `target_parameters`."""
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["Wqkv", "out_proj"],
        target_parameters=["experts.experts.gate_up_proj", "experts.experts.down_proj"],
    )
    return get_peft_model(model, config)


def liger_fused_moe():
    """liger-kernel's fused MoE autograd function, or None when it is not installed.

    Its Triton autotuning at DBRX shapes ran past 400 s in a probe; `LIGER_FUSED_MOE_AUTOTUNE=0` (set here unless
    the caller set it) pins one config per kernel, as its own docs suggest."""
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    try:
        from liger_kernel.ops import LigerFusedMoEFunction
    except ImportError:
        return None
    return LigerFusedMoEFunction


def liger_forward(function, peer: MixtralExperts):
    """A forward(x, index, weights) running liger's fused MoE on the peer's weights (its layout is transformers')."""

    def forward(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        out = function.apply(tokens, peer.gate_up_proj, peer.down_proj, top_k_index.int(), top_k_weights)
        return out.view_as(x)

    return forward
