"""DBRX with a sequence-classification (reward) head.

transformers ships no `DbrxForSequenceClassification`. This module provides one in the style of the library's
modeling files: the `DbrxModel` backbone under `transformer` (so the `transformer.*` weights of a causal-LM DBRX
checkpoint load into it unchanged, and only `score` is newly initialised), a bias-free linear `score` head read
at the last real token of every sequence, the usual regression/classification losses, and DBRX's router
load-balancing loss.

The file imports only torch and transformers on purpose: `save_pretrained` copies it beside the weights as
`modeling_dbrx_reward.py` and records it in the config's `auto_map`, so a process that has never imported
`dbrx_tune` (RewardBench's runner, for instance) loads the checkpoint with an explicit
`AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`. With `dbrx_tune` imported, the
class is registered for `AutoModelForSequenceClassification` and no remote code is involved.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, DbrxConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.models.dbrx.modeling_dbrx import DbrxModel, DbrxPreTrainedModel, load_balancing_loss_func
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

logger = logging.get_logger(__name__)

# Name of this file once saved beside a checkpoint; `auto_map` points at it.
REMOTE_CODE_FILENAME = "modeling_dbrx_reward.py"
AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_dbrx_reward.DbrxForSequenceClassification"}


@dataclass
class MoeSequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    """`SequenceClassifierOutputWithPast` plus the MoE router outputs.

    Args:
        aux_loss (`torch.FloatTensor`, *optional*, returned when `output_router_logits=True`):
            Load-balancing loss of the routers (unweighted; `loss` already includes it times
            `config.ffn_config.moe_loss_weight` when labels were given).
        router_logits (`tuple(torch.FloatTensor)`, *optional*, returned when `output_router_logits=True`):
            One tensor per layer of shape `(batch_size * sequence_length, moe_num_experts)`.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


def last_token_indices(
    input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None
) -> torch.LongTensor | int:
    """Index of the last real token of every row, whatever side the batch was padded on.

    The attention mask is preferred over the pad id because users often set pad = eos, and then a legitimate
    trailing eos would be mistaken for padding. Without a mask, the rightmost token that is not `pad_token_id` is
    used; with neither, the last position (valid only for unpadded input).
    Returns a `(batch_size,)` tensor, or `-1` for "last position".
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.to(torch.int64)
    elif input_ids is not None and pad_token_id is not None:
        mask = (input_ids != pad_token_id).to(torch.int64)
    else:
        return -1
    positions = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int64)
    return (positions * mask).argmax(-1)


class DbrxForSequenceClassification(DbrxPreTrainedModel):
    """DBRX backbone with a linear head on the last non-padding token; with `num_labels=1` a reward model."""

    def __init__(self, config: DbrxConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = DbrxModel(config)
        self.score = nn.Linear(config.d_model, self.num_labels, bias=False)
        self.router_aux_loss_coef = config.ffn_config.moe_loss_weight
        self.num_experts = config.ffn_config.moe_num_experts
        self.num_experts_per_tok = config.ffn_config.moe_top_k
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeSequenceClassifierOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids, padded on either side.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`): 1 for real tokens; it decides
            which position is scored.
        labels (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, num_labels)`, *optional*): regression
            targets when `num_labels == 1`, class ids or multi-hot labels otherwise (as in transformers'
            other sequence-classification heads).
        output_router_logits (`bool`, *optional*): return the router logits and the load-balancing `aux_loss`;
            defaults to `config.output_router_logits`.

        Returns `logits` of shape `(batch_size, num_labels)`: the head applied at the last real token.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (batch, seq, d_model)
        batch_size = hidden_states.shape[0]

        if attention_mask is None and input_ids is None and batch_size > 1:
            logger.warning_once(
                f"{self.__class__.__name__} got `inputs_embeds` without an attention mask; scoring the last position "
                "of every row, which is wrong for any padded row."
            )
        if attention_mask is None and input_ids is not None and self.config.pad_token_id is None and batch_size > 1:
            raise ValueError(
                "Cannot find the last token of a padded batch: pass `attention_mask` or set `config.pad_token_id`."
            )
        last_token = last_token_indices(input_ids, attention_mask, self.config.pad_token_id)
        if isinstance(last_token, torch.Tensor):
            last_token = last_token.to(hidden_states.device)
        pooled_hidden = hidden_states[torch.arange(batch_size, device=hidden_states.device), last_token]
        pooled_logits = self.score(pooled_hidden)  # (batch, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=pooled_logits, labels=labels, pooled_logits=pooled_logits, config=self.config
            )

        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeSequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save as usual, plus the `auto_map` and this modeling file, so the checkpoint loads without `dbrx_tune`."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, REMOTE_CODE_FILENAME))


def register_dbrx_seq_cls() -> None:
    """Let `AutoModelForSequenceClassification` build DBRX reward models (idempotent).

    `exist_ok=True` is required: `DbrxConfig` is a built-in config class, and without it the registration is
    refused for it.
    """
    AutoModelForSequenceClassification.register(DbrxConfig, DbrxForSequenceClassification, exist_ok=True)


def save_reward_model(model: DbrxForSequenceClassification, tokenizer, output_dir: str | os.PathLike) -> None:
    """Write a reward model as a plain Hugging Face checkpoint RewardBench can load.

    Safetensors weights, a config whose `auto_map` names `modeling_dbrx_reward.DbrxForSequenceClassification`,
    that self-contained modeling file, and the tokenizer (with its chat template) when one is given.
    """
    if not isinstance(model, DbrxForSequenceClassification):
        raise TypeError(
            f"save_reward_model expects a DbrxForSequenceClassification, got {type(model).__name__}; "
            "merge PEFT adapters first (`model.merge_and_unload()`)"
        )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


register_dbrx_seq_cls()

__all__ = [
    "DbrxForSequenceClassification",
    "MoeSequenceClassifierOutputWithPast",
    "register_dbrx_seq_cls",
    "save_reward_model",
]
