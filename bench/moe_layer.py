"""One DBRX-sized MoE expert layer, forward + backward: ours against the stock loop and every peer, in one process.

Layer: d_model 6144, expert ffn 10752, 16 experts, top-4, 8192 tokens, bf16, inputs requiring grad; weights
requiring grad (full fine-tuning) or frozen (the LoRA / QLoRA case: only the input gradient is computed).

Variants, all holding the same weights and routing:
    stock              transformers' `DbrxExperts` (a Python loop over experts)
    ours               `DbrxGroupedExperts`, bf16 grouped GEMMs
    ours_fp8           the same with `experts_precision: fp8`
    peer_transformers  transformers' own `MixtralExperts` with `_experts_implementation = "grouped_mm"`
    peer_liger         liger-kernel's fused MoE (if installed; LIGER_FUSED_MOE_AUTOTUNE=0)
    torchao_fp8        our routing and SwiGLU with torchao's `_to_fp8_rowwise_then_scaled_grouped_mm` GEMMs
    *_frozen           the same with frozen expert weights
MFU is counted against a bf16 matmul ceiling measured in the same run (8192^3 product). Variants are timed in
`--repeats` interleaved runs of `--iters` steps; headline times are the medians of the runs, the ceiling is the
fastest run's rate, and the JSON keeps every run. Also checks outputs and gradients against an fp32 reference.

    python bench/moe_layer.py [--tokens 8192] [--repeats 3] [--output bench/results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from peers import LIGER_PEER, TRANSFORMERS_PEER, liger_forward, liger_fused_moe, transformers_experts
from provenance import provenance, write_result
from timing import time_ms
from transformers import DbrxConfig
from transformers.models.dbrx.modeling_dbrx import DbrxExperts

from dbrx_tune.modeling.experts import DbrxGroupedExperts, grouped_mm_supported, run_experts, set_experts_precision
from dbrx_tune.modeling.fp8 import fp8_unsupported_reason


def dbrx_ffn_config(d_model: int, ffn: int, experts: int, top_k: int):
    config = DbrxConfig(
        d_model=d_model,
        n_heads=48,
        ffn_config={"ffn_hidden_size": ffn, "moe_num_experts": experts, "moe_top_k": top_k},
    )
    return config.ffn_config


def matmul_ceiling_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def routing(tokens: int, experts: int, top_k: int, d_model: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX routing (softmax, top-k, L1-normalised weights) of random router logits."""
    logits = torch.randn(tokens, experts, device=device)
    probs = torch.softmax(logits, dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(torch.bfloat16), index


def balanced_routing(tokens: int, experts: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing that gives every expert tokens * top_k / experts rows (what the load-balancing loss drives towards),
    to randomly ordered tokens, with random L1-normalised weights. The timed runs use it because torchao's FP8 weight
    gradient needs expert groups whose sizes are multiples of 16 (without padding, which it does not support yet)."""
    if (tokens * top_k) % (16 * experts) or experts % top_k:
        raise SystemExit("balanced routing needs tokens * top_k divisible by 16 * experts and experts by top_k")
    position = torch.randperm(tokens, device=device).unsqueeze(1)
    index = (position + torch.arange(top_k, device=device) * (experts // top_k)) % experts
    weights = torch.softmax(torch.randn(tokens, top_k, device=device), dim=-1)
    return weights.to(torch.bfloat16), index


def fwd_bwd(module, forward, x, index, weights, grad):
    module.zero_grad(set_to_none=True)  # as a training step does; else each call also pays a gradient accumulation
    x.grad = None
    out = forward(x, index, weights)
    out.backward(grad)


def torchao_fp8_forward(module: DbrxGroupedExperts):
    """Our routing and fused SwiGLU with torchao's FP8 grouped GEMM (dynamic rowwise scales, every call)."""
    from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

    def base_projection(name, inputs, offsets, counts):
        weight = getattr(module, name)  # (E, out, in); torchao takes B_t (E, in, out) column-major: its transpose
        return _to_fp8_rowwise_then_scaled_grouped_mm(
            inputs.contiguous(), weight.transpose(-2, -1), offsets, pad_token_groups_for_grouped_mm=False
        )

    def forward(x, index, weights):
        return run_experts(module, x, index, weights, base_projection)

    return forward


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def check_against_fp32(stock: DbrxExperts, ours: DbrxGroupedExperts, ffn_config, tokens: int) -> dict[str, float]:
    """Outputs and gradients of both bf16 modules against the stock module in fp32 on the same weights."""
    d = ffn_config.hidden_size
    reference = DbrxExperts(ffn_config).to("cuda", torch.float32)
    with torch.no_grad():
        for name in ("w1", "v1", "w2"):
            getattr(reference.mlp, name).copy_(getattr(stock.mlp, name).float())
    weights, index = routing(tokens, ffn_config.moe_num_experts, ffn_config.moe_top_k, d, "cuda")
    x = torch.randn(1, tokens, d, device="cuda")
    grad = torch.randn(1, tokens, d, device="cuda")
    results = {}
    x_ref = x.clone().requires_grad_()
    reference(x_ref, index, weights.float()).backward(grad)
    for label, module in (("stock", stock), ("ours", ours)):
        module.zero_grad(set_to_none=True)
        x_bf16 = x.bfloat16().requires_grad_()
        out = module(x_bf16, index, weights)
        out.backward(grad.bfloat16())
        ref_out = reference(x, index, weights.float()).detach()
        results[f"out_relerr_{label}"] = relative_error(out, ref_out)
        results[f"dx_relerr_{label}"] = relative_error(x_bf16.grad, x_ref.grad)
        w1_grad = stock.mlp.w1.grad if label == "stock" else ours.w1.grad.reshape(-1, d)
        results[f"dw1_relerr_{label}"] = relative_error(w1_grad, reference.mlp.w1.grad)
    del reference
    stock.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=6144)
    parser.add_argument("--ffn", type=int, default=10752)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs; medians and spread reported")
    parser.add_argument("--output", default="bench/results/moe_layer.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe_layer.py needs a CUDA GPU")
    torch.manual_seed(0)
    ffn_config = dbrx_ffn_config(args.d_model, args.ffn, args.experts, args.top_k)
    if not grouped_mm_supported(torch.device("cuda"), torch.bfloat16):
        print("WARNING: no native grouped GEMM on this GPU; 'ours' measures the fallback loop")

    stock = DbrxExperts(ffn_config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for name in ("w1", "v1", "w2"):
            getattr(stock.mlp, name).normal_(0.0, 0.02)
    ours = DbrxGroupedExperts.from_stock(stock, ffn_config)  # w1/v1 share storage with stock
    accuracy = check_against_fp32(stock, ours, ffn_config, tokens=2048)
    peer = transformers_experts(ours, args.top_k)
    ours_fp8 = DbrxGroupedExperts.from_stock(stock, ffn_config)
    set_experts_precision(ours_fp8, "fp8")
    fp8_reason = fp8_unsupported_reason(torch.device("cuda"))
    liger = liger_fused_moe()

    def tokens_view(module):  # transformers' and liger's experts take (tokens, d)
        return lambda x, index, weights: module(x.view(-1, x.shape[-1]), index, weights).view_as(x)

    variants = {
        "stock": (stock, stock),
        "ours": (ours, ours),
        "peer_transformers": (peer, tokens_view(peer)),
    }
    if fp8_reason is None:
        variants["ours_fp8"] = (ours_fp8, ours_fp8)
        variants["torchao_fp8"] = (ours, torchao_fp8_forward(ours))
    if liger is not None:
        variants["peer_liger"] = (peer, liger_forward(liger, peer))

    weights, index = balanced_routing(args.tokens, args.experts, args.top_k, "cuda")
    x = torch.randn(1, args.tokens, args.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    errors = {}
    with torch.no_grad():
        reference = ours(x, index, weights).float()
    for label, (_module, forward) in list(variants.items()):
        try:
            out = forward(x, index, weights)
            errors[label] = round(relative_error(out.view_as(reference), reference), 5)
        except Exception as err:  # a peer that cannot run here is recorded, not fatal
            errors[label] = f"{type(err).__name__}: {err}"[:300]
            del variants[label]
    frozen_modules = {stock, ours, peer, ours_fp8}

    def set_frozen(frozen: bool) -> None:
        for module in frozen_modules:
            module.requires_grad_(not frozen)

    runs: dict[str, list[float]] = {"ceiling_tflops": []}
    for _ in range(args.repeats):  # interleaved, so a clock or thermal drift hits every variant alike
        runs["ceiling_tflops"].append(matmul_ceiling_tflops())
        for frozen in (False, True):
            set_frozen(frozen)
            for label, (module, forward) in variants.items():
                if frozen and label == "stock":
                    continue
                key = f"ms_{label}_frozen" if frozen else f"ms_{label}"
                runs.setdefault(key, []).append(
                    time_ms(lambda m=module, f=forward: fwd_bwd(m, f, x, index, weights, grad), iters=args.iters)
                )
    set_frozen(False)
    ceiling = max(runs["ceiling_tflops"])
    ms = {key: statistics.median(values) for key, values in runs.items() if key.startswith("ms_")}
    flops = 3 * 2 * args.tokens * args.top_k * 3 * args.d_model * args.ffn  # fwd + 2x bwd, three GEMMs

    def ratio(slow: str, fast: str) -> float | None:
        return round(ms[slow] / ms[fast], 3) if slow in ms and fast in ms else None

    peers_ms = {name: ms[f"ms_{name}"] for name in ("peer_transformers", "peer_liger") if f"ms_{name}" in ms}
    best_peer = min(peers_ms, key=peers_ms.get)
    tflops_ours = flops / (ms["ms_ours"] * 1e-3) / 1e12
    tflops_stock = flops / (ms["ms_stock"] * 1e-3) / 1e12
    mfu_ours_runs = [flops / (t * 1e-3) / 1e12 / ceiling for t in runs["ms_ours"]]
    result = {
        "mfu_ours": round(tflops_ours / ceiling, 4),
        "mfu_stock": round(tflops_stock / ceiling, 4),
        "speedup": ratio("ms_stock", "ms_ours"),
        "peer": {"peer_transformers": TRANSFORMERS_PEER, "peer_liger": LIGER_PEER}[best_peer],
        "ms_peer": round(peers_ms[best_peer], 2),
        "speedup_vs_peer": ratio(f"ms_{best_peer}", "ms_ours"),
        "speedup_vs_transformers_grouped_mm": ratio("ms_peer_transformers", "ms_ours"),
        "speedup_vs_liger": ratio("ms_peer_liger", "ms_ours"),
        "speedup_fp8_vs_bf16": ratio("ms_ours", "ms_ours_fp8"),
        "speedup_fp8_frozen_vs_bf16": ratio("ms_ours_frozen", "ms_ours_fp8_frozen"),
        "speedup_torchao_fp8": ratio("ms_ours", "ms_torchao_fp8"),
        "speedup_torchao_fp8_frozen": ratio("ms_ours_frozen", "ms_torchao_fp8_frozen"),
        "speedup_fp8_vs_torchao_fp8": ratio("ms_torchao_fp8", "ms_ours_fp8"),
        "fp8_unsupported_reason": fp8_reason,
        "matmul_tflops": round(ceiling, 1),
        **{key: round(value, 2) for key, value in sorted(ms.items())},
        "tflops_ours": round(tflops_ours, 1),
        "tflops_stock": round(tflops_stock, 1),
        "runs": {key: [round(v, 2) for v in values] for key, values in runs.items()},
        "mfu_ours_range": [round(min(mfu_ours_runs), 4), round(max(mfu_ours_runs), 4)],
        "speedup_range": [
            round(min(runs["ms_stock"]) / max(runs["ms_ours"]), 3),
            round(max(runs["ms_stock"]) / min(runs["ms_ours"]), 3),
        ],
        "output_relerr_vs_ours_bf16": errors,
        "shape": {
            "tokens": args.tokens,
            "d_model": args.d_model,
            "ffn": args.ffn,
            "experts": args.experts,
            "top_k": args.top_k,
            "dtype": "bfloat16",
            "pass": "forward+backward",
            "routing": "balanced (tokens * top_k / experts rows per expert), random token order and weights",
        },
        "accuracy_vs_fp32": {k: round(v, 6) for k, v in accuracy.items()},
        **provenance(torch.cuda.get_device_name()),
    }
    write_result(args.output, result)
    print(f"{'variant':28} {'ms':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for key, value in sorted(ms.items(), key=lambda item: item[1]):
        work = flops * 2 / 3 if key.endswith("_frozen") else flops  # frozen weights: no weight-gradient GEMMs
        tflops = work / (value * 1e-3) / 1e12
        print(f"{key[3:]:28} {value:8.1f} {tflops:8.1f} {tflops / ceiling:6.1%}")
    print({k: v for k, v in result.items() if k.startswith("speedup") or k in ("peer", "ms_peer")})
    print(f"output error vs ours bf16: {errors}; accuracy vs fp32 {result['accuracy_vs_fp32']}")


if __name__ == "__main__":
    main()
