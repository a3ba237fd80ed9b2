"""DeepSpeed ZeRO-3 integration for DBRX.

Under ZeRO-3 every parameter is partitioned and gathered by hooks on the module that uses it. A MoE block only
touches the experts its tokens were routed to, so ranks routing differently would gather different parameters
and deadlock (or index empty partitions). Registering the whole MoE block (`DbrxFFN`) as a ZeRO-3 *leaf module*
makes DeepSpeed gather all of its parameters at once on every rank. No TRL trainer does this, so the loaders in
`dbrx_tune.modeling` call `register_zero3_leaf_modules` whenever ZeRO-3 is active.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

logger = logging.getLogger(__name__)

MOE_LEAF_MODULE_CLASSES: tuple[type[nn.Module], ...] = (DbrxFFN,)


def register_zero3_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Mark every DBRX MoE block of `model` as a ZeRO-3 leaf module when ZeRO-3 is active; returns them."""
    if not is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    leaves = set_z3_leaf_modules(model, list(MOE_LEAF_MODULE_CLASSES))
    logger.info("ZeRO-3: registered %d DBRX MoE blocks as leaf modules", len(leaves))
    return leaves
