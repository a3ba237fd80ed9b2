"""The TRL trainers the stage scripts run, with what they miss for DBRX.

Every one saves through `DbrxCheckpointMixin` (`dbrx_tune.parallel.checkpoint`): final and intermediate checkpoints
of ZeRO-3 and AutoEP runs in DBRX's original layout, where the stock `save_model` writes 3D expert keys or, under
AutoEP, raises at the first checkpoint.

The router load-balancing loss has one switch, `router_loss_weight(model)` (see `modeling.moe_loss`): TRL 1.16's
SFT, DPO, GRPO and RLOO trainers add it themselves once the config exposes it; its RewardTrainer never looks at
`outputs.aux_loss`, so `DbrxRewardTrainer` adds `router_loss_weight * aux_loss` to the Bradley-Terry loss and logs
the unweighted aux loss; `DbrxORPOTrainer` asks for router logits, from which TRL's ORPO adds it.

None writes TRL's model card: the stage's own (`dbrx_tune.training.model_card`) is written when training ends.
"""

from __future__ import annotations

import os

from trl import DPOTrainer, GRPOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer

from dbrx_tune.modeling.moe_loss import router_loss_weight
from dbrx_tune.parallel.checkpoint import DbrxCheckpointMixin

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.16
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402, F401  (ORPOConfig: for rlhf/orpo.py)


class NoTrlModelCard:
    """Skip TRL's `create_model_card`, which every TRL trainer calls at each intermediate save (writing
    OUTPUT_DIR/README.md) and `push_to_hub` calls before uploading.

    TRL's card names no base model for a local path and shows text-generation usage also for a reward model;
    `train_and_save` writes the toolkit's card once the model is saved."""

    def create_model_card(self, *args, **kwargs) -> None:
        return None


class DbrxSFTTrainer(NoTrlModelCard, DbrxCheckpointMixin, SFTTrainer):
    """TRL's `SFTTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxDPOTrainer(NoTrlModelCard, DbrxCheckpointMixin, DPOTrainer):
    """TRL's `DPOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxORPOTrainer(NoTrlModelCard, DbrxCheckpointMixin, ORPOTrainer):
    """TRL's experimental `ORPOTrainer`, with the router loss on, saving DBRX checkpoints from ZeRO-3 / AutoEP runs.

    TRL's ORPO adds the aux loss when the config asks for router logits, which the loader leaves off (generation
    cannot compute the loss): they are asked for here whenever `router_loss_weight` is non-zero."""

    def __init__(self, model, *args, **kwargs):
        model.config.output_router_logits = router_loss_weight(model) > 0
        super().__init__(model, *args, **kwargs)


class DbrxGRPOTrainer(NoTrlModelCard, DbrxCheckpointMixin, GRPOTrainer):
    """TRL's `GRPOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxRLOOTrainer(NoTrlModelCard, DbrxCheckpointMixin, RLOOTrainer):
    """TRL's `RLOOTrainer`, saving DBRX checkpoints from ZeRO-3 / AutoEP runs."""


class DbrxRewardTrainer(NoTrlModelCard, DbrxCheckpointMixin, RewardTrainer):
    """`RewardTrainer` plus DBRX's router load-balancing loss during training, saving DBRX checkpoints."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = router_loss_weight(self.accelerator.unwrap_model(model))
        use_aux = model.training and weight > 0
        if use_aux:
            inputs["output_router_logits"] = True
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if use_aux and outputs.aux_loss is not None:
            loss = loss + weight * outputs.aux_loss.to(loss.device)
            aux = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            self._metrics["train"]["aux_loss"].append(aux)
        return (loss, outputs) if return_outputs else loss
