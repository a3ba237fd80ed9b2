"""DBRX blocks checkpointed as two halves, one after the other, for activation offload at long context.

A checkpointed `DbrxBlock` is recomputed whole in backward, so while its experts run their backward the attention
half's recomputed activations (norm and Wqkv outputs, the clamp, rotary q, SDPA's saved q/k/v/out, the LoRA inputs:
about 3.6 GB at 32k tokens) are alive too, though nothing reads them until the experts are done. Checkpointing the
attention half (`norm_attn_norm`) and the MoE half (`ffn`) as two sequential checkpoints, not nested ones, lets
autograd recompute and differentiate the MoE half first and only then recompute the attention half: the backward
peak is the larger half's instead of their sum.

The price is a second checkpointed input per block, the MoE half's input (tokens x d_model). With activation offload
it waits in pinned host memory like the block input, so `activation_offload: true` is what turns this on
(`dbrx_tune.build.finish_model`); without offload it would stay on the GPU for every layer, more than it saves.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.models.dbrx.modeling_dbrx import DbrxBlock

from dbrx_tune.modeling.router import use_out_of_place_jitter

# transformers wraps every checkpointable layer's forward in a whole-layer checkpoint (`GradientCheckpointingLayer`);
# `__wrapped__` is the block's own forward, which this module runs as it is when nothing is checkpointed.
_stock_block_forward = DbrxBlock.forward.__wrapped__


class DbrxBlockCheckpointedByHalves(DbrxBlock):
    """`DbrxBlock` whose activation checkpointing (switched on and configured by transformers as for any layer:
    `gradient_checkpointing`, `_gradient_checkpointing_func`, offload included) covers each half on its own."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return _stock_block_forward(
                self, hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                cache=cache, **kwargs,
            )  # fmt: skip
        checkpoint = self._gradient_checkpointing_func
        # The halves' tensors go positionally: the checkpoint saves those (to the host, with offload); keyword
        # arguments would be held by reference on the GPU. No cache under checkpointing, as transformers does.
        attention_half = partial(
            self.norm_attn_norm, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )
        resid_states, hidden_states = checkpoint(attention_half, hidden_states)
        hidden_states = checkpoint(self.ffn, hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=self.resid_pdrop, training=self.training)
        return resid_states + hidden_states


# Class creation wrapped this forward in a whole-block checkpoint too (`GradientCheckpointingLayer.__init_subclass__`);
# undo that, or the block would be checkpointed around its checkpointed halves (nested: no memory saved).
DbrxBlockCheckpointedByHalves.forward = DbrxBlockCheckpointedByHalves.forward.__wrapped__


def checkpoint_blocks_by_halves(model: nn.Module) -> int:
    """Switch every `DbrxBlock` of `model` to `DbrxBlockCheckpointedByHalves` in place (same parameters, state dict
    and hooks); returns how many were switched.

    The routers switch to the out-of-place jitter too: transformers' router scales its input in place, which is now
    the MoE half's checkpointed input, and autograd refuses a saved input modified in place."""
    use_out_of_place_jitter(model)
    blocks = [module for module in model.modules() if type(module) is DbrxBlock]
    for block in blocks:
        block.__class__ = DbrxBlockCheckpointedByHalves
    return len(blocks)
