"""Save a DBRX trained under DeepSpeed (ZeRO-3, AutoEP expert parallelism) as a plain Hugging Face DBRX checkpoint.

After `deepspeed.initialize` with `expert_parallel` enabled, every `DbrxFFN` is an `AutoEPMoELayer` whose
parameters carry AutoEP's names and layout, and each rank holds only its own experts:

    router.gate.weight    (n_experts, d_model)                 DBRX: ffn.router.layer.weight (same tensor)
    experts.w1            (n_local_experts, ffn, d_model)      DBRX: ffn.experts.mlp.w1 (n_experts * ffn, d_model)
    experts.w3            (n_local_experts, ffn, d_model)      DBRX: ffn.experts.mlp.v1 (n_experts * ffn, d_model)
    experts.w2            (n_local_experts, d_model, ffn)      DBRX: ffn.experts.mlp.w2 (n_experts * ffn, d_model),
                                                                     stored un-transposed

The local experts of EP rank r are those of `autoep_experts_for_rank(layer.expert_placement_descriptor, r)`; under
ZeRO-3 each rank's local experts are further partitioned over the expert-data-parallel group (the ranks holding
the same experts), all other parameters over the whole data-parallel group.

DeepSpeed 0.19.8 refuses to consolidate such a model: `save_16bit_model` and `_zero3_consolidated_16bit_state_dict`
(what `Trainer.save_model` calls under ZeRO-3) raise `NotImplementedError` ("global-DP consolidation would produce
incomplete expert tensors"), and points to an offline `ds_to_universal.py` conversion instead.
`consolidated_dbrx_state_dict` does the expert-aware consolidation in the training job: it walks the model one
module at a time, gathers each module's ZeRO partitions over the group they are partitioned over, gathers each MoE
layer's experts over its expert-parallel group onto global rank 0, and maps names and layouts back to DBRX's (the
inverse of the DBRX AutoEP preset, `dbrx_tune.parallel.autoep`). The same walk also fixes ZeRO-3 without EP:
DeepSpeed's consolidation reads the 3D `DbrxGroupedExperts` parameters directly, bypassing their state-dict hook,
and would save `experts.{w1,v1,w2}` in 3D, which a stock `DbrxForCausalLM` does not load. `DbrxCheckpointMixin` puts
it under every stage trainer's `save_model`, so final and intermediate checkpoints alike are plain DBRX checkpoints.
"""

from __future__ import annotations

import logging

import torch
from torch import distributed as dist
from torch import nn

from dbrx_tune.modeling.experts import to_original_layout
from dbrx_tune.parallel.zero3 import autoep_layer_class, gathered, has_autoep_layers, is_partitioned, unwrap_engine

logger = logging.getLogger(__name__)

DBRX_ROUTER_WEIGHT = "router.layer.weight"
"""Where DBRX keeps the router weight inside a `DbrxFFN` (AutoEP's `router.gate.weight`)."""

DBRX_EXPERTS_PREFIX = "experts.mlp."
"""Prefix of the fused expert weights inside a `DbrxFFN` in the original checkpoint layout."""


def _expert_names_to_dbrx() -> dict[str, str]:
    """AutoEP grouped-expert parameter name -> DBRX projection name, read from the DBRX preset (gate, down, up)."""
    from dbrx_tune.parallel.autoep import build_preset

    preset = build_preset()
    return {"w1": preset.expert_w1, "w2": preset.expert_w2, "w3": preset.expert_w3}


def _gather_experts_to_rank0(layer: nn.Module) -> dict[str, torch.Tensor] | None:
    """All experts of one `AutoEPMoELayer`, (n_experts, out, in) each in AutoEP's names, on global rank 0 (CPU).

    Collective: every rank calls it for every layer in the same order. Ranks whose expert-parallel group does not
    hold global rank 0 only join the expert-data-parallel gather (they hold replicas of the same experts).
    """
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    named = list(layer.experts.named_parameters(recurse=False))
    rank = dist.get_rank()
    with gathered([param for _, param in named]):
        local = {name: param.detach() for name, param in named}
        group = layer.ep_group
        if layer.ep_size == 1 or group is None:
            return {name: tensor.cpu().clone() for name, tensor in local.items()} if rank == 0 else None
        group_ranks = dist.get_process_group_ranks(group)
        if 0 not in group_ranks:
            return None
        full: dict[str, torch.Tensor] = {}
        for name, tensor in local.items():
            tensor = tensor.contiguous()
            parts = [torch.empty_like(tensor) for _ in group_ranks] if rank == 0 else None
            dist.gather(tensor, parts, dst=0, group=group)
            if rank != 0:
                continue
            merged = torch.empty((layer.num_experts, *tensor.shape[1:]), dtype=tensor.dtype, device="cpu")
            for ep_rank, part in enumerate(parts):
                experts = autoep_experts_for_rank(layer.expert_placement_descriptor, ep_rank)
                merged[list(experts)] = part.cpu()
            full[name] = merged
    return full if rank == 0 else None


def _dbrx_ffn_state(layer: nn.Module, prefix: str, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Add one MoE block's router and experts to `state_dict` (rank 0) under DBRX's names and layout."""
    extra = [name for name, _ in layer.named_parameters() if not name.startswith(("router.gate.", "experts."))]
    extra += [f"router.gate.{name}" for name, _ in layer.router.gate.named_parameters() if name != "weight"]
    if extra or layer.router.e_score_correction_bias is not None or getattr(layer, "expert_bias", None) is not None:
        raise ValueError(
            f"{prefix.rstrip('.')}: the AutoEP layer holds state a DBRX block has no place for "
            f"({extra or 'expert/score-correction bias'}); was it built by a preset other than 'dbrx'?"
        )
    gate = layer.router.gate.weight
    with gathered([gate]):
        if state_dict is not None:
            state_dict[prefix + DBRX_ROUTER_WEIGHT] = gate.detach().cpu().clone()
    experts = _gather_experts_to_rank0(layer)
    if state_dict is None:
        return
    for autoep_name, dbrx_name in _expert_names_to_dbrx().items():
        # AutoEP's grouped layout equals DbrxGroupedExperts' (out, in) per expert, so the same inverse applies.
        state_dict[prefix + DBRX_EXPERTS_PREFIX + dbrx_name] = to_original_layout(dbrx_name, experts[autoep_name])


def consolidated_dbrx_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a DBRX model trained under DeepSpeed, in DBRX's checkpoint names and layout, on rank 0.

    `model`: the trained model or its `DeepSpeedEngine`; ZeRO-3 partitioned or not, with AutoEP layers or without.
    AutoEP layers are mapped back to `DbrxFFN` keys with all experts gathered over the expert-parallel group, and the
    3D `DbrxGroupedExperts` weights are written as the fused 2D `mlp.{w1,v1,w2}` (ZeRO-3's own consolidation reads
    parameters directly and would skip the experts' state-dict hook, saving `experts.{w1,v1,w2}` in 3D). Collective:
    call it on every rank; rank 0 gets the CPU state dict (the keys and shapes of a stock `DbrxForCausalLM`), other
    ranks None. Works one module at a time, so at most one MoE block's experts are gathered at once.
    """
    from dbrx_tune.modeling.experts import EXPERT_PROJECTIONS, DbrxGroupedExperts

    layer_class = autoep_layer_class()
    model = unwrap_engine(model)
    if not dist.is_initialized():
        raise RuntimeError(
            "consolidated_dbrx_state_dict gathers ZeRO-3 partitions and expert-parallel shards: "
            "torch.distributed must be initialised (it is, inside a DeepSpeed run)"
        )
    state_dict: dict[str, torch.Tensor] | None = {} if dist.get_rank() == 0 else None
    seen: dict[int, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if layer_class is not None and isinstance(module, layer_class):
            _dbrx_ffn_state(module, prefix, state_dict)
            return
        params = [(name, param) for name, param in module.named_parameters(recurse=False) if param is not None]
        with gathered([param for _, param in params]):
            if state_dict is not None:
                for name, param in params:
                    key = prefix + name
                    if id(param) in seen:  # tied weights stay one tensor; save_pretrained drops the tied key
                        state_dict[key] = state_dict[seen[id(param)]]
                        continue
                    if isinstance(module, DbrxGroupedExperts) and name in EXPERT_PROJECTIONS:
                        key = f"{prefix}mlp.{name}"  # what the experts' own state-dict hook would write
                        state_dict[key] = to_original_layout(name, param.detach().cpu().clone())
                    else:
                        state_dict[key] = param.detach().cpu().clone()
                    seen[id(param)] = key
                for name, buffer in module.named_buffers(recurse=False):
                    if buffer is not None and name not in module._non_persistent_buffers_set:
                        state_dict[prefix + name] = buffer.detach().cpu().clone()
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return state_dict


def needs_dbrx_consolidation(model: nn.Module) -> bool:
    """Whether saving `model` must go through `consolidated_dbrx_state_dict`: a full (not PEFT) model that is ZeRO-3
    partitioned or has AutoEP layers."""
    from peft import PeftModel

    return not isinstance(model, PeftModel) and (has_autoep_layers(model) or is_partitioned(model))


class DbrxCheckpointMixin:
    """`Trainer.save_model` that writes DBRX's original names and layout also from ZeRO-3 and AutoEP training.

    Put it first in a trainer's bases (`class DbrxSFTTrainer(DbrxCheckpointMixin, SFTTrainer)`). The Trainer calls
    `save_model` for the final model and, through `_save_checkpoint`, for every `checkpoint-N` it writes during
    training; DeepSpeed's consolidation, what the stock method uses under ZeRO-3, raises under AutoEP (the default
    SFT recipe died at its first save) and writes 3D expert keys for the grouped experts. Here a model that
    `needs_dbrx_consolidation` gets its state dict from `consolidated_dbrx_state_dict` on every rank and is written
    by the global main process, the only one holding it, through the trainer's usual `_save` (config, safetensors
    shards, tokenizer, training args), whatever `stage3_gather_16bit_weights_on_model_save` and `save_on_each_node`
    say (other nodes would otherwise write ZeRO-3's empty placeholders); anything else (no DeepSpeed, ZeRO-1/2, PEFT
    adapters) takes the stock path. DeepSpeed's own engine checkpoint for resuming is written beside it by
    `_save_checkpoint` as usual.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not needs_dbrx_consolidation(self.model):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = consolidated_dbrx_state_dict(self.model)
        if state_dict is not None:  # global rank 0
            self._save(output_dir, state_dict=state_dict)
            logger.info("saved the DeepSpeed-trained model to %s in the original DBRX layout", output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
