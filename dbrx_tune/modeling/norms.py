"""DBRX's LayerNorms in the dtype of their input under autocast, as under DeepSpeed's bf16 (no autocast).

CUDA autocast runs `layer_norm` in fp32: a bf16 input is copied to fp32, and that copy is what autograd saves for
backward (tokens x d_model x 4 bytes: 0.8 GB per norm at 32k tokens), while DBRX casts the fp32 output straight back
to bf16 (`norm_1(hidden_states).to(hidden_states.dtype)`). torch's bf16 layer norm already accumulates its mean and
variance in fp32, so the norm gives the same bf16 output without the copy. Where weights and input differ in dtype
(an fp32 model under bf16 autocast) autocast still decides, so nothing mixes dtypes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.dbrx.modeling_dbrx import DbrxBlock


class LayerNormInInputDtype(nn.LayerNorm):
    """`nn.LayerNorm` that runs outside autocast when its weight already has the input's dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype != input.dtype:
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input)


def keep_norms_in_input_dtype(model: nn.Module) -> int:
    """Switch the LayerNorms of every DBRX block to `LayerNormInInputDtype` in place (same parameters and state
    dict); returns how many were switched."""
    norms = [
        module
        for block in model.modules()
        if isinstance(block, DbrxBlock)
        for module in block.modules()
        if type(module) is nn.LayerNorm
    ]
    for norm in norms:
        norm.__class__ = LayerNormInInputDtype
    return len(norms)
