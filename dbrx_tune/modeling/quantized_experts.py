"""DBRX experts stored in 4-bit NF4 (bitsandbytes), for QLoRA.

bitsandbytes' 4-bit loading converts only `nn.Linear`, so about 96% of DBRX (the experts, fused 2D parameters)
stays bf16 and stock QLoRA does not make DBRX small. `DbrxNF4Experts` stores each projection's (n_experts, out, in)
weights as NF4 with blocks of 64 values that never straddle two experts, and double-quantized block scales
(bitsandbytes `compress_statistics`). The forward dequantizes one group of experts at a time (all of them by
default) into the compute dtype, runs the same grouped GEMM as `DbrxGroupedExperts`, and frees the group; the
backward dequantizes again instead of keeping bf16 weights alive. With MoE token chunks (long context) the three
projections of a group are dequantized once per pass and serve every token block of that group. LoRA (see
`dbrx_tune.modeling.lora`) adds its per-expert low-rank terms on the routed tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.dbrx.modeling_dbrx import DbrxExperts, DbrxFFN

from dbrx_tune.modeling.experts import (
    EXPERT_PROJECTIONS,
    DbrxGroupedExperts,
    LowRankDelta,
    grouped_linear,
    run_experts,
    to_grouped_layout,
)

logger = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # bitsandbytes is a dependency; a broken install should say so plainly
        raise ImportError("4-bit experts need bitsandbytes (pip install 'bitsandbytes>=0.48')") from err
    return bnb_functional


class DbrxNF4Experts(nn.Module):
    """Frozen NF4 DBRX experts with the call signature of `DbrxExperts` (plus `lora_deltas`).

    Per projection p in (w1, v1, w2): parameter `p` holds the packed 4-bit codes, (n_experts, out * in / 2) uint8,
    frozen (a parameter so that PEFT's `target_parameters` finds it); buffers `p_absmax` (uint8 block scales),
    `p_absmax_scale` / `p_absmax_code` / `p_absmax_offset` (the second-level quantization of those scales) and the
    shared `nf4_code`. `experts_per_group` bounds the transient bf16 memory of one dequantized projection.
    """

    token_chunk: int | None = None  # tokens through the experts at a time (`set_moe_token_chunk`); None: all

    def __init__(self, ffn_config, *, experts_per_group: int | None = None):
        super().__init__()
        self.num_experts = ffn_config.moe_num_experts
        self.hidden_size = ffn_config.hidden_size
        self.ffn_hidden_size = ffn_config.ffn_hidden_size
        self.activation_fn = ACT2FN[ffn_config.ffn_act_fn.get("name", "silu")]
        self.experts_per_group = experts_per_group or self.num_experts
        if (self.ffn_hidden_size * self.hidden_size) % NF4_BLOCKSIZE:
            raise ValueError(
                f"ffn_hidden_size * d_model = {self.ffn_hidden_size * self.hidden_size} is not a multiple of the NF4 "
                f"block size {NF4_BLOCKSIZE}: 4-bit blocks would straddle two experts"
            )

    def expert_weight_shape(self, name: str) -> tuple[int, int, int]:
        """Logical (n_experts, out, in) shape of projection `name`."""
        if name == "w2":
            return self.num_experts, self.hidden_size, self.ffn_hidden_size
        return self.num_experts, self.ffn_hidden_size, self.hidden_size

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module, ffn_config, *, experts_per_group: int | None = None) -> DbrxNF4Experts:
        """Quantize stock `DbrxExperts` or `DbrxGroupedExperts` (on their device: CUDA is fast, CPU works)."""
        functional = _bnb_functional()
        module = cls(ffn_config, experts_per_group=experts_per_group)
        for name in EXPERT_PROJECTIONS:
            if isinstance(experts, DbrxGroupedExperts):
                weight = getattr(experts, name)
            elif isinstance(experts, DbrxExperts):
                weight = to_grouped_layout(name, getattr(experts.mlp, name), module.num_experts)
            else:
                raise TypeError(f"cannot quantize {type(experts).__name__}: expected DbrxExperts or DbrxGroupedExperts")
            packed, state = functional.quantize_4bit(
                weight.contiguous().reshape(-1), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
            )
            module.register_parameter(name, nn.Parameter(packed.view(module.num_experts, -1), requires_grad=False))
            module.register_buffer(f"{name}_absmax", state.absmax)
            module.register_buffer(f"{name}_absmax_scale", state.state2.absmax)
            module.register_buffer(f"{name}_absmax_code", state.state2.code)
            module.register_buffer(f"{name}_absmax_offset", torch.as_tensor(state.offset, device=packed.device))
            module.absmax_blocksize = state.state2.blocksize
            if not hasattr(module, "nf4_code"):
                module.register_buffer("nf4_code", state.code)
        return module

    def dequantize(self, name: str, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Experts [start, end) of projection `name` as (end - start, out, in) in `dtype`."""
        functional = _bnb_functional()
        end = self.num_experts if end is None else end
        nested = functional.QuantState(
            absmax=getattr(self, f"{name}_absmax_scale"),
            code=getattr(self, f"{name}_absmax_code"),
            blocksize=self.absmax_blocksize,
            dtype=torch.float32,
        )
        absmax = functional.dequantize_blockwise(getattr(self, f"{name}_absmax"), nested)
        absmax = absmax + getattr(self, f"{name}_absmax_offset")
        _, out_features, in_features = self.expert_weight_shape(name)
        blocks_per_expert = out_features * in_features // NF4_BLOCKSIZE
        packed = getattr(self, name)[start:end].reshape(-1, 1)
        state = functional.QuantState(
            absmax=absmax[start * blocks_per_expert : end * blocks_per_expert],
            shape=torch.Size((end - start, out_features, in_features)),
            code=self.nf4_code,
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=dtype,
        )
        return functional.dequantize_4bit(packed, state)

    @torch.no_grad()
    def to_grouped(self, ffn_config, dtype: torch.dtype) -> DbrxGroupedExperts:
        """The `dtype` experts these 4-bit weights stand for, the base a QLoRA adapter was trained on (saving a
        random-init base beside its adapter: there is no other copy)."""
        module = DbrxGroupedExperts(ffn_config, device=self.w1.device, dtype=dtype)
        for name in EXPERT_PROJECTIONS:
            getattr(module, name).copy_(self.dequantize(name, dtype))
        module.requires_grad_(False)
        return module

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora_deltas: Mapping[str, Sequence[LowRankDelta]] | None = None,
    ) -> torch.Tensor:
        """Same contract as `DbrxGroupedExperts.forward`; the 4-bit weights are frozen (no weight gradient)."""

        def base_projection(name: str, inputs: torch.Tensor, offsets: torch.Tensor, counts) -> torch.Tensor:
            return _FrozenNF4GroupedLinear.apply(inputs, self, name, offsets, counts)

        return run_experts(self, hidden_states, top_k_index, top_k_weights, base_projection, lora_deltas)

    def expert_groups(self) -> list[tuple[int, int]]:
        """Expert ranges of at most `experts_per_group`: the token-chunked path dequantizes one at a time."""
        step = self.experts_per_group
        return [(start, min(start + step, self.num_experts)) for start in range(0, self.num_experts, step)]

    def group_projection(self, start: int, end: int, dtype: torch.dtype):
        """`base_projection(name, rows, offsets, counts)` for the rows routed to experts [start, end), from one
        dequantization of their three projections (`dtype`) that serves every token block of the group; autograd
        gives inputs their gradients only (the 4-bit weights are frozen)."""
        weights = {name: self.dequantize(name, dtype, start, end) for name in EXPERT_PROJECTIONS}

        def base_projection(name: str, inputs: torch.Tensor, offsets: torch.Tensor, counts) -> torch.Tensor:
            return grouped_linear(inputs, weights[name], offsets, counts)

        return base_projection

    def grouped_matmul(
        self, name: str, rows: torch.Tensor, offsets: torch.Tensor, counts, transpose: bool
    ) -> torch.Tensor:
        """rows @ W[e].T (or rows @ W[e] when `transpose`) per expert, dequantizing `experts_per_group` at a time."""
        step = self.experts_per_group
        if step >= self.num_experts:
            weight = self.dequantize(name, rows.dtype)
            return grouped_linear(rows, weight.transpose(1, 2) if transpose else weight, offsets, counts)
        host_counts = list(counts) if counts is not None else offsets.diff(prepend=offsets.new_zeros(1)).tolist()
        outputs, row = [], 0
        for start in range(0, self.num_experts, step):
            end = min(start + step, self.num_experts)
            group_counts = host_counts[start:end]
            n_rows = sum(group_counts)
            weight = self.dequantize(name, rows.dtype, start, end)
            group_offsets = offsets[start:end] - row
            outputs.append(
                grouped_linear(
                    rows[row : row + n_rows],
                    weight.transpose(1, 2) if transpose else weight,
                    group_offsets,
                    group_counts if counts is not None else None,
                )
            )
            row += n_rows
            del weight
        return torch.cat(outputs)


class _FrozenNF4GroupedLinear(torch.autograd.Function):
    """y = x @ dequant(W)[e].T on sorted rows; backward re-dequantizes, so no bf16 weight outlives the call."""

    @staticmethod
    def forward(ctx, rows, module, name, offsets, counts):
        ctx.module, ctx.name, ctx.counts = module, name, counts
        ctx.save_for_backward(offsets)
        return module.grouped_matmul(name, rows, offsets, counts, transpose=False)

    @staticmethod
    def backward(ctx, grad_out):
        (offsets,) = ctx.saved_tensors
        grad_rows = ctx.module.grouped_matmul(ctx.name, grad_out.contiguous(), offsets, ctx.counts, transpose=True)
        return grad_rows, None, None, None, None


def quantize_experts_4bit(model: nn.Module, *, experts_per_group: int | None = None) -> nn.Module:
    """Replace every DBRX FFN's experts (stock or grouped) by `DbrxNF4Experts`, layer by layer (in place).

    Each layer's bf16 experts are freed as soon as its 4-bit copy exists, so peak memory grows by one layer.
    Attention and other `nn.Linear` layers are left to bitsandbytes' usual `BitsAndBytesConfig(load_in_4bit=True)`.
    """
    ffns = [module for module in model.modules() if isinstance(module, DbrxFFN)]
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no DbrxFFN modules; quantize_experts_4bit expects DBRX")
    ffn_config = model.config.ffn_config
    for ffn in ffns:
        if isinstance(ffn.experts, DbrxNF4Experts):
            continue
        ffn.experts = DbrxNF4Experts.from_experts(ffn.experts, ffn_config, experts_per_group=experts_per_group)
    logger.info("quantized the experts of %d DBRX layers to NF4 (double quant, block %d)", len(ffns), NF4_BLOCKSIZE)
    return model
