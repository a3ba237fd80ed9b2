"""FP8 expert GEMMs (`experts_precision: fp8`): quantization, the weight cache, the CPU fallback, the refusals, and
on a Hopper GPU the FP8 grouped linear against bf16."""

import logging

import pytest
import torch
from transformers import DbrxForCausalLM

from dbrx_tune.args import ModelArguments
from dbrx_tune.build import check_experts_precision
from dbrx_tune.modeling import experts as experts_module
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import DbrxGroupedExperts, set_experts_implementation, set_experts_precision
from dbrx_tune.modeling.fp8 import (
    FP8_DTYPE,
    Fp8WeightCache,
    fp8_grouped_linear,
    fp8_unsupported_reason,
    quantize_rows,
)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_rowwise_quantization_maps_each_row_max_to_the_fp8_max_and_round_trips():
    x = torch.randn(16, 64) * torch.logspace(-3, 3, 16).unsqueeze(1)  # rows six orders of magnitude apart
    q = quantize_rows(x)
    assert q.data.dtype == FP8_DTYPE and q.scale.shape == (16,)
    torch.testing.assert_close(q.data.float().abs().amax(dim=1), torch.full((16,), torch.finfo(FP8_DTYPE).max))
    restored = q.data.float() * q.scale.unsqueeze(1)
    for row, original in zip(restored, x):  # e4m3 keeps 3 mantissa bits: a few percent per row, whatever its scale
        assert _relative_error(row, original) < 0.05


def test_weight_cache_is_reused_until_the_optimizer_changes_the_weight():
    weight = torch.nn.Parameter(torch.randn(2, 8, 16))
    cache = Fp8WeightCache()
    first = cache.get("w1", weight)
    assert cache.get("w1", weight) is first  # recompute under gradient checkpointing, frozen weights: no requantize
    assert first.forward.data.shape == (2, 8, 16) and first.backward.data.shape == (2, 16, 8)
    weight.grad = torch.randn_like(weight)
    torch.optim.AdamW([weight], lr=0.1).step()
    refreshed = cache.get("w1", weight)
    assert refreshed is not first
    torch.testing.assert_close(
        refreshed.forward.data.float() * refreshed.forward.scale.unsqueeze(-1), weight.detach(), rtol=0.07, atol=1e-3
    )


def test_weight_cache_sees_updates_through_data_after_an_optimizer_step_and_keeps_frozen_weights():
    trained = torch.nn.Parameter(torch.randn(2, 8, 16))
    frozen = torch.nn.Parameter(torch.randn(2, 8, 16), requires_grad=False)
    cache = Fp8WeightCache()
    first_trained, first_frozen = cache.get("w1", trained), cache.get("w2", frozen)
    with torch.no_grad():
        trained.data.mul_(2.0)  # `.data` writes leave the parameter's version counter where it was
    assert cache.get("w1", trained) is first_trained  # not yet: within a step, forward and recompute share copies
    trained.grad = torch.zeros_like(trained)
    torch.optim.SGD([trained], lr=0.0).step()
    refreshed = cache.get("w1", trained)
    assert refreshed is not first_trained
    torch.testing.assert_close(refreshed.forward.scale, 2 * first_trained.forward.scale)
    assert cache.get("w2", frozen) is first_frozen  # an optimizer step does not touch frozen (LoRA base) weights


def test_fp8_is_unsupported_off_hopper_with_a_reason():
    assert "CUDA" in fp8_unsupported_reason(torch.device("cpu"))


def test_fp8_precision_falls_back_on_cpu_with_one_warning_and_the_same_numbers(caplog, monkeypatch):
    monkeypatch.setattr(experts_module, "_fp8_fallback_warned", False)
    torch.manual_seed(0)
    model = DbrxForCausalLM(tiny_dbrx_config()).float().eval()
    set_experts_implementation(model, "grouped")
    input_ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
    set_experts_precision(model, "fp8")
    assert {m.precision for m in model.modules() if isinstance(m, DbrxGroupedExperts)} == {"fp8"}
    with caplog.at_level(logging.WARNING), torch.no_grad():
        first = model(input_ids=input_ids).logits
        model(input_ids=input_ids)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    warnings = [r for r in caplog.records if "experts_precision='fp8' falls back" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA" in warnings[0].getMessage()
    assert not any("fp8" in key for key in model.state_dict())  # checkpoints keep only the bf16/fp32 weights


def test_fp8_precision_needs_grouped_experts():
    model = DbrxForCausalLM(tiny_dbrx_config())
    with pytest.raises(ValueError, match="grouped experts"):
        set_experts_precision(model, "fp8")
    with pytest.raises(ValueError, match="expected one of"):
        set_experts_precision(model, "fp4")


@pytest.mark.parametrize(
    "overrides, deepspeed, message",
    [
        ({"experts_implementation": "eager"}, None, "experts_implementation: grouped"),
        ({"load_in_4bit": True, "use_peft": True}, None, "load_in_4bit"),
        ({}, "recipes/deepspeed/zero3.json", "ZeRO-3"),
        ({}, "recipes/deepspeed/zero3_ep.json", "AutoEP"),
    ],
)
def test_fp8_refused_before_loading_where_it_cannot_run(overrides, deepspeed, message):
    model_args = ModelArguments(model_name_or_path="unused", experts_precision="fp8", **overrides)
    with pytest.raises(ValueError, match=message) as err:
        check_experts_precision(model_args, deepspeed)
    assert "experts_precision: fp8" in str(err.value)


def test_bf16_precision_is_never_refused():
    check_experts_precision(ModelArguments(model_name_or_path="unused"), "recipes/deepspeed/zero3_ep.json")


def _reference_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, out_dtype=None, use_fast_accum=False):
    """What `torch._scaled_grouped_mm` computes for a 2D x 3D call, in fp32 from the dequantized operands, with its
    layout contract checked: b is (experts, K, N) column-major, scales are one per row of a and per column of b."""
    assert a.dtype == b.dtype == FP8_DTYPE and a.is_contiguous()
    assert b.stride(-2) == 1, "mat2 must be column-major (a transposed view of a contiguous (E, N, K) tensor)"
    assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[-1])
    a_values = a.float() * scale_a.unsqueeze(1)
    b_values = b.float() * scale_b.unsqueeze(1)
    starts = [0, *offs.tolist()[:-1]]
    rows = [a_values[start:end] @ b_values[e] for e, (start, end) in enumerate(zip(starts, offs.tolist()))]
    return torch.cat(rows).to(out_dtype)


def test_fp8_grouped_linear_forward_and_gradients_with_the_kernel_contract_on_cpu(monkeypatch):
    """The autograd function's operands, layouts and scales, checked with a reference for the Hopper-only kernel."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _reference_scaled_grouped_mm, raising=False)
    torch.manual_seed(0)
    rows_per_expert, k, n = [5, 0, 9, 3], 32, 24
    offsets = torch.tensor(rows_per_expert).cumsum(0).to(torch.int32)
    x = torch.randn(sum(rows_per_expert), k).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(4, n, k) * 0.1).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(x.shape[0], n).to(torch.bfloat16)
    out = fp8_grouped_linear(x, weight, offsets, Fp8WeightCache(), "w1")
    out.backward(grad)

    x_ref, w_ref = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = torch.cat([rows @ w.T for rows, w in zip(x_ref.split(rows_per_expert), w_ref.unbind(0))])
    ref.backward(grad.float())
    assert _relative_error(out, ref) < 0.06
    assert _relative_error(x.grad, x_ref.grad) < 0.06
    assert _relative_error(weight.grad, w_ref.grad) < 0.01  # bf16 weight-gradient GEMM
    assert weight.grad[1].abs().sum() == 0  # the expert that got no rows gets no gradient


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or fp8_unsupported_reason(torch.device("cuda")) is not None,
    reason="needs a Hopper GPU with torch._scaled_grouped_mm",
)
@pytest.mark.parametrize("train_weight", [True, False])
def test_fp8_grouped_linear_matches_bf16_on_gpu(train_weight):
    torch.manual_seed(0)
    experts, rows_per_expert, k, n = 4, [40, 0, 100, 17], 256, 512
    offsets = torch.tensor(rows_per_expert, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(rows_per_expert), k, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(experts, n, k, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_(train_weight)
    grad = torch.randn(x.shape[0], n, device="cuda", dtype=torch.bfloat16)

    x_ref = x.float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_(train_weight)
    ref = torch.cat([rows @ w.T for rows, w in zip(x_ref.split(rows_per_expert), w_ref.unbind(0))])
    ref.backward(grad.float())

    x_fp8 = x.clone().requires_grad_()
    cache = Fp8WeightCache()
    out = fp8_grouped_linear(x_fp8, weight, offsets, cache, "w1")
    out.backward(grad)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, ref) < 0.08
    assert _relative_error(x_fp8.grad, x_ref.grad) < 0.08
    if train_weight:
        assert _relative_error(weight.grad, w_ref.grad) < 0.02  # the weight gradient stays a bf16 GEMM
        before = cache.get("w1", weight)
        torch.optim.AdamW([weight], lr=1e-2, fused=True).step()
        after = cache.get("w1", weight)
        assert after is not before  # fused CUDA AdamW: the next forward quantizes the updated weight
        torch.testing.assert_close(
            after.forward.data.float() * after.forward.scale.unsqueeze(-1),
            weight.detach().float(),
            rtol=0.07,
            atol=2e-3,
        )
    else:
        assert weight.grad is None
