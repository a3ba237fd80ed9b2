"""TRL trainers with the one DBRX-specific thing they miss: the router load-balancing loss.

TRL 1.16's SFT and DPO trainers add an MoE aux loss once the config exposes it (see `modeling.moe_loss`);
its RewardTrainer never looks at `outputs.aux_loss`. `DbrxRewardTrainer` adds
`ffn_config.moe_loss_weight * aux_loss` to the Bradley-Terry loss and logs the unweighted aux loss.
"""

from __future__ import annotations

from trl import RewardTrainer


class DbrxRewardTrainer(RewardTrainer):
    """`RewardTrainer` plus DBRX's router load-balancing loss during training."""

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
