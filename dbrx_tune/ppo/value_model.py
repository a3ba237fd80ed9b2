"""DBRX with a scalar value head on every token: PPO's critic.

The parameter names match `DbrxForSequenceClassification` (backbone under `transformer`, bias-free `score`
with one output), so `from_pretrained` on a reward-model checkpoint loads the backbone *and* the trained head,
which is the usual starting point for the value model. On a causal-LM checkpoint only the backbone loads and
`score` starts at zero, so the initial values do not inject noise into the first advantages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn
from peft import PeftModel
from transformers import DbrxConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.models.dbrx.modeling_dbrx import DbrxModel, DbrxPreTrainedModel, load_balancing_loss_func
from transformers.utils import ModelOutput

from dbrx_tune.modeling.loading import finish_model, load_model_config, load_pretrained, prepare_for_training
from dbrx_tune.recipe import ModelArguments

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


def load_value_model(model_args: ModelArguments, path: str) -> DbrxForTokenValue | PeftModel:
    """The value model from `path` (a reward model or a causal LM), with the recipe's dtype, experts and LoRA.

    With `use_peft` the value backbone gets the same LoRA as the policy and the head is trained in full; call
    the model through `value_backbone` (the PEFT wrapper's forward is that of a causal LM).
    """
    # Random weights only for the policy's own (random-init) checkpoint; a reward model is always loaded.
    value_args = dataclasses.replace(model_args, model_name_or_path=path,
                                     random_init=model_args.random_init and path == model_args.model_name_or_path)
    config = load_model_config(value_args)
    if value_args.random_init:
        model = load_pretrained(DbrxForTokenValue, value_args, config)
        info = {"missing_keys": ["score.weight"]}
    else:
        model, info = load_pretrained(DbrxForTokenValue, value_args, config, output_loading_info=True)
    if "score.weight" in info.get("missing_keys", []):
        logger.info("value model from %s: no trained score head there, starting the value head at zero", path)
        with _gathered(model.score.weight), torch.no_grad():
            model.score.weight.zero_()
    else:
        logger.info("value model from %s: backbone and score head loaded", path)
    model = prepare_for_training(finish_model(model, value_args), value_args)
    if isinstance(model, PeftModel):
        model.get_base_model().score.weight.requires_grad_(True)
    return model


def value_backbone(model: nn.Module) -> DbrxForTokenValue:
    """The `DbrxForTokenValue` to call, LoRA layers (if any) applied in place."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _gathered(parameter: nn.Parameter):
    """Under ZeRO-3, make a partitioned parameter whole for an in-place write on rank 0."""
    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters([parameter], modifier_rank=0)
    return contextlib.nullcontext()
