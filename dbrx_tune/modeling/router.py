"""DBRX router input jitter, applied the way DBRX was trained: to the router's input only, out of place.

transformers' `DbrxRouter` multiplies its input by the jitter noise in place whenever `moe_jitter_eps` is not
None (0 included). That changes the hidden states the experts then see, and autograd refuses it on the hooked
inputs of ZeRO-3, stopping training. `DbrxJitterRouter` computes the same router logits from a jittered copy.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.dbrx.modeling_dbrx import DbrxRouter


class DbrxJitterRouter(DbrxRouter):
    """`DbrxRouter` whose training-time jitter leaves its input untouched (same parameters, same state dict)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.moe_jitter_eps:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.moe_jitter_eps, 1.0 + self.moe_jitter_eps)
            hidden_states = hidden_states * noise
        return self.layer(hidden_states.view(-1, hidden_states.shape[-1]))


def use_out_of_place_jitter(model: nn.Module) -> int:
    """Switch every `DbrxRouter` of `model` to `DbrxJitterRouter` in place; returns how many were switched.

    A class swap keeps parameters (also ZeRO-3 partitioned ones) and hooks; `DbrxJitterRouter` is still a
    `DbrxRouter`, so transformers keeps recording its logits for the load-balancing loss.
    """
    routers = [module for module in model.modules() if type(module) is DbrxRouter]
    for router in routers:
        router.__class__ = DbrxJitterRouter
    return len(routers)
