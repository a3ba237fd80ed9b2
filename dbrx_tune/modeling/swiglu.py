"""The expert hidden state silu(gate) * up, scaled by each row's router weight, with a fused CUDA kernel.

Eager PyTorch spends about 7 passes over the (rows, ffn) tensors forward and 15 backward on this, and keeps
silu(gate) and silu(gate) * up for backward; in a DBRX-sized MoE layer that was ~5.7 ms of a ~68 ms forward and
backward (bench/NOTES_moe.md). One Triton kernel each way (silu recomputed in backward) brings it to ~2.5 ms and
saves the two stored activations. CPU, other activations and machines without Triton run the eager formula.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.activations import SiLUActivation


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation_fn: nn.Module, row_weights: torch.Tensor) -> torch.Tensor:
    """activation_fn(gate) * up * row_weights[:, None]: the expert hidden state, scaled by each row's router weight.

    gate, up: (rows, ffn); row_weights: (rows,). On CUDA with SiLU (DBRX's activation) this is one fused Triton
    kernel forward (3 passes over (rows, ffn) tensors) and one backward (5 passes), keeping only gate and up for
    backward (silu is recomputed). Eager PyTorch makes about 7 passes forward and 15 backward, and keeps silu(gate) and
    silu(gate) * up as well. Elsewhere (CPU, other activations, no Triton) the eager formula runs unchanged.
    """
    math = _fused_swiglu_math(gate) if isinstance(activation_fn, (SiLUActivation, nn.SiLU)) else None
    if math is not None:
        return FusedSwiGLU.apply(gate, up, row_weights, math)
    return activation_fn(gate) * up * row_weights.unsqueeze(-1).to(gate.dtype)


class EagerSwiGLUMath:
    """The fused kernels' arithmetic in PyTorch ops (float32 or wider, one rounding to the output dtype), used to check
    `FusedSwiGLU`'s backward where Triton is absent."""

    @staticmethod
    def forward(gate, up, row_weights):
        compute = torch.promote_types(gate.dtype, torch.float32)
        g, u, w = gate.to(compute), up.to(compute), row_weights.to(compute).unsqueeze(-1)
        return (torch.nn.functional.silu(g) * u * w).to(gate.dtype)

    @staticmethod
    def backward(grad, gate, up, row_weights, need_weight_grad: bool):
        compute = torch.promote_types(gate.dtype, torch.float32)
        g, u, w, dh = gate.to(compute), up.to(compute), row_weights.to(compute).unsqueeze(-1), grad.to(compute)
        sig = torch.sigmoid(g)
        silu = g * sig
        d_up = dh * w * silu
        d_gate = dh * w * u * sig * (1 + g * (1 - sig))
        d_weights = (dh * silu * u).sum(-1).to(row_weights.dtype) if need_weight_grad else None
        return d_gate.to(gate.dtype), d_up.to(up.dtype), d_weights


class FusedSwiGLU(torch.autograd.Function):
    """silu(gate) * up * row_weights[:, None] with a one-pass forward and backward supplied by `math`
    (`_triton_swiglu()` on CUDA, `EagerSwiGLUMath` for checks). Saves gate, up and the weights, not silu(gate)."""

    @staticmethod
    def forward(ctx, gate, up, row_weights, math):
        ctx.save_for_backward(gate, up, row_weights)
        ctx.math = math
        return math.forward(gate, up, row_weights)

    @staticmethod
    def backward(ctx, grad):
        gate, up, row_weights = ctx.saved_tensors
        d_gate, d_up, d_weights = ctx.math.backward(grad, gate, up, row_weights, ctx.needs_input_grad[2])
        return d_gate, d_up, d_weights, None


def _fused_swiglu_math(tensor: torch.Tensor):
    """The fused SwiGLU kernels for tensor's device, or None to run the eager formula."""
    return _triton_swiglu() if tensor.is_cuda else None


@functools.cache
def _triton_swiglu():
    """The Triton SwiGLU kernels, or None where Triton is not installed (CPU-only PyTorch). Imported on first use so
    that importing this module never needs Triton. The row count only sets the launch grid, so a new token count per
    step launches the same compiled kernel (the column count, an argument, is the ffn width: fixed per model)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    block = 1024

    @triton.jit
    def forward_kernel(gate, up, weights, out, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offsets = row * n_cols + cols
        g = tl.load(gate + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weights + row).to(tl.float32)
        tl.store(out + offsets, (g * tl.sigmoid(g) * u * w).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_kernel(grad, gate, up, weights, d_gate, d_up, d_weight_parts, n_cols, n_blocks, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        block_index = tl.program_id(1)
        cols = block_index * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offsets = row * n_cols + cols
        dh = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weights + row).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(d_up + offsets, (dh * w * silu).to(d_up.dtype.element_ty), mask=mask)
        tl.store(d_gate + offsets, (dh * w * u * sig * (1.0 + g * (1.0 - sig))).to(d_gate.dtype.element_ty), mask=mask)
        tl.store(d_weight_parts + row * n_blocks + block_index, tl.sum(dh * silu * u, axis=0))

    class TritonSwiGLUMath:
        @staticmethod
        def forward(gate, up, row_weights):
            gate, up, row_weights = (t.contiguous() for t in (gate, up, row_weights))
            out = torch.empty_like(gate)
            rows, cols = gate.shape
            if out.numel():
                forward_kernel[(rows, triton.cdiv(cols, block))](gate, up, row_weights, out, cols, BLOCK=block)
            return out

        @staticmethod
        def backward(grad, gate, up, row_weights, need_weight_grad: bool):
            grad, gate, up, row_weights = (t.contiguous() for t in (grad, gate, up, row_weights))
            d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
            rows, cols = gate.shape
            n_blocks = triton.cdiv(cols, block)
            parts = torch.empty(rows, n_blocks, device=gate.device, dtype=torch.float32)
            if grad.numel():
                backward_kernel[(rows, n_blocks)](
                    grad, gate, up, row_weights, d_gate, d_up, parts, cols, n_blocks, BLOCK=block
                )
            d_weights = parts.sum(-1).to(row_weights.dtype) if need_weight_grad else None
            return d_gate, d_up, d_weights

    return TritonSwiGLUMath
