"""Long-context settings checked before any weights load: activation offload and MoE token chunks.

`activation_offload: true` turns on transformers' own activation-checkpointing offload
(`activation_checkpointing_kwargs={"offload": True}`: each checkpointed block's saved inputs go to pinned host memory
through `torch.autograd.graph.save_on_cpu` and come back for its recompute). Those inputs are
`n_layers x tokens x d_model` values per rank, twice that for DBRX (its blocks are checkpointed by halves under
offload: `dbrx_tune.modeling.checkpointing`), 32 GB at 32k tokens, so a node needs that much free host
memory per local rank; a machine without it is refused here, with the numbers, instead of swapping or being killed by
the OOM killer mid-run. On a CPU-only run the activations are in host memory already and the setting is a no-op
(transformers' offload pins memory, which needs an accelerator).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import PretrainedConfig

from dbrx_tune.build import is_dbrx
from dbrx_tune.recipe import Recipe

logger = logging.getLogger(__name__)

GB = 1e9


def offloaded_activation_bytes(
    n_layers: int, d_model: int, tokens: int, bytes_per_value: int = 2, inputs_per_layer: int = 1
) -> int:
    """Host bytes activation offload holds per rank: every checkpoint's input (tokens x d_model), one per layer, or
    two for DBRX, whose blocks are checkpointed by halves under offload (`dbrx_tune.modeling.checkpointing`)."""
    return n_layers * inputs_per_layer * tokens * d_model * bytes_per_value


def available_host_memory() -> int:
    """Bytes of host memory available now (psutil when installed, else the free and reclaimable pages)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


def check_long_context_settings(recipe: Recipe, config: PretrainedConfig) -> None:
    """Refuse a `max_length` beyond the model's context, `moe_token_chunk` on a dense model, and
    `activation_offload` without checkpointing or enough host memory; an accepted offload switches on transformers'
    checkpoint offload in the training arguments."""
    model_args, args = recipe.model, recipe.training
    context = getattr(config, "max_position_embeddings", None)  # DbrxConfig maps it to max_seq_len
    max_length = getattr(args, "max_length", None)
    if context and max_length and max_length > context:
        raise ValueError(f"max_length {max_length} exceeds the model's max_seq_len {context}")
    if model_args.moe_token_chunk is not None and not is_dbrx(config):
        raise ValueError(f"moe_token_chunk: {config.model_type} has no mixture-of-experts layers to chunk")
    if not model_args.activation_offload:
        return
    if not args.activation_checkpointing:
        raise ValueError("activation_offload: offloads the checkpointed block inputs; set gradient_checkpointing: true")
    n_layers, d_model = config.num_hidden_layers, config.hidden_size  # DbrxConfig maps both names
    tokens = (max_length or 1024) * args.per_device_train_batch_size
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    bytes_per_value = 2 if (args.bf16 or args.fp16) else 4
    halves = 2 if is_dbrx(config) else 1
    needed = local_ranks * offloaded_activation_bytes(n_layers, d_model, tokens, bytes_per_value, halves)
    available = available_host_memory()
    if needed > available:
        raise ValueError(
            f"activation_offload: {local_ranks} rank(s) x {n_layers} layers x {halves} checkpoint input(s) x "
            f"{tokens} tokens x d_model {d_model} "
            f"need {needed / GB:.1f} GB of host memory, {available / GB:.1f} GB is available; free memory, "
            "shorten max_length or set activation_offload: false"
        )
    if args.use_cpu or not torch.cuda.is_available():
        logger.warning("activation_offload: training on the CPU, activations are in host memory already")
        return
    args.activation_checkpointing_kwargs = {**(args.activation_checkpointing_kwargs or {}), "offload": True}
