"""The TRL trainers the stage scripts run, with what they miss for DBRX.

Every one saves through `DbrxCheckpointMixin` (`dbrx_tune.autoep_checkpoint`): final and intermediate checkpoints
of ZeRO-3 and AutoEP runs in DBRX's original layout, where the stock `save_model` writes 3D expert keys or, under
AutoEP, raises at the first checkpoint.

TRL 1.16's SFT and DPO trainers add an MoE aux loss once the config exposes it (see `modeling.moe_loss`);
its RewardTrainer never looks at `outputs.aux_loss`. `DbrxRewardTrainer` adds
`ffn_config.moe_loss_weight * aux_loss` to the Bradley-Terry loss and logs the unweighted aux loss.
"""

from __future__ import annotations

import os

from trl import DPOTrainer, GRPOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer

from dbrx_tune.autoep_checkpoint import DbrxCheckpointMixin

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.16
from trl.experimental.orpo import ORPOTrainer  # noqa: E402


class DbrxSFTTrainer(DbrxCheckpointMixin, SFTTrainer):
    """TRL's `SFTTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxDPOTrainer(DbrxCheckpointMixin, DPOTrainer):
    """TRL's `DPOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxORPOTrainer(DbrxCheckpointMixin, ORPOTrainer):
    """TRL's experimental `ORPOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxGRPOTrainer(DbrxCheckpointMixin, GRPOTrainer):
    """TRL's `GRPOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxRLOOTrainer(DbrxCheckpointMixin, RLOOTrainer):
    """TRL's `RLOOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxRewardTrainer(DbrxCheckpointMixin, RewardTrainer):
    """`RewardTrainer` plus DBRX's router load-balancing loss during training, saving DBRX checkpoints."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.accelerator.unwrap_model(model).config
        weight = config.ffn_config.moe_loss_weight
        use_aux = model.training and weight > 0
        if use_aux:
            inputs["output_router_logits"] = True
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if use_aux and outputs.aux_loss is not None:
            loss = loss + weight * outputs.aux_loss.to(loss.device)
            aux = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            self._metrics["train"]["aux_loss"].append(aux)
        return (loss, outputs) if return_outputs else loss
