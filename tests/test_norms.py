"""DBRX's LayerNorms run outside autocast when weights and input share a dtype (no fp32 copy saved for backward),
give the stock norm's output, and leave mixed-dtype cases to autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DbrxForCausalLM

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.norms import LayerNormInInputDtype, keep_norms_in_input_dtype


def _autocast_seen_by_layer_norm(monkeypatch) -> list[bool]:
    seen = []
    original = nn.functional.layer_norm
    monkeypatch.setattr(
        nn.functional, "layer_norm", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or original(*a, **k)
    )
    return seen


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_norm_leaves_autocast_only_when_dtypes_match(monkeypatch, weight_dtype):
    torch.manual_seed(0)
    stock = nn.LayerNorm(64, bias=False).to(weight_dtype)
    with torch.no_grad():
        stock.weight.normal_(1.0, 0.1)
    ours = LayerNormInInputDtype(64, bias=False).to(weight_dtype)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    seen = _autocast_seen_by_layer_norm(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = stock(x), ours(x)
    assert seen == [True, weight_dtype != torch.bfloat16]
    torch.testing.assert_close(got.to(expected.dtype), expected)


def test_every_block_norm_is_switched_and_the_model_output_is_unchanged():
    config = tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254)
    model = DbrxForCausalLM(config).to(torch.bfloat16).eval()
    input_ids = torch.randint(0, 254, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=input_ids).logits
        assert keep_norms_in_input_dtype(model) == 2 * config.n_layers  # norm_1 and norm_2 of each block
        got = model(input_ids=input_ids).logits
    assert type(model.transformer.norm_f) is nn.LayerNorm  # the final norm is not a block's
    assert set(model.state_dict()) == set(DbrxForCausalLM(config).state_dict())
    torch.testing.assert_close(got, expected)
