"""Answering the vibe prompts in the middle of training without disturbing it.

`training_state_kept(model)` wraps the generation: it saves and restores what a training step depends on, so the
loss trajectory of a run is the same with vibe checks as without them:

- the RNG states (python, numpy, torch CPU and every CUDA device): sampled answers draw from them, and dropout,
  router jitter and data order of the next steps must not see the difference;
- each module's train/eval flag (restored module by module: a frozen submodule that was in eval stays so);
- the ZeRO-3 parameter-fetch trace, which generation would leave behind (`forget_zero3_trace`);
- `config.use_cache` (trainers switch it off under gradient checkpointing; generation asks for the KV cache through
  its own generation config instead);
- `config.output_router_logits`, switched off while generating: TRL turns it on for the router loss, and DBRX's
  forward then computes that loss on every decoding step, where the cached steps no longer match the attention mask
  and batched generation fails (see `dbrx_tune.modeling.moe_loss`).

Gradient checkpointing is left as it is: transformers checkpoints a layer only in training mode with gradients on
(`GradientCheckpointingLayer`), and generation runs in eval mode under `torch.no_grad`, so the flag needs no toggling
(TRL's `unwrap_model_for_generation` disables and re-enables it, which would lose the recipe's
`gradient_checkpointing_kwargs`).

Under DeepSpeed ZeRO-3 the parameters stay partitioned: every rank runs `generate(..., synced_gpus=True)` on the same
prompts, and DeepSpeed's hooks gather one layer at a time, as in training. This is TRL's
`unwrap_model_for_generation(..., gather_deepspeed3_params=False)` path (`ds3_gather_for_generation: false`): gathering
the whole model, TRL's default, would need DBRX's 264 GB of bf16 weights on every GPU. The price is one all-gather of
the weights per generated token, which is why checks are bounded (`vibe_max_new_tokens`) and infrequent. With PEFT
the PeftModel generates, so the answers are those of the adapted model.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.integrations.fsdp import is_fsdp_managed_module

from dbrx_tune.parallel.zero3 import has_autoep_layers

logger = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


def base_config(model: nn.Module) -> Any:
    """The model config of `model` (the base model's for a PeftModel)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def needs_every_rank(model: nn.Module) -> bool:
    """Whether generation needs every rank: partitioned weights (ZeRO-3 or FSDP, transformers' own rule), or
    DeepSpeed AutoEP layers, whose forward exchanges tokens with the other ranks of the EP group by all-to-all at any
    ZeRO stage (the main process generating alone would wait there while the others go on training)."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world_size > 1 and (
        is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model) or has_autoep_layers(model, min_ep_size=2)
    )


def forget_zero3_trace(engine: Any) -> None:
    """Make the next training forward of a ZeRO-3 `engine` record its own parameter-fetch trace (no-op otherwise).

    DeepSpeed records the order in which modules fetch their partitions and prefetches by it from then on; the
    generation forwards leave a trace with the LM head in it. A training loss that reads `lm_head.weight` directly
    (TRL's fused LM-head loss) then finds the head already prefetched, does not gather it itself, and the backward
    meets the released weight. TRL invalidates the trace after its own generation for the same reason
    (`trl.models.utils.add_hooks`).
    """
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


@contextlib.contextmanager
def training_state_kept(model: nn.Module, engine: Any = None) -> Iterator[None]:
    """Eval mode, no gradients and router logits off inside; RNG, modes and config restored after, and the
    ZeRO-3 fetch trace of `engine` (the DeepSpeed engine training `model`, if any) forgotten."""
    rng = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    )
    modes = [(module, module.training) for module in model.modules()]
    config = base_config(model)
    saved_config = {
        name: getattr(config, name) for name in ("use_cache", "output_router_logits") if hasattr(config, name)
    }
    try:
        model.eval()
        if "output_router_logits" in saved_config:
            config.output_router_logits = False
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for name, value in saved_config.items():
            setattr(config, name, value)
        forget_zero3_trace(engine)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    *,
    max_new_tokens: int,
    do_sample: bool,
    batch_size: int,
    synced_gpus: bool,
) -> list[tuple[str, str | None]]:
    """(answer, error) per conversation, generated in left-padded batches; call inside `training_state_kept`.

    A batch that fails is retried one conversation at a time, so one bad prompt costs only its own answer; an
    error is returned as text (answer "") and logged, never raised. Under `synced_gpus` every rank must call this
    with the same conversations: the retries then happen on every rank alike for errors the inputs cause (a rank
    failing alone, e.g. out of memory on one GPU, leaves the others waiting in the collective).
    """
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        use_cache=True,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    results: list[tuple[str, str | None]] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        try:
            answers = _generate(model, tokenizer, batch, generation_config, synced_gpus)
            results.extend((answer, None) for answer in answers)
        except Exception as batch_error:  # noqa: BLE001 - a vibe check must never stop training
            logger.warning(
                "vibe generation failed for a batch of %d prompts (%s); retrying one by one",
                len(batch),
                _describe(batch_error),
            )
            for conversation in batch:
                try:
                    answer = _generate(model, tokenizer, [conversation], generation_config, synced_gpus)[0]
                    results.append((answer, None))
                except Exception as error:  # noqa: BLE001
                    results.append(("", _describe(error)))
    return results


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Conversation],
    generation_config: GenerationConfig,
    synced_gpus: bool,
) -> list[str]:
    texts = [
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        for conversation in batch
    ]
    # The chat template writes the special tokens itself; left padding keeps every prompt's end at the same column.
    inputs = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    output = model.generate(**inputs, generation_config=generation_config, synced_gpus=synced_gpus)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _describe(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
