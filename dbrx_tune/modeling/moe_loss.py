"""The router load-balancing loss for DBRX under TRL.

DBRX's own forward adds `ffn_config.moe_loss_weight * aux_loss` when asked for router logits, but TRL 1.16's
trainers drive MoE models through their generic path instead: they read the coefficient from
`config.router_aux_loss_coef` (absent on DbrxConfig, so the loss is silently off) and their fused LM-head forward
reads `config.num_experts` / `config.num_experts_per_tok` (absent too, so a non-zero coefficient crashes).
TRL's experimental ORPO trainer instead switches the loss on from `config.output_router_logits`.
`sync_moe_config` gives the config those generic names, derived from `ffn_config`, so TRL weights the DBRX loss
by DBRX's own coefficient. They are recomputed on every load, so they never drift from `ffn_config`.

One switch for every stage: the loader calls `sync_moe_config`, and each trainer reads `router_loss_weight(model)`
(= `config.router_aux_loss_coef`): TRL's SFT, DPO, GRPO and RLOO trainers read it themselves; the toolkit's
reward, ORPO and PPO trainers (`dbrx_tune.training`) read it through this function.
"""

from __future__ import annotations

from transformers import DbrxConfig


def sync_moe_config(config: DbrxConfig, moe_loss_weight: float | None = None) -> DbrxConfig:
    """Expose DBRX's MoE settings under the names TRL reads; optionally override the loss weight (in place)."""
    ffn = config.ffn_config
    if moe_loss_weight is not None:
        if moe_loss_weight < 0:
            raise ValueError(f"moe_loss_weight must be >= 0, got {moe_loss_weight}")
        ffn.moe_loss_weight = float(moe_loss_weight)
    config.num_experts = ffn.moe_num_experts
    config.num_experts_per_tok = ffn.moe_top_k
    config.router_aux_loss_coef = ffn.moe_loss_weight
    # Off unless a trainer asks: DBRX's forward computes the loss whenever this is set, also while generating,
    # where the cached decoding steps no longer match the attention mask and the loss computation fails.
    config.output_router_logits = False
    return config


def router_loss_weight(model) -> float:
    """The router load-balancing loss weight a trainer adds for `model` (a model or a PEFT wrapper): the
    `router_aux_loss_coef` that `sync_moe_config` set; 0 for a model without a router (a dense model)."""
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
