"""Our DBRX model's logits agree with the independent float64 reference in `reference_dbrx.py`.

The model under test is transformers' DbrxForCausalLM built from our tiny config, optionally with our
experts implementation swapped in; the reference shares no code with it. Weights are re-drawn at a
scale where attention is not uniform, routing varies between tokens and LayerNorm weights are not all
ones, so that a wrong RoPE base, head grouping, routing rule or norm would show in the logits.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from reference_dbrx import reference_dbrx_logits
from transformers import DbrxConfig, DbrxForCausalLM
from transformers.models.dbrx.modeling_dbrx import DbrxExperts

from dbrx_tune.modeling.config import tiny_dbrx_config

VOCAB = 512
BATCH, SEQ = 2, 16
# float32 model against a float64 reference: measured about 6e-7 (2e-6 with clip_qkv binding) on this config.
MAX_RELATIVE_ERROR = 1e-5


def _experts_implementation_setter():
    """`set_experts_implementation` if our experts module provides it yet, else None."""
    try:
        module = importlib.import_module("dbrx_tune.modeling.experts")
    except ModuleNotFoundError as err:
        if err.name != "dbrx_tune.modeling.experts":
            raise
        return None
    return getattr(module, "set_experts_implementation", None)


def _config(top_k: int | None = None) -> DbrxConfig:
    config = tiny_dbrx_config(vocab_size=VOCAB, pad_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 2)
    if top_k is not None:
        config.ffn_config.moe_top_k = top_k
    return config


def _random_model(config: DbrxConfig, seed: int = 0) -> DbrxForCausalLM:
    """An fp32 eval-mode model with every weight re-drawn at unit-ish scale (the default 0.02 init is too flat)."""
    torch.manual_seed(seed)
    model = DbrxForCausalLM(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # LayerNorm weights
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, config.d_model**-0.5)
    return model


def _input_ids(seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _model_logits(model: DbrxForCausalLM, experts_impl: str, input_ids: torch.LongTensor) -> torch.Tensor:
    setter = _experts_implementation_setter()
    if setter is not None:
        setter(model, experts_impl)
    is_stock = [type(block.ffn.experts) is DbrxExperts for block in model.transformer.blocks]
    assert is_stock == [experts_impl == "eager"] * len(is_stock), (
        f"experts={experts_impl} was asked for, but blocks hold stock DbrxExperts: {is_stock}"
    )
    with torch.no_grad():
        return model(input_ids).logits


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.fixture(params=["eager", "grouped"])
def experts_impl(request) -> str:
    if request.param != "eager" and _experts_implementation_setter() is None:
        pytest.skip("dbrx_tune.modeling.experts.set_experts_implementation does not exist yet")
    return request.param


@pytest.mark.parametrize(
    "top_k",
    [None, 4, 1],
    ids=["tiny-config-top2", "top-k-equals-n-experts", "top-1"],
)
def test_logits_match_float64_reference(experts_impl: str, top_k: int | None) -> None:
    config = _config(top_k)
    model = _random_model(config)
    state_dict = model.state_dict()  # original DBRX names, taken before any experts swap
    input_ids = _input_ids()

    expected = reference_dbrx_logits(state_dict, config, input_ids)
    actual = _model_logits(model, experts_impl, input_ids)

    assert actual.shape == (BATCH, SEQ, VOCAB)
    error = _relative_error(actual, expected)
    assert error < MAX_RELATIVE_ERROR, (
        f"experts={experts_impl} top_k={config.ffn_config.moe_top_k}: ||a-b||/||b|| = {error:.2e}"
    )


def test_logits_match_float64_reference_with_qkv_clipping_active(experts_impl: str) -> None:
    config = _config()
    model = _random_model(config)
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.norm_attn_norm.attn.Wqkv.weight.mul_(4.0)  # q/k/v entries of std ~4: a few percent exceed clip 8
    state_dict = model.state_dict()
    input_ids = _input_ids()

    expected = reference_dbrx_logits(state_dict, config, input_ids)
    unclipped_config = DbrxConfig.from_dict(config.to_dict())
    unclipped_config.attn_config.clip_qkv = None
    unclipped = reference_dbrx_logits(state_dict, unclipped_config, input_ids)
    assert _relative_error(unclipped, expected) > 1e-3, (
        "clip_qkv did not bind: the test would not notice a missing clamp"
    )

    actual = _model_logits(model, experts_impl, input_ids)
    error = _relative_error(actual, expected)
    assert error < MAX_RELATIVE_ERROR, f"experts={experts_impl} with clip_qkv active: ||a-b||/||b|| = {error:.2e}"
