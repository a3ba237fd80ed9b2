"""DbrxGroupedExperts: same numbers as transformers' stock DBRX experts, and checkpoints in DBRX's original layout."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import DbrxForCausalLM
from transformers.models.dbrx.modeling_dbrx import DbrxExperts

from dbrx_tune.modeling import experts as experts_module
from dbrx_tune.modeling import swiglu as swiglu_module
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import DbrxGroupedExperts, grouped_mm_supported, set_experts_implementation


def _tiny_model(seed: int = 0) -> DbrxForCausalLM:
    torch.manual_seed(seed)
    return DbrxForCausalLM(tiny_dbrx_config()).float().eval()


def _routing(tokens: int, config, seed: int = 1, skip_expert: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, config.moe_num_experts, generator=generator)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9  # an expert that receives no token
    weights, index = torch.topk(torch.softmax(logits, -1), config.moe_top_k, dim=-1)
    return weights, index


@pytest.mark.parametrize("skip_expert", [None, 2])
def test_grouped_experts_match_stock_outputs_and_gradients(skip_expert):
    ffn_config = tiny_dbrx_config().ffn_config
    torch.manual_seed(0)
    stock = DbrxExperts(ffn_config)
    for name in ("w1", "v1", "w2"):
        torch.nn.init.normal_(getattr(stock.mlp, name), std=0.05)
    ours = DbrxGroupedExperts.from_stock(DbrxExperts(ffn_config), ffn_config)
    ours.load_state_dict(stock.state_dict())  # through the original-layout load hook
    weights, index = _routing(12, ffn_config, skip_expert=skip_expert)
    x = torch.randn(2, 6, ffn_config.hidden_size)
    grad_out = torch.randn(2, 6, ffn_config.hidden_size)

    results = []
    for module in (stock, ours):
        inputs = x.clone().requires_grad_()
        top_w = weights.clone().requires_grad_()
        out = module(inputs, index, top_w)
        out.backward(grad_out)
        results.append((out, inputs.grad, top_w.grad, module.state_dict(keep_vars=False)))
    (out_s, dx_s, dw_s, _), (out_o, dx_o, dw_o, _) = results
    torch.testing.assert_close(out_o, out_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_o, dx_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw_o, dw_s, rtol=1e-5, atol=1e-6)
    for name in ("w1", "v1", "w2"):
        stock_grad = getattr(stock.mlp, name).grad
        ours_grad = experts_module.to_original_layout(name, getattr(ours, name).grad)
        torch.testing.assert_close(ours_grad, stock_grad, rtol=1e-5, atol=1e-6)


def test_swap_keeps_values_storage_dtype_and_requires_grad():
    model = _tiny_model().to(torch.bfloat16)
    stock_mlp = model.transformer.blocks[0].ffn.experts.mlp
    w1_ptr, w2_before = stock_mlp.w1.data_ptr(), stock_mlp.w2.detach().clone()
    stock_mlp.v1.requires_grad_(False)
    set_experts_implementation(model, "grouped")
    ours = model.transformer.blocks[0].ffn.experts
    assert isinstance(ours, DbrxGroupedExperts)
    assert ours.w1.data_ptr() == w1_ptr  # a view, not a copy
    assert ours.w1.dtype == torch.bfloat16 and ours.w1.shape == (4, 128, 64) and ours.w2.shape == (4, 64, 128)
    assert not ours.v1.requires_grad and ours.w1.requires_grad
    assert torch.equal(experts_module.to_original_layout("w2", ours.w2), w2_before)


def test_swapped_model_matches_stock_logits_loss_and_router_aux_loss():
    model = _tiny_model()
    ids = torch.randint(0, 1000, (2, 10))
    ref = model(ids, labels=ids, output_router_logits=True)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "experts" not in n}
    model.zero_grad()
    set_experts_implementation(model, "grouped")
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert len(out.router_logits) == 2
    for name, param in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-4, atol=1e-6)


def test_save_pretrained_writes_original_names_and_stock_model_loads_it(tmp_path):
    model = set_experts_implementation(_tiny_model(), "grouped")
    ids = torch.randint(0, 1000, (1, 8))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["transformer.blocks.0.ffn.experts.mlp.w2"].shape == (4 * 128, 64)
    assert not any(key.endswith("experts.w1") for key in tensors)
    stock = DbrxForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock.transformer.blocks[0].ffn.experts) is DbrxExperts
    torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_stock_checkpoint_loads_into_swapped_model(tmp_path):
    stock = _tiny_model(seed=3)
    stock.save_pretrained(tmp_path)
    fresh = set_experts_implementation(_tiny_model(seed=4), "grouped")
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state.get("lm_head.weight", state["transformer.wte.weight"])
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(0, 1000, (1, 8))
    torch.testing.assert_close(fresh(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_shape_names_the_tensor():
    model = set_experts_implementation(_tiny_model(), "grouped")
    state = model.state_dict()
    state["transformer.blocks.1.ffn.experts.mlp.v1"] = torch.zeros(3 * 128, 64)
    with pytest.raises(ValueError, match=r"transformer\.blocks\.1\.ffn\.experts\.mlp\.v1.*\(384, 64\)"):
        model.load_state_dict(state)


def test_fallback_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(experts_module, "_fallback_warned", False)
    model = set_experts_implementation(_tiny_model(), "grouped")
    ids = torch.randint(0, 1000, (1, 6))
    with caplog.at_level(logging.WARNING, logger="dbrx_tune.modeling.experts"):
        model(ids)
        model(ids)
    warnings = [r for r in caplog.records if "grouped_mm" in r.getMessage()]
    assert len(warnings) == 1 and "cpu" in warnings[0].getMessage()


def test_eager_restores_stock_experts_with_same_logits():
    model = _tiny_model()
    ids = torch.randint(0, 1000, (1, 6))
    ref = model(ids).logits
    set_experts_implementation(model, "grouped")
    set_experts_implementation(model, "eager")
    assert type(model.transformer.blocks[1].ffn.experts) is DbrxExperts
    torch.testing.assert_close(model(ids).logits, ref)


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="experts_implementation='fast'"):
        set_experts_implementation(_tiny_model(), "fast")


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and grouped_mm_supported(torch.device("cuda"), torch.bfloat16)),
    reason="needs torch._grouped_mm (CUDA compute capability >= 9.0)",
)
def test_grouped_mm_path_matches_fp32_stock_on_gpu():
    ffn_config = tiny_dbrx_config().ffn_config
    torch.manual_seed(0)
    stock = DbrxExperts(ffn_config).cuda()
    for name in ("w1", "v1", "w2"):
        torch.nn.init.normal_(getattr(stock.mlp, name), std=0.05)
    ours = DbrxGroupedExperts.from_stock(DbrxExperts(ffn_config).cuda(), ffn_config)
    ours.load_state_dict(stock.state_dict())
    ours.to(torch.bfloat16)
    weights, index = _routing(256, ffn_config)
    weights, index = weights.cuda(), index.cuda()
    x = torch.randn(1, 256, ffn_config.hidden_size, device="cuda")
    ref = stock(x, index, weights)
    x_bf16 = x.bfloat16().requires_grad_()
    out = ours(x_bf16, index, weights.bfloat16())
    out.float().sum().backward()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
    assert ours.w1.grad is not None and torch.isfinite(ours.w1.grad).all()


def _deltas(num_experts: int, in_features: int, outs: tuple[int, ...], ranks: tuple[int, ...], device="cpu"):
    generator = torch.Generator().manual_seed(5)
    return [
        experts_module.LowRankDelta(
            torch.randn(num_experts, r, in_features, generator=generator).to(device).requires_grad_(),
            torch.randn(num_experts, out, r, generator=generator).to(device).requires_grad_(),
            scaling,
        )
        for out, r, scaling in zip(outs, ranks, (0.5, 2.0))
    ]


def _per_expert_low_rank(x, delta, counts):
    chunks = [rows @ down.T @ up.T * delta.scaling for rows, down, up in zip(x.split(counts), delta.down, delta.up)]
    return torch.cat(chunks)


@pytest.mark.parametrize("ranks", [(4, 4), (3, 5)])
def test_low_rank_terms_of_deltas_sharing_an_input_match_per_expert_math(ranks):
    counts = [3, 0, 5, 4]  # an expert with no rows too
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    deltas = _deltas(4, 16, (24, 12), ranks)
    inputs = [x] + [d.down for d in deltas] + [d.up for d in deltas]
    terms = experts_module.low_rank_terms(x, deltas, offsets, counts)
    grads = torch.autograd.grad(sum((t * t).sum() for t in terms), inputs)
    expected = [_per_expert_low_rank(x, delta, counts) for delta in deltas]
    expected_grads = torch.autograd.grad(sum((t * t).sum() for t in expected), inputs)
    for got, want in zip(terms, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gather_backward_sums_each_tokens_copies_like_indexing():
    top_k_index = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1], [3, 0]])
    routed = experts_module.route_tokens(top_k_index, num_experts=4)
    x = torch.randn(5, 8, requires_grad=True)
    grad = torch.randn(10, 8)
    ours = experts_module.gather_sorted_rows(x, routed, top_k=2)
    (dx,) = torch.autograd.grad(ours, x, grad)
    reference = x[routed.token_index]
    (dx_ref,) = torch.autograd.grad(reference, x, grad)
    assert torch.equal(ours, reference)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and grouped_mm_supported(torch.device("cuda"), torch.bfloat16)),
    reason="needs torch._grouped_mm (CUDA compute capability >= 9.0)",
)
def test_grouped_low_rank_terms_match_the_loop_on_gpu():
    counts = [40, 0, 88, 128]
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 64, device="cuda", dtype=torch.bfloat16)
    deltas = _deltas(4, 64, (128, 96), (16, 16), device="cuda")  # fp32 factors, as PEFT keeps them
    grouped = experts_module.low_rank_terms(x, deltas, offsets, None)  # column slices of one down projection
    loop = experts_module.low_rank_terms(x.float(), deltas, offsets, counts)
    for got, want in zip(grouped, loop):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


def _swiglu_inputs(rows: int, cols: int, dtype, device="cpu", seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    gate = (torch.randn(rows, cols, generator=generator) * 3).to(device, dtype).requires_grad_()
    up = torch.randn(rows, cols, generator=generator).to(device, dtype).requires_grad_()
    weights = torch.rand(rows, generator=generator).to(device, dtype).requires_grad_()
    return gate, up, weights


def _eager_swiglu(gate, up, weights):
    return torch.nn.functional.silu(gate) * up * weights.unsqueeze(-1)


def test_fused_swiglu_function_gradients_are_exact_in_float64():
    gate, up, weights = _swiglu_inputs(5, 7, torch.float64)
    fused = swiglu_module.FusedSwiGLU.apply(gate, up, weights, swiglu_module.EagerSwiGLUMath)
    torch.testing.assert_close(fused, _eager_swiglu(gate, up, weights))
    assert torch.autograd.gradcheck(
        lambda g, u, w: swiglu_module.FusedSwiGLU.apply(g, u, w, swiglu_module.EagerSwiGLUMath), (gate, up, weights)
    )


def test_fused_swiglu_in_bfloat16_matches_the_eager_formula():
    gate, up, weights = _swiglu_inputs(64, 96, torch.bfloat16)
    grad = torch.randn(64, 96).bfloat16()
    fused = swiglu_module.FusedSwiGLU.apply(gate, up, weights, swiglu_module.EagerSwiGLUMath)
    got = torch.autograd.grad(fused, (gate, up, weights), grad)
    inputs64 = [t.detach().double().requires_grad_() for t in (gate, up, weights)]
    reference = _eager_swiglu(*inputs64)
    want = torch.autograd.grad(reference, inputs64, grad.double())
    assert fused.dtype == torch.bfloat16
    for tensor, ref in zip((fused, *got), (reference, *want)):
        assert ((tensor.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_experts_with_the_fused_function_match_eager_under_checkpointing_and_lora(monkeypatch):
    """The whole expert path (LoRA on all three projections, activation checkpointing) through `FusedSwiGLU`, its
    math in PyTorch ops here, gives the eager formula's outputs and gradients."""
    ffn_config = tiny_dbrx_config().ffn_config
    torch.manual_seed(0)
    module = DbrxGroupedExperts(ffn_config)
    for name in ("w1", "v1", "w2"):
        torch.nn.init.normal_(getattr(module, name), std=0.05)
    d, f, n = ffn_config.hidden_size, ffn_config.ffn_hidden_size, ffn_config.moe_num_experts
    lora = dict(zip(("w1", "v1", "w2"), _deltas(n, d, (f, f), (4, 4)) + _deltas(n, f, (d,), (4,))))
    lora = {name: [delta] for name, delta in lora.items()}
    weights, index = _routing(12, ffn_config)
    x = torch.randn(2, 6, d)
    grad_out = torch.randn(2, 6, d)
    trainable = [module.w1, module.v1, module.w2] + [
        t for deltas in lora.values() for delta in deltas for t in delta[:2]
    ]

    def run(fused: bool):
        monkeypatch.setattr(
            swiglu_module, "_fused_swiglu_math", lambda t: swiglu_module.EagerSwiGLUMath if fused else None
        )
        inputs, top_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(module, inputs, index, top_w, lora, use_reentrant=False)
        return [out, *torch.autograd.grad(out, [inputs, top_w, *trainable], grad_out)]

    for got, want in zip(run(fused=True), run(fused=False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [0, 3, 300])
def test_fused_swiglu_kernels_match_eager_on_gpu(dtype, rows):
    pytest.importorskip("triton")
    cols = 1500  # not a multiple of the kernel's block
    gate, up, weights = _swiglu_inputs(rows, cols, dtype, device="cuda")
    grad = torch.randn(rows, cols, device="cuda").to(dtype)
    fused = swiglu_module.swiglu(gate, up, torch.nn.SiLU(), weights)
    assert fused.grad_fn is not None and type(fused.grad_fn).__name__.startswith("FusedSwiGLU")
    got = torch.autograd.grad(fused, (gate, up, weights), grad)
    inputs64 = [t.detach().double().requires_grad_() for t in (gate, up, weights)]
    reference = _eager_swiglu(*inputs64)
    want = torch.autograd.grad(reference, inputs64, grad.double())
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for tensor, ref in zip((fused, *got), (reference, *want)):
        assert tensor.dtype == dtype and tensor.shape == ref.shape
        if rows:
            assert ((tensor.double() - ref).norm() / ref.norm()).item() < tolerance


def test_grouped_experts_accept_a_batch_without_tokens():
    """An empty micro-batch (e.g. a rank's share of a short last batch) goes through forward and backward."""
    config = tiny_dbrx_config()
    module = DbrxGroupedExperts(config.ffn_config)
    for weight in (module.w1, module.v1, module.w2):
        torch.nn.init.normal_(weight)
    x = torch.randn(1, 0, config.d_model, requires_grad=True)
    top_k = config.ffn_config.moe_top_k
    top_k_index = torch.zeros(0, top_k, dtype=torch.long)
    top_k_weights = torch.zeros(0, top_k)
    out = module(x, top_k_index, top_k_weights)
    assert out.shape == (1, 0, config.d_model)
    out.sum().backward()
    assert x.grad.shape == x.shape
