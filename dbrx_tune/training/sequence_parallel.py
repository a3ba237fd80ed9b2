"""Ulysses sequence parallelism (DeepSpeed ALST) for long-context full fine-tuning, checked before any weights load.

`sp_size: N` in a recipe splits every sequence over N ranks: each rank embeds and runs its N-th of the tokens, and
DeepSpeed's `UlyssesSPAttentionHF` swaps the sequence split for a head split around attention (all-to-all), so each
rank attends over the whole sequence for its share of the heads. Activations per rank fall by N, which is what makes
DBRX's 32k context fit with ZeRO-3 (`recipes/dbrx_sft_32k.yaml`). The engine is accelerate's and the HF Trainer's:
this module only builds their `ParallelismConfig` from the recipe and refuses what cannot work, naming the key:
- DBRX's 48 query heads must split evenly over the ranks, and its 8 KV heads either split or replicate evenly;
- every batch must split into equal shards: `max_length` a multiple of `sp_size`, and batches padded to one;
- Ulysses runs inside DeepSpeed (a `deepspeed` config is required) and DeepSpeed 0.19.8 refuses it beside AutoEP;
- `attn_implementation: eager` materialises a full 4D mask, which Ulysses cannot shard, and Ulysses drops sdpa's
  mask, so packing (documents separated by that mask) needs flash attention, which separates them by position ids;
- only the SFT stage: the Trainer combines the ranks' losses for the model's own loss, which is SFT's; the reward,
  DPO, ORPO and PPO trainers compute theirs from full-sequence outputs.
The router load-balancing loss is computed by each rank on its own tokens and averaged by token count; it is close to,
not equal to, the full-sequence loss (the balance statistics are per shard), so a warning says so.
"""

from __future__ import annotations

import logging
import os

from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import DeepSpeedSequenceParallelConfig
from transformers import PretrainedConfig
from trl import SFTConfig

from dbrx_tune.build import is_dbrx
from dbrx_tune.parallel.launch import deepspeed_config
from dbrx_tune.parallel.zero3 import expert_parallel_size
from dbrx_tune.recipe import Recipe

logger = logging.getLogger(__name__)


def check_sequence_parallel(recipe: Recipe, config: PretrainedConfig, training_class: type) -> None:
    """Refuse an `sp_size` that cannot work (see the module docstring); an accepted one sets the training arguments'
    `parallelism_config` (DeepSpeed backend, the model's attention) and pads batches to a multiple of it."""
    model_args, args = recipe.model, recipe.training
    sp = model_args.sp_size
    if sp < 1:
        raise ValueError(f"sp_size must be a positive number of ranks, got {sp}")
    if sp == 1:
        return
    if not issubclass(training_class, SFTConfig):
        raise ValueError(f"sp_size {sp}: sequence parallelism is supported for SFT only, not {training_class.__name__}")
    if not args.deepspeed:
        raise ValueError(f"sp_size {sp}: Ulysses sequence parallelism runs inside DeepSpeed; set deepspeed: CONFIG")
    if expert_parallel_size(deepspeed_config(args.deepspeed)) > 1:
        raise ValueError(f"sp_size {sp}: DeepSpeed refuses Ulysses sequence parallelism together with AutoEP")
    if model_args.attn_implementation in (None, "eager"):
        raise ValueError(f"sp_size {sp}: attn_implementation eager cannot be sharded; use sdpa or flash_attention_2")
    if getattr(args, "packing", False) and model_args.attn_implementation in ("sdpa", "flex_attention"):
        raise ValueError(
            f"sp_size {sp} with packing: Ulysses drops {model_args.attn_implementation}'s attention mask, so packed "
            "documents would attend to each other; set packing: false (or attn_implementation: flash_attention_2, "
            "which separates them by position_ids)"
        )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads  # DbrxConfig maps both names
    if heads % sp or (kv_heads % sp and sp % kv_heads):
        raise ValueError(
            f"sp_size {sp}: the model's {heads} attention heads and {kv_heads} KV heads must split evenly over the "
            "sequence-parallel ranks (a divisor of both, or a multiple of the KV heads that divides the heads)"
        )
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world and world % sp:
        raise ValueError(f"sp_size {sp} does not divide the {world} ranks of this launch")
    max_length = getattr(args, "max_length", None)
    if max_length and max_length % sp:
        raise ValueError(f"max_length {max_length} is not a multiple of sp_size {sp}: the shards must be equal")
    pad = getattr(args, "pad_to_multiple_of", None)
    if pad and pad % sp:
        raise ValueError(f"pad_to_multiple_of {pad} is not a multiple of sp_size {sp}: the shards must be equal")
    if hasattr(args, "pad_to_multiple_of") and not pad:
        args.pad_to_multiple_of = sp
    if is_dbrx(config):
        logger.warning(
            "sp_size %d: each rank computes the router load-balancing loss on its own tokens; the ranks' losses are "
            "averaged by token count, close to the full-sequence value but not equal to it",
            sp,
        )
    args.parallelism_config = _parallelism_config(sp, model_args.attn_implementation)


def _parallelism_config(sp: int, attn_implementation: str) -> ParallelismConfig:
    """accelerate's `ParallelismConfig` for DeepSpeed Ulysses at `sp` ranks with the model's attention kernel."""
    handler = DeepSpeedSequenceParallelConfig(
        sp_attn_implementation=attn_implementation, sp_seq_length_is_variable=True
    )
    return ParallelismConfig(sp_size=sp, sp_backend="deepspeed", sp_handler=handler)
