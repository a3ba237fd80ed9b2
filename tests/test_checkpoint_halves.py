"""DBRX blocks checkpointed by halves (attention, then MoE): the same numbers as whole-block checkpointing, the MoE
half's backward done before the attention half is recomputed (the point: their activations are never alive
together), and switched on by activation offload only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_long_context import _assert_same, _loss_and_grads, _tiny_lora_model
from transformers import DbrxForCausalLM
from transformers.models.dbrx.modeling_dbrx import DbrxBlock

from dbrx_tune.args import ModelArguments
from dbrx_tune.build import finish_model
from dbrx_tune.modeling.checkpointing import DbrxBlockCheckpointedByHalves, checkpoint_blocks_by_halves
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_moe_token_chunk

INPUT_IDS = torch.randint(0, 254, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("moe_token_chunk", [None, 7], ids=["whole-moe", "moe-chunks"])
def test_halves_give_the_numbers_of_whole_block_checkpointing(reentrant, moe_token_chunk):
    model = _tiny_lora_model(four_bit=True)
    set_moe_token_chunk(model, moe_token_chunk)
    plain = _loss_and_grads(model, INPUT_IDS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    whole = _loss_and_grads(model, INPUT_IDS)
    assert checkpoint_blocks_by_halves(model) == model.config.n_layers
    halves = _loss_and_grads(model, INPUT_IDS)
    _assert_same(whole, halves)
    if not reentrant:  # reentrant checkpointing drops the router logits' graph, so the aux loss's gradient differs
        _assert_same(plain, halves)
    model.eval()  # without training the halves run as the stock block
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, _stock_logits(model))


def _stock_logits(model: torch.nn.Module) -> torch.Tensor:
    blocks = [module for module in model.modules() if isinstance(module, DbrxBlockCheckpointedByHalves)]
    for block in blocks:
        block.__class__ = DbrxBlock
    try:
        return model(input_ids=INPUT_IDS).logits
    finally:
        for block in blocks:
            block.__class__ = DbrxBlockCheckpointedByHalves


def _backward_events(model: torch.nn.Module) -> list[tuple[str, int]]:
    """("attention recompute" | "experts backward", layer) in the order the backward pass runs them."""
    events: list[tuple[str, int]] = []
    blocks = [module for module in model.modules() if isinstance(module, DbrxBlock)]
    for index, block in enumerate(blocks):
        attention, experts = block.norm_attn_norm.attn, block.ffn.experts

        def recompute_hook(module, args, index=index):
            if torch._C._current_graph_task_id() != -1:  # a forward run inside the backward pass: a recompute
                events.append(("attention recompute", index))

        attention.register_forward_pre_hook(recompute_hook)
        experts.register_full_backward_hook(  # runs once the experts' input gradients exist: their backward is done
            lambda module, grad_input, grad_output, index=index: events.append(("experts backward", index))
        )
    _loss_and_grads(model, INPUT_IDS)
    return events


@pytest.mark.parametrize("halves", [False, True], ids=["whole-block", "halves"])
def test_the_moe_half_is_differentiated_before_the_attention_half_is_recomputed(halves):
    model = _tiny_lora_model(four_bit=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if halves:
        checkpoint_blocks_by_halves(model)
    events = _backward_events(model)
    for layer in range(model.config.n_layers):
        experts_done = events.index(("experts backward", layer))
        attention_back = events.index(("attention recompute", layer))
        # whole-block checkpointing recomputes the attention half first, and holds it through the experts' backward
        assert (experts_done < attention_back) is halves


def test_activation_offload_checkpoints_dbrx_blocks_by_halves():
    model = DbrxForCausalLM(tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254))
    finish_model(model, ModelArguments(model_name_or_path="tiny"))
    assert not any(isinstance(module, DbrxBlockCheckpointedByHalves) for module in model.modules())
    finish_model(model, dataclasses.replace(ModelArguments(model_name_or_path="tiny"), activation_offload=True))
    blocks = [module for module in model.modules() if isinstance(module, DbrxBlock)]
    assert blocks and all(type(block) is DbrxBlockCheckpointedByHalves for block in blocks)
