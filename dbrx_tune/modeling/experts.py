"""DBRX experts with 3D weights and a grouped-GEMM forward.

transformers stores DBRX's experts as three fused 2D parameters `ffn.experts.mlp.{w1,v1,w2}`, each of shape
(n_experts * ffn, d_model), and runs them in a Python loop over experts (about 31% MFU on an H200 for a DBRX-sized
layer). `DbrxGroupedExperts` holds the same numbers as 3D parameters in the layout the rest of the ecosystem expects
for experts, (n_experts, out_features, in_features):

    w1 (gate): (n_experts, ffn, d_model)    a view of the checkpoint's `mlp.w1`, no copy
    v1 (up):   (n_experts, ffn, d_model)    a view of the checkpoint's `mlp.v1`, no copy
    w2 (down): (n_experts, d_model, ffn)    the checkpoint's `mlp.w2` (used un-transposed there), transposed once

With this layout PEFT's `target_parameters` gives one LoRA per expert for all three projections with one
convention, and a DeepSpeed AutoEP preset maps gate=w1, up=v1, down=w2 without per-weight transposes. The forward
sorts token copies by expert and runs `torch._grouped_mm` (CUDA, compute capability 9.0+, bf16); elsewhere a
per-expert loop over the same sorted tokens gives the same numbers, and one warning says so. The router weight of each
token copy is applied inside the SwiGLU (the down projection is linear, so weighting its input equals weighting its
output), and on CUDA the SwiGLU and its backward are one fused Triton kernel each (`dbrx_tune.modeling.swiglu`).

Checkpoints keep DBRX's original names and shapes: a state-dict hook writes `mlp.w1/v1/w2` as (n_experts * ffn,
d_model) and a load hook accepts them, so `save_pretrained` output loads into a stock `DbrxForCausalLM` and back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.dbrx.modeling_dbrx import DbrxExperts, DbrxFFN

from dbrx_tune.modeling.fp8 import PRECISIONS, Fp8WeightCache, fp8_grouped_linear, fp8_unsupported_reason
from dbrx_tune.modeling.swiglu import swiglu

logger = logging.getLogger(__name__)

EXPERT_PROJECTIONS = ("w1", "v1", "w2")
IMPLEMENTATIONS = ("grouped", "eager")

_fallback_warned = False
_fp8_fallback_warned = False


class LowRankDelta(NamedTuple):
    """A per-expert low-rank update of one projection: delta W[e] = scaling * up[e] @ down[e].

    down: (n_experts, r, in_features); up: (n_experts, out_features, r). LoRA passes these to the experts so the
    update is applied to the routed tokens through the same grouped GEMMs, never as a dense (n_experts, out, in) delta.
    """

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs natively here: CUDA Hopper or newer, bf16."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _warn_fallback_once(device: torch.device, dtype: torch.dtype) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "experts_implementation='grouped' needs torch._grouped_mm (CUDA compute capability >= 9.0, bf16); "
            "got device=%s dtype=%s, so the experts run a per-expert loop over the same sorted tokens (same results, "
            "slower).",
            device,
            dtype,
        )


def _fp8_runs_here(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FP8 expert GEMMs run here; where they cannot, one warning names the reason (bf16 GEMMs are used)."""
    global _fp8_fallback_warned
    reason = fp8_unsupported_reason(device, dtype)
    if reason is not None and not _fp8_fallback_warned:
        _fp8_fallback_warned = True
        logger.warning("experts_precision='fp8' falls back to unquantized expert GEMMs: %s.", reason)
    return reason is None


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: Sequence[int] | None
) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ weight[e].T for token rows sorted by expert.

    x: (n_rows, in); weight: (n_experts, out, in); offsets: (n_experts,) int32 cumulative row counts. `counts`
    (host ints) selects the per-expert loop; None selects `torch._grouped_mm`.
    """
    if counts is None:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    chunks = [rows @ w.T for rows, w in zip(x.split(list(counts)), weight.unbind(0))]
    return torch.cat(chunks) if chunks else x.new_empty(0, weight.shape[1])


def low_rank_terms(
    x: torch.Tensor, deltas: Sequence[LowRankDelta], offsets: torch.Tensor, counts: Sequence[int] | None
) -> list[torch.Tensor]:
    """scaling * (x @ down[e].T) @ up[e].T on the routed rows, for several low-rank deltas that share the input x.

    All down projections run as one grouped GEMM (the gate and up LoRAs, w1 and v1, both read the routed tokens: x is
    read once, and in backward one input-gradient GEMM replaces two plus an add). The scaling is folded into the
    small up factor rather than applied to the (rows, out) result, which would cost a pass over it each way.
    """
    if not deltas:
        return []
    ranks = [delta.down.shape[1] for delta in deltas]
    down = torch.cat([delta.down for delta in deltas], dim=1).to(x.dtype)  # (n_experts, sum of ranks, in): small
    if counts is None and any(rank % 8 for rank in ranks):
        # grouped_mm needs 16-byte aligned inner dims; small odd ranks take the loop (cheap at rank r).
        counts = offsets.diff(prepend=offsets.new_zeros(1)).tolist()
    hidden = grouped_linear(x, down, offsets, counts)
    return [
        grouped_linear(part, (delta.up * delta.scaling).to(x.dtype), offsets, counts)
        for part, delta in zip(hidden.split(ranks, dim=1), deltas)
    ]


class DbrxGroupedExperts(nn.Module):
    """DBRX's experts as 3D weights (n_experts, out, in) run by grouped GEMM; a drop-in for `DbrxExperts`.

    Same call as `DbrxExperts`: `forward(hidden_states, top_k_index, top_k_weights)` with hidden_states of shape
    (batch, seq, d_model) or (tokens, d_model), top_k_index/top_k_weights (tokens, top_k); returns
    (batch, tokens // batch, d_model) like the stock module. The router (`ffn.router`) is untouched, so
    `output_router_logits` and the aux loss work unchanged.
    """

    token_chunk: int | None = None  # tokens through the experts at a time (`set_moe_token_chunk`); None: all

    def __init__(self, ffn_config, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts = ffn_config.moe_num_experts
        self.hidden_size = ffn_config.hidden_size
        self.ffn_hidden_size = ffn_config.ffn_hidden_size
        self.activation_fn = ACT2FN[ffn_config.ffn_act_fn.get("name", "silu")]
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(self.num_experts, self.ffn_hidden_size, self.hidden_size, **factory))
        self.v1 = nn.Parameter(torch.empty(self.num_experts, self.ffn_hidden_size, self.hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, self.ffn_hidden_size, **factory))
        self.precision = "bf16"
        self.fp8_cache = Fp8WeightCache()
        self.register_state_dict_post_hook(_write_original_layout)
        self.register_load_state_dict_pre_hook(_read_original_layout)

    @classmethod
    def from_stock(cls, experts: DbrxExperts, ffn_config) -> DbrxGroupedExperts:
        """Build from a stock `DbrxExperts`; w1/v1 become views of its storage, w2 one transposed copy."""
        mlp = experts.mlp
        module = cls(ffn_config, device="meta", dtype=mlp.w1.dtype)
        with torch.no_grad():
            for name in EXPERT_PROJECTIONS:
                stock = getattr(mlp, name)
                weight = to_grouped_layout(name, stock.data, module.num_experts)
                setattr(module, name, nn.Parameter(weight, requires_grad=stock.requires_grad))
        return module

    def to_stock(self, ffn_config) -> DbrxExperts:
        """The inverse of `from_stock` (used by `set_experts_implementation(model, "eager")`)."""
        with torch.device("meta"):
            experts = DbrxExperts(ffn_config)
        with torch.no_grad():
            for name in EXPERT_PROJECTIONS:
                grouped = getattr(self, name)
                weight = to_original_layout(name, grouped.data)
                setattr(experts.mlp, name, nn.Parameter(weight, requires_grad=grouped.requires_grad))
        return experts

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora_deltas: Mapping[str, Sequence[LowRankDelta]] | None = None,
    ) -> torch.Tensor:
        """Route token copies to experts, run the SwiGLU experts by grouped GEMM, combine by router weight.

        lora_deltas: per projection name ("w1", "v1", "w2"), low-rank updates applied on the routed tokens (set by
        `dbrx_tune.modeling.lora`); None for the plain experts.
        """
        projection = self.group_projection(0, self.num_experts, hidden_states.dtype)
        return run_experts(self, hidden_states, top_k_index, top_k_weights, projection, lora_deltas)

    def expert_groups(self) -> tuple[tuple[int, int], ...]:
        """Expert ranges the token-chunked path (`set_moe_token_chunk`) runs one after another: all at once here,
        the weights are already in the compute dtype."""
        return ((0, self.num_experts),)

    def group_projection(self, start: int, end: int, dtype: torch.dtype):
        """`base_projection(name, rows, offsets, counts)` for the rows routed to experts [start, end); FP8 GEMMs
        (their weight cache is per whole projection) where `precision` asks and the range is every expert."""
        whole = (start, end) == (0, self.num_experts)
        with torch.enable_grad():  # slices keep their gradient path even when built inside a backward pass
            weights = {
                name: getattr(self, name) if whole else getattr(self, name)[start:end] for name in EXPERT_PROJECTIONS
            }
        use_fp8 = whole and self.precision == "fp8" and _fp8_runs_here(self.w1.device, self.w1.dtype)

        def base_projection(name: str, inputs: torch.Tensor, offsets: torch.Tensor, counts) -> torch.Tensor:
            if use_fp8 and counts is None:
                return fp8_grouped_linear(inputs, weights[name], offsets, self.fp8_cache, name)
            return grouped_linear(inputs, weights[name], offsets, counts)

        return base_projection


def run_experts(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    base_projection,
    lora_deltas: Mapping[str, Sequence[LowRankDelta]] | None = None,
) -> torch.Tensor:
    """The SwiGLU experts over tokens sorted by expert; `base_projection(name, rows, offsets, counts)` supplies
    the frozen or trainable weights (bf16 3D or dequantized 4-bit) of the whole-batch path, LoRA deltas are added on
    the same rows.

    With `module.token_chunk` set (`set_moe_token_chunk`) and more tokens than that, the experts run by
    `_TokenChunkedExperts` instead: a block of at most token_chunk x top_k routed rows at a time, within one expert
    group at a time (`module.expert_groups()`, whose weights `module.group_projection` prepares once per pass), and
    backward keeps only the layer's inputs and recomputes one block at a time. Every token's routing and arithmetic
    are the same, so the numbers are too.
    """
    batch_size = hidden_states.shape[0]
    x = hidden_states.reshape(-1, module.hidden_size)
    top_k_index = top_k_index.reshape(x.shape[0], top_k_index.shape[-1])  # explicit top_k: a batch may be empty
    top_k_weights = top_k_weights.reshape(x.shape[0], top_k_weights.shape[-1])
    chunk = getattr(module, "token_chunk", None)
    if chunk and x.shape[0] > chunk:
        trained = [param for param in module.parameters() if param.requires_grad]
        for deltas in (lora_deltas or {}).values():
            trained += [tensor for delta in deltas for tensor in (delta.down, delta.up) if tensor.requires_grad]
        combined = _TokenChunkedExperts.apply(module, lora_deltas or {}, chunk, x, top_k_index, top_k_weights, *trained)
    else:
        routed = route_tokens(top_k_index, module.num_experts)
        use_grouped = _use_grouped_mm(x)
        counts = None if use_grouped else routed.counts.tolist()
        sorted_x = gather_sorted_rows(x, routed, top_k_weights.shape[-1])
        row_weights = _PermuteRows.apply(top_k_weights.reshape(-1), routed.order, routed.row_of_slot)
        sorted_out = swiglu_experts(
            module, sorted_x, row_weights, routed.offsets, counts, base_projection, lora_deltas or {}
        )
        combined = combine_expert_outputs(sorted_out, routed, top_k_weights.shape[-1])
    return combined.view(batch_size, -1, module.hidden_size)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    use_grouped = grouped_mm_supported(x.device, x.dtype)
    if not use_grouped:
        _warn_fallback_once(x.device, x.dtype)
    return use_grouped


def swiglu_experts(
    module: nn.Module,
    sorted_x: torch.Tensor,
    row_weights: torch.Tensor,
    offsets: torch.Tensor,
    counts: Sequence[int] | None,
    base_projection,
    lora_deltas: Mapping[str, Sequence[LowRankDelta]],
) -> torch.Tensor:
    """w2(silu(w1 x) * v1 x * router weight) on rows sorted by expert (offsets/counts over the experts that
    `base_projection` and the LoRA deltas cover); (rows, d_model)."""

    def project(names: Sequence[str], inputs: torch.Tensor) -> list[torch.Tensor]:
        """Projections `names` of the same inputs, each plus its LoRA terms (all LoRA down projections at once)."""
        deltas = [(name, delta) for name in names for delta in lora_deltas.get(name, ())]
        terms = low_rank_terms(inputs, [delta for _, delta in deltas], offsets, counts)
        outputs = []
        for name in names:
            out = base_projection(name, inputs, offsets, counts)
            for (owner, _), term in zip(deltas, terms):
                if owner == name:
                    out = out + term
            outputs.append(out)
        return outputs

    gate, up = project(("w1", "v1"), sorted_x)
    (sorted_out,) = project(("w2",), swiglu(gate, up, module.activation_fn, row_weights))
    return sorted_out


class _RowBlock(NamedTuple):
    """Sorted rows [start, stop) of one expert group: `offsets` (device int32) or `counts` (host, the per-expert
    loop) split them by expert for the GEMMs; `segments` are the per-expert row ranges, within which every token
    appears at most once."""

    start: int
    stop: int
    offsets: torch.Tensor
    counts: list[int] | None
    segments: list[tuple[int, int]]


def _row_blocks(
    row_starts: Sequence[int], offsets: torch.Tensor, start: int, end: int, max_rows: int, host_counts: bool
) -> list[_RowBlock]:
    """The sorted rows routed to experts [start, end) in blocks of at most `max_rows`.

    row_starts: (n_experts + 1) host ints, where each expert's rows begin; offsets: their device int32 cumulative
    sums (as `route_tokens` gives), clamped per block so no block needs a host-to-device copy.
    """
    blocks = []
    for first in range(row_starts[start], row_starts[end], max_rows):
        last = min(first + max_rows, row_starts[end])
        bounds = [(max(row_starts[e], first), min(row_starts[e + 1], last)) for e in range(start, end)]
        counts = [max(stop - begin, 0) for begin, stop in bounds]
        block_offsets = (offsets[start:end] - first).clamp_(0, last - first)
        segments = [(begin, stop) for begin, stop in bounds if stop > begin]
        blocks.append(_RowBlock(first, last, block_offsets, counts if host_counts else None, segments))
    return blocks


def _group_deltas(
    lora_deltas: Mapping[str, Sequence[LowRankDelta]], start: int, end: int, num_experts: int
) -> dict[str, list[LowRankDelta]]:
    """The LoRA factors of experts [start, end): views recorded by autograd even inside a backward pass (grad mode
    is off there), so the per-block backward reaches the full factors and the LoRA weights."""
    if (start, end) == (0, num_experts):
        return {name: list(deltas) for name, deltas in lora_deltas.items()}
    with torch.enable_grad():
        return {
            name: [LowRankDelta(delta.down[start:end], delta.up[start:end], delta.scaling) for delta in deltas]
            for name, deltas in lora_deltas.items()
        }


class _TokenChunkedExperts(torch.autograd.Function):
    """The experts in blocks of routed rows: forward without a graph, backward recomputes and differentiates one
    block at a time, so at most one block's routed intermediate (token_chunk x top_k x ffn) is alive.

    The blocks run one expert group after another (`module.expert_groups()`): each group's weights are prepared once
    per pass (`module.group_projection`: for 4-bit experts, one dequantization of the group) and serve all its
    blocks, forward or recompute and input gradient alike, instead of once per token chunk and GEMM. Outputs and
    input gradients are summed per token in fp32, one expert at a time: within an expert every token appears once,
    so the sums need no atomics and are deterministic.

    When the decoder layer around it is recomputed by activation checkpointing (non-reentrant or reentrant: a forward
    run inside a backward pass), the experts' output is not computed again: that recompute only rebuilds the tensors
    saved for backward, and in DBRX's block nothing after the experts saves their output (only the residual add and
    dropout follow, and their backward reads no values). The inputs saved here are all this backward needs, so
    without the skip every block would run three times per step instead of twice. The weights and LoRA factors the
    blocks use (`trained`) are inputs only so that autograd calls this backward when they alone need gradients; their
    gradients reach them through the per-block backward, as in reentrant checkpointing.
    """

    @staticmethod
    def forward(ctx, module, lora_deltas, chunk, x, top_k_index, top_k_weights, *trained):
        ctx.save_for_backward(x, top_k_index, top_k_weights)
        ctx.module, ctx.lora_deltas, ctx.chunk = module, lora_deltas, chunk
        if torch._C._current_graph_task_id() != -1:  # a checkpoint's recompute: the output is never read
            return x.new_zeros(x.shape)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        flat_weights = top_k_weights.reshape(-1)

        def run_block(routed: RoutedTokens, block: _RowBlock, projection, deltas) -> None:
            rows = slice(block.start, block.stop)
            sorted_x = x.index_select(0, routed.token_index[rows])
            row_weights = flat_weights.index_select(0, routed.order[rows])
            sorted_out = swiglu_experts(module, sorted_x, row_weights, block.offsets, block.counts, projection, deltas)
            _add_per_token(out, routed.token_index, sorted_out, block)

        _for_each_block(module, lora_deltas, chunk, x, top_k_index, run_block)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, top_k_index, top_k_weights = ctx.saved_tensors
        module = ctx.module
        wants_x, wants_weights = ctx.needs_input_grad[3], ctx.needs_input_grad[5]
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if wants_x else None
        flat_weights = top_k_weights.reshape(-1)
        grad_weights = torch.zeros_like(flat_weights) if wants_weights else None

        def run_block(routed: RoutedTokens, block: _RowBlock, projection, deltas) -> None:
            rows = slice(block.start, block.stop)
            tokens, slots = routed.token_index[rows], routed.order[rows]
            sorted_x = x.index_select(0, tokens).requires_grad_(wants_x)
            row_weights = flat_weights.index_select(0, slots).requires_grad_(wants_weights)
            with torch.enable_grad():
                sorted_out = swiglu_experts(
                    module, sorted_x, row_weights, block.offsets, block.counts, projection, deltas
                )
            if not sorted_out.requires_grad:
                return
            torch.autograd.backward(sorted_out, grad_out.index_select(0, tokens))
            if wants_x:
                _add_per_token(grad_x, routed.token_index, sorted_x.grad, block)
            if wants_weights:
                grad_weights.index_copy_(0, slots, row_weights.grad)  # each (token, slot) once

        _for_each_block(module, ctx.lora_deltas, ctx.chunk, x, top_k_index, run_block)
        grad_x = grad_x.to(x.dtype) if wants_x else None
        grad_weights = grad_weights.view_as(top_k_weights) if wants_weights else None
        return None, None, None, grad_x, None, grad_weights, *(None for _ in ctx.needs_input_grad[6:])


def _for_each_block(module: nn.Module, lora_deltas, chunk: int, x: torch.Tensor, top_k_index: torch.Tensor, run_block):
    """`run_block(routing, row block, projection, LoRA deltas)` for every block, one expert group after another.

    A group's weights (`module.group_projection`) are built before its first block and dropped after its last,
    before the next group's are built, so one group's weights are alive at a time.
    """
    routed = route_tokens(top_k_index, module.num_experts)
    row_starts = [0, *routed.offsets.tolist()]  # one host sync per pass: the block bounds
    host_counts = not _use_grouped_mm(x)
    for start, end in module.expert_groups():
        blocks = _row_blocks(row_starts, routed.offsets, start, end, chunk * top_k_index.shape[-1], host_counts)
        if not blocks:
            continue
        projection = module.group_projection(start, end, x.dtype)
        deltas = _group_deltas(lora_deltas, start, end, module.num_experts)
        for block in blocks:
            run_block(routed, block, projection, deltas)
        del projection, deltas


def _add_per_token(total: torch.Tensor, token_index: torch.Tensor, sorted_rows: torch.Tensor, block: _RowBlock):
    """total[token] += row for the block's rows, one expert's segment at a time (its tokens are distinct)."""
    for begin, stop in block.segments:
        rows = sorted_rows[begin - block.start : stop - block.start]
        total.index_add_(0, token_index[begin:stop], rows.to(total.dtype))


def set_moe_token_chunk(model: nn.Module, tokens: int | None) -> nn.Module:
    """Run every DBRX experts module of `model` over at most `tokens` tokens at a time (None: the whole batch).

    The experts modules that run `run_experts` (`DbrxGroupedExperts`, `DbrxNF4Experts`) declare `token_chunk`;
    transformers' stock `DbrxExperts` loop has no chunked form, so the eager implementation is refused.
    """
    if tokens is not None and tokens < 1:
        raise ValueError(f"moe_token_chunk must be a positive number of tokens or null, got {tokens}")
    chunked = [module for module in model.modules() if hasattr(type(module), "token_chunk")]
    if tokens is not None and any(isinstance(module, DbrxExperts) for module in model.modules()):
        raise ValueError("moe_token_chunk needs experts_implementation: grouped (or 4-bit experts), not eager")
    for module in chunked:
        module.token_chunk = tokens
    return model


class RoutedTokens(NamedTuple):
    """Token copies sorted by expert: `token_index[i]` is the token of sorted row i; `order` maps sorted rows to flat
    (token, slot) positions and `row_of_slot` is its inverse; `counts`/`offsets` are rows per expert and their int32
    cumulative sum. Both permutations are kept so every reordering, forward and backward, is a gather."""

    token_index: torch.Tensor
    order: torch.Tensor
    row_of_slot: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def route_tokens(top_k_index: torch.Tensor, num_experts: int) -> RoutedTokens:
    """Sort the (tokens * top_k) token copies by expert, once per layer call."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_of_slot = torch.empty_like(order)
    row_of_slot[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return RoutedTokens(order // top_k_index.shape[-1], order, row_of_slot, counts, offsets)


class _GatherSortedRows(torch.autograd.Function):
    """x[token_index] (each token once per routed slot). Backward gathers the gradient rows back into (token, slot)
    order and sums each token's copies: autograd's own backward of a gather with repeats is an
    `index_put_(accumulate=True)` scatter, slower and non-deterministic (atomic bf16 adds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_index: torch.Tensor, row_of_slot: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(row_of_slot)
        ctx.top_k = top_k
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad_sorted: torch.Tensor):
        (row_of_slot,) = ctx.saved_tensors
        per_slot = grad_sorted.index_select(0, row_of_slot)
        return per_slot.view(-1, ctx.top_k, per_slot.shape[-1]).sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """rows[index] for a permutation `index`; backward gathers with the inverse permutation (no scatter)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gather_sorted_rows(x: torch.Tensor, routed: RoutedTokens, top_k: int) -> torch.Tensor:
    """The routed token copies of x (tokens, d), sorted by expert: (tokens * top_k, d)."""
    return _GatherSortedRows.apply(x, routed.token_index, routed.row_of_slot, top_k)


def combine_expert_outputs(sorted_out: torch.Tensor, routed: RoutedTokens, top_k: int) -> torch.Tensor:
    """Un-sort router-weighted expert outputs to (token, slot) order and sum each token's top_k: (tokens, d).

    The router weights were already applied to the down projection's input by `swiglu`, on the wider (rows, ffn)
    tensor but inside a pass that happens anyway, so this is one gather and one sum (no multiply pass either way).
    """
    per_slot = _PermuteRows.apply(sorted_out, routed.row_of_slot, routed.order)
    return per_slot.view(-1, top_k, sorted_out.shape[-1]).sum(dim=1)


def to_grouped_layout(name: str, fused: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Checkpoint layout (n_experts * ffn, d_model) -> (n_experts, out, in). w1/v1: a view; w2: a transposed copy."""
    split = fused.view(num_experts, -1, fused.shape[-1])
    return split.transpose(1, 2).contiguous() if name == "w2" else split


def to_original_layout(name: str, grouped: torch.Tensor) -> torch.Tensor:
    """(n_experts, out, in) -> checkpoint layout (n_experts * ffn, d_model). w1/v1: a view; w2: a transposed copy."""
    if name == "w2":
        grouped = grouped.transpose(1, 2).contiguous()
    return grouped.reshape(-1, grouped.shape[-1])


def _write_original_layout(module: DbrxGroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in EXPERT_PROJECTIONS:
        tensor = state_dict.pop(prefix + name, None)
        if tensor is None:
            continue
        if tensor.numel() == 0:  # a ZeRO-3 partition placeholder (DeepSpeed's own checkpoints): rename only
            state_dict[f"{prefix}mlp.{name}"] = tensor
            continue
        with torch.no_grad():
            state_dict[f"{prefix}mlp.{name}"] = to_original_layout(name, tensor)


def _read_original_layout(module: DbrxGroupedExperts, state_dict: dict, prefix: str, *args) -> None:
    for name in EXPERT_PROJECTIONS:
        key = f"{prefix}mlp.{name}"
        if key not in state_dict:
            continue
        tensor = state_dict.pop(key)
        if tensor.numel() == 0:  # a ZeRO-3 partition placeholder; DeepSpeed restores the partitions itself
            state_dict[prefix + name] = tensor
            continue
        expected = (module.num_experts * module.ffn_hidden_size, module.hidden_size)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{key}: checkpoint tensor has shape {tuple(tensor.shape)}, expected {expected} "
                f"(n_experts={module.num_experts} * ffn={module.ffn_hidden_size}, d_model={module.hidden_size}); "
                "the checkpoint was saved from a model with another shape"
            )
        state_dict[prefix + name] = to_grouped_layout(name, tensor, module.num_experts)


def set_experts_implementation(model: nn.Module, implementation: str = "grouped") -> nn.Module:
    """Swap the experts of every DBRX FFN in `model` (in place, returned for chaining).

    "grouped": `DbrxGroupedExperts` (3D weights, grouped GEMM); "eager": transformers' stock `DbrxExperts`.
    Values, device, dtype and requires_grad are kept; w1/v1 are views of the same storage. Works on any model
    holding `DbrxFFN` modules (`DbrxForCausalLM`, `DbrxModel`, sequence-classification heads built on them).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    ffns = [module for module in model.modules() if isinstance(module, DbrxFFN)]
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no DbrxFFN modules; set_experts_implementation expects DBRX")
    ffn_config = _ffn_config(model)
    swapped = 0
    for ffn in ffns:
        experts = ffn.experts
        if implementation == "grouped" and type(experts) is DbrxExperts:
            ffn.experts = DbrxGroupedExperts.from_stock(experts, ffn_config)
            swapped += 1
        elif implementation == "eager" and isinstance(experts, DbrxGroupedExperts):
            ffn.experts = experts.to_stock(ffn_config)
            swapped += 1
        elif not isinstance(experts, (DbrxExperts, DbrxGroupedExperts)):
            raise TypeError(
                f"{type(experts).__name__} found at ffn.experts: set_experts_implementation must run before PEFT "
                "wrapping or 4-bit quantization of the experts"
            )
    logger.info("experts_implementation=%s: swapped %d of %d DBRX expert modules", implementation, swapped, len(ffns))
    return model


def set_experts_precision(model: nn.Module, precision: str = "bf16") -> nn.Module:
    """Run the expert GEMMs of every `DbrxGroupedExperts` in `model` in `precision` ("bf16" or "fp8"; in place).

    Only the GEMMs change: weights, gradients and checkpoints stay in the model's dtype and DBRX's layout. Where FP8
    cannot run (CPU, pre-Hopper GPUs) the experts use bf16 and one warning says why (see `dbrx_tune.modeling.fp8`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"experts_precision={precision!r}: expected one of {PRECISIONS}")
    experts = [module for module in model.modules() if isinstance(module, DbrxGroupedExperts)]
    if precision != "bf16" and not experts:
        raise ValueError(
            f"experts_precision={precision!r} needs DBRX's grouped experts (experts_implementation: grouped, "
            "not 4-bit): none found"
        )
    for module in experts:
        module.precision = precision
        module.fp8_cache.clear()
    return model


def _ffn_config(model: nn.Module):
    config = getattr(model, "config", None)
    ffn_config = getattr(config, "ffn_config", None)
    if ffn_config is None:
        raise ValueError(f"{type(model).__name__}.config has no ffn_config; expected a DbrxConfig-based model")
    return ffn_config
