"""FP8 expert GEMMs for DBRX's grouped experts: rowwise-scaled `torch._scaled_grouped_mm` on Hopper.

Hopper runs FP8 GEMMs at twice the bf16 rate. An expert projection y = x @ W[e].T is run as

    forward   y  = (x8 * sx) @ (W8 * sW).T       x and W quantized along their shared K dimension
    backward  dx = (dy8 * sdy) @ (Wt8 * sWt).T   dy and W.T quantized along N, the dimension that contracts here
              dW = dy.T @ x                      bf16 grouped GEMM (only when W is trained)

with e4m3 values and one float32 scale per row (per routed token row; per expert output row of W), the scaling
torchtitan and torchao use. Master weights, gradients and the other layers stay bf16.

What makes this faster than quantizing everything on every call (torchao's `_to_fp8_rowwise_then_scaled_grouped_mm`,
which with frozen weights ran slower than bf16 on an H200): the two FP8 copies of each weight are cached on the module
and re-made only when the weight may have changed (a new storage or version, or an optimizer step). With frozen experts
(LoRA) they are made once, so a step quantizes only activations; gradient checkpointing's recompute reuses them too.
The cache costs one byte per weight element per copy (two copies), so it is for weights a GPU holds whole: ZeRO-3
partitioned and AutoEP experts are refused by the caller before training starts.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max
_EPS = 1e-12


def fp8_unsupported_reason(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why FP8 expert GEMMs cannot run on `device` for `dtype` weights, or None when they can (bf16 on CUDA 9.x)."""
    if device.type != "cuda":
        return f"FP8 grouped GEMMs need a CUDA GPU, the experts are on {device.type}"
    if dtype != torch.bfloat16:
        return f"FP8 expert GEMMs take bf16 weights and activations, the experts are {dtype}"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"rowwise FP8 grouped GEMMs run on Hopper (compute capability 9.x); this GPU is {major}.{minor}"
    return None


class Fp8Rows(NamedTuple):
    """A tensor quantized along its last dimension: `data` (e4m3) * `scale` (float32, one per row) ~ the original."""

    data: torch.Tensor
    scale: torch.Tensor


def quantize_rows(tensor: torch.Tensor) -> Fp8Rows:
    """Rowwise e4m3 quantization along the last dimension, scaled so each row's largest magnitude maps to 448."""
    amax = tensor.abs().amax(dim=-1, keepdim=True).float().clamp_(min=_EPS)
    scale = amax / _FP8_MAX
    data = (tensor.float() / scale).to(FP8_DTYPE)
    return Fp8Rows(data, scale.squeeze(-1))


_optimizer_steps = 0
_step_hook_registered = False


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def track_optimizer_steps() -> None:
    """Count every torch optimizer step in this process (a global step post-hook, registered once).

    A trained weight's FP8 copies are re-made after each step: an update written through `param.data` (as some
    optimizers and DeepSpeed's copy-back of master weights do) does not move the parameter's version counter, so the
    version alone could let a cache serve stale weights."""
    global _step_hook_registered
    if not _step_hook_registered:
        register_optimizer_step_post_hook(_count_optimizer_step)
        _step_hook_registered = True


_compiled_quantize_rows = None


def quantize_rows_fast(tensor: torch.Tensor) -> Fp8Rows:
    """`quantize_rows` as one fused kernel on CUDA (torch.compile): a reduction and a cast pass instead of the
    five eager passes, which cost more than the FP8 GEMMs save when a step re-quantizes trained weights."""
    global _compiled_quantize_rows
    if tensor.device.type != "cuda":
        return quantize_rows(tensor)
    if _compiled_quantize_rows is None:
        _compiled_quantize_rows = torch.compile(quantize_rows, dynamic=True)
    return _compiled_quantize_rows(tensor)


class Fp8Weight(NamedTuple):
    """The two FP8 copies of an expert weight W (n_experts, out, in) the GEMMs read, and the version they copy.

    forward: W quantized along `in` (n_experts, out, in); input gradient: W.T quantized along `out`, stored
    (n_experts, in, out) contiguous so that its transposed view is the column-major operand the kernel wants."""

    forward: Fp8Rows
    backward: Fp8Rows
    version: tuple[int, int, int]


class Fp8WeightCache:
    """FP8 copies of a module's expert weights, keyed by name, re-made when a weight's values may have changed.

    A frozen weight's copies live until its storage or version changes (LoRA, QLoRA: made once); a trained weight's
    also until the next optimizer step (see `track_optimizer_steps`), so forward and the recompute of gradient
    checkpointing share them. Not a buffer and not in the state dict: checkpoints keep the bf16 weights."""

    def __init__(self) -> None:
        self._entries: dict[str, Fp8Weight] = {}
        track_optimizer_steps()

    def get(self, name: str, weight: torch.Tensor) -> Fp8Weight:
        version = (weight.data_ptr(), weight._version, _optimizer_steps if weight.requires_grad else 0)
        entry = self._entries.get(name)
        if entry is None or entry.version != version:
            with torch.no_grad():
                detached = weight.detach()
                entry = Fp8Weight(
                    forward=quantize_rows_fast(detached),
                    backward=quantize_rows_fast(detached.transpose(-2, -1).contiguous()),
                    version=version,
                )
            self._entries[name] = entry
        return entry

    def clear(self) -> None:
        self._entries.clear()


def _scaled_grouped_mm(rows: Fp8Rows, weight: Fp8Rows, offsets: torch.Tensor, fast_accum: bool) -> torch.Tensor:
    """(rows.data * rows.scale) @ (weight.data[e] * weight.scale[e]).T per expert group, in bf16.

    `fast_accum` (Hopper's faster, less precise FP8 accumulation) is used in forward only, as torchao's float8
    training does: gradients keep the full-precision accumulation."""
    return torch._scaled_grouped_mm(
        rows.data,
        weight.data.transpose(-2, -1),
        rows.scale,
        weight.scale,
        offs=offsets,
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


class _Fp8GroupedLinear(torch.autograd.Function):
    """y = x @ W[e].T over token rows sorted by expert, forward and input gradient in FP8 (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, offsets, cache, name):
        entry = cache.get(name, weight)
        ctx.cache, ctx.name = cache, name
        ctx.weight_needs_grad = weight.requires_grad
        ctx.save_for_backward(x if weight.requires_grad else None, weight, offsets)
        return _scaled_grouped_mm(quantize_rows_fast(x), entry.forward, offsets, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            entry = ctx.cache.get(ctx.name, weight)
            grad_x = _scaled_grouped_mm(quantize_rows_fast(grad_out), entry.backward, offsets, fast_accum=False)
        if ctx.weight_needs_grad and ctx.needs_input_grad[1]:
            grad_weight = torch._grouped_mm(grad_out.transpose(0, 1), x, offs=offsets)
        return grad_x, grad_weight, None, None, None


def fp8_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, cache: Fp8WeightCache, name: str
) -> torch.Tensor:
    """`grouped_linear` (see `dbrx_tune.modeling.experts`) with FP8 GEMMs; x bf16 (rows, in), weight (E, out, in)."""
    return _Fp8GroupedLinear.apply(x.contiguous(), weight, offsets, cache, name)
