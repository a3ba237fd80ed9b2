"""DBRX with a scalar value head on every token: PPO's critic.

The parameter names match `DbrxForSequenceClassification` (backbone under `transformer`, bias-free `score`
with one output), so `from_pretrained` on a reward-model checkpoint loads the backbone *and* the trained head,
which is the usual starting point for the value model. On a causal-LM checkpoint only the backbone loads and
`score` starts at zero, so the initial values do not inject noise into the first advantages.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from peft import PeftModel
from torch import nn
from transformers import DbrxConfig
from transformers.models.dbrx.modeling_dbrx import DbrxModel, DbrxPreTrainedModel, load_balancing_loss_func
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenValueOutput(ModelOutput):
    """Args:
    token_values (`torch.FloatTensor` of shape `(batch_size, sequence_length)`): the value estimate at every
        position. (Not `values`: DeepSpeed walks outputs as dicts and calls `.values()`.)
    aux_loss (`torch.FloatTensor`, *optional*): unweighted router load-balancing loss (with `output_router_logits`).
    """

    token_values: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None


class DbrxForTokenValue(DbrxPreTrainedModel):
    """DBRX backbone and a linear head giving one scalar per token."""

    def __init__(self, config: DbrxConfig):
        super().__init__(config)
        self.transformer = DbrxModel(config)
        self.score = nn.Linear(config.d_model, 1, bias=False)
        self.num_experts = config.ffn_config.moe_num_experts
        self.num_experts_per_tok = config.ffn_config.moe_top_k
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_router_logits: bool = False,
        **kwargs,
    ) -> TokenValueOutput:
        """`input_ids` (batch, seq) -> `token_values` (batch, seq), computed in float32."""
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        values = self.score(outputs.last_hidden_state).squeeze(-1).float()
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask
            )
        return TokenValueOutput(token_values=values, aux_loss=aux_loss)


def value_backbone(model: nn.Module) -> DbrxForTokenValue:
    """The `DbrxForTokenValue` to call, LoRA layers (if any) applied in place."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
