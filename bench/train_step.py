"""Training step of a DBRX-width model: transformers' stock experts loop vs `DbrxGroupedExperts`, full and LoRA.

Model: DBRX's full width (d_model 6144, 48 heads / 8 KV heads, 16 experts top-4, expert ffn 10752, vocab 100352,
clip_qkv 8, RoPE 500000) with only a few layers (default 4), random init, bf16 weights, SDPA attention.

What one timed step is: the work of one SFTTrainer optimisation step without the data loader, i.e. the path of
`Trainer.compute_loss` (model forward with labels and `output_router_logits=True`, so the DBRX router
load-balancing loss is added as TRL does after `sync_moe_config`), `loss.backward()` with gradient checkpointing
(non-reentrant, as the recipes enable it), a fused torch AdamW step (the HF Trainer's default optimiser) and
`zero_grad(set_to_none=True)`. Steps are timed with CUDA events after warm-up, in `--repeats` runs of `--steps`
steps; the step time is the median of the runs' medians (their spread is reported), tokens/s = batch * seq_len / step
time. Peak memory is `torch.cuda.max_memory_allocated` over the warm-up and timed steps (weights, gradients, optimiser
state and activations).

Modes (same seed, so stock and ours start from the same weights and the same routing):
    stock_full   transformers `DbrxExperts` (Python loop over experts), all parameters trained
    ours_full    `set_experts_implementation(model, "grouped")`, all parameters trained
    stock_lora   PEFT LoRA on attention (Wqkv, out_proj) only: stock transformers + PEFT cannot put a LoRA per
                 expert on DBRX's fused 2D experts, so the stock baseline trains less than ours
    ours_lora    `apply_expert_lora`: LoRA on attention and one LoRA per expert on w1/v1/w2 (grouped GEMMs)
    ours_lora_attention   grouped experts with the stock baseline's LoRA (attention only): same work as stock_lora
    peer_full    transformers' own grouped-GEMM experts (`MixtralExperts`, grouped_mm) holding the DBRX weights
    peer_lora    PEFT's LoRA on attention and, through `target_parameters`, on those experts (same targets as ours)
    ours_full_fp8, ours_lora_fp8   ours with `experts_precision: fp8` (Hopper only)
    ours_full_logits   ours_full with the model's own forward (full bf16 logits, fp32 cross-entropy)
With `--lm-head fused` (the default) every other mode computes the loss the way TRL 1.16's trainers do: through TRL's
fused LM head (`trl.trainer.utils.add_fused_lm_head`, chunked log-probabilities, no full logits), which TRL adds to
stock models too; `--lm-head model` runs every mode on the model's own forward (the runs recorded before 2026-12-02).

    python bench/train_step.py [--layers 4] [--batch 2] [--seq-len 4096] [--output bench/results/train_step.json]
    python bench/train_step.py --smoke --output /tmp/train_step.json    # tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time

import torch
from peers import TRANSFORMERS_PEER, peft_lora_on_transformers_experts, use_transformers_experts
from provenance import provenance, write_result
from transformers import DbrxConfig, DbrxForCausalLM
from trl.trainer.utils import add_fused_lm_head

from dbrx_tune.modeling.config import dbrx_base_config, tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation, set_experts_precision
from dbrx_tune.modeling.lora import apply_expert_lora
from dbrx_tune.modeling.moe_loss import sync_moe_config

logger = logging.getLogger("bench.train_step")

MODES = (
    "stock_full",
    "ours_full",
    "peer_full",
    "ours_full_fp8",
    "stock_lora",
    "ours_lora",
    "ours_lora_attention",
    "peer_lora",
    "ours_lora_fp8",
    "ours_full_logits",
)


def dbrx_width_config(n_layers: int, seq_len: int) -> DbrxConfig:
    """databricks/dbrx-base's shape with `n_layers` layers."""
    config = dbrx_base_config(n_layers, max_seq_len=max(seq_len, 4096))
    return sync_moe_config(config)


def uses_fused_head(mode: str, lm_head: str) -> bool:
    return lm_head == "fused" and not mode.endswith("_logits")


def build_model(
    config: DbrxConfig, mode: str, device: torch.device, dtype: torch.dtype, lora_r: int, seed: int, lm_head: str
):
    """Random-init model for `mode`, built directly on `device` in `dtype`; returns (model, trainable params)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DbrxForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if uses_fused_head(mode, lm_head):
        add_fused_lm_head(model)  # before PEFT wraps it, as TRL's trainers do
    if not mode.startswith("stock"):
        set_experts_implementation(model, "grouped")
    if mode.endswith("_fp8"):
        set_experts_precision(model, "fp8")
    if mode.startswith("peer"):
        use_transformers_experts(model)
        if mode == "peer_lora":
            model = peft_lora_on_transformers_experts(model, lora_r)
    elif "lora" in mode:
        target_experts = mode in ("ours_lora", "ours_lora_fp8")
        model = apply_expert_lora(model, r=lora_r, alpha=2 * lora_r, target_experts=target_experts)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(config: DbrxConfig, mode: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Build, warm up and time one mode; everything it allocated is freed before it returns."""
    build_start = time.perf_counter()
    model, trainable = build_model(config, mode, device, dtype, args.lora_r, args.seed, args.lm_head)
    head_kwargs = {"fused_lm_head": True} if uses_fused_head(mode, args.lm_head) else {}
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
        for _ in range(args.warmup + args.steps * args.repeats)
    ]
    synchronize(device)
    build_s = time.perf_counter() - build_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(input_ids: torch.Tensor) -> float:
        # model and optimizer are deleted at the end of run_mode, which pyflakes reads as undefined here
        loss = model(input_ids=input_ids, labels=input_ids, output_router_logits=True, **head_kwargs).loss  # noqa: F821
        loss.backward()
        optimizer.step()  # noqa: F821
        optimizer.zero_grad(set_to_none=True)  # noqa: F821
        return loss.detach()

    losses, times_ms = [], []
    for index, input_ids in enumerate(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(input_ids))
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            losses.append(step(input_ids))
            elapsed = (time.perf_counter() - began) * 1e3
        if index >= args.warmup:
            times_ms.append(elapsed)
    # `repeats` timed loops of `steps` steps each: the headline is the median of the loops' medians, and the
    # loops' spread says whether a difference between modes is more than noise.
    run_medians = [statistics.median(times_ms[i : i + args.steps]) for i in range(0, len(times_ms), args.steps)]
    step_ms = statistics.median(run_medians)
    result = {
        "step_ms": round(step_ms, 1),
        "step_ms_runs": [round(t, 1) for t in run_medians],
        "spread_pct": round(100 * (max(run_medians) - min(run_medians)) / step_ms, 2),
        "step_ms_all": [round(t, 1) for t in times_ms],
        "tokens_per_s": round(args.batch * args.seq_len / (step_ms * 1e-3), 1),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "losses": [round(float(loss), 4) for loss in losses],
        "build_s": round(build_s, 1),
    }
    if device.type == "cuda":
        result["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
    del model, trainable, optimizer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median and spread reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument(
        "--lm-head", choices=("fused", "model"), default="fused", help="TRL's fused LM head, or the model's forward"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny DBRX on the CPU in fp32: checks the script runs")
    parser.add_argument(
        "--output", default=None, help="JSON path (default bench/results/train_step.json; none with --smoke)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected a subset of {MODES}")

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # tiny matrices: extra threads only spin (seconds per step on a busy machine)
        config = sync_moe_config(
            tiny_dbrx_config(
                n_layers=args.layers, vocab_size=1024, pad_token_id=1000, bos_token_id=1001, eos_token_id=1001
            )
        )
        args.seq_len, args.batch, args.warmup, args.steps, args.lora_r = min(args.seq_len, 32), 1, 1, 1, 8
        args.repeats = 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/train_step.py needs a CUDA GPU (or --smoke for the CPU check)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = dbrx_width_config(args.layers, args.seq_len)
    output = args.output or (None if args.smoke else "bench/results/train_step.json")

    results = {}
    for mode in modes:
        results[mode] = run_mode(config, mode, args, device, dtype)
        logger.warning("%s: %s", mode, results[mode])

    def speedup(stock: str, ours: str) -> float | None:
        if stock in results and ours in results:
            return round(results[stock]["step_ms"] / results[ours]["step_ms"], 3)
        return None

    def speedup_range(stock: str, ours: str) -> list[float] | None:
        """Slowest-to-fastest speedup over the timed runs: stock's fastest run / ours' slowest, and the reverse."""
        if stock in results and ours in results:
            stock_runs, ours_runs = results[stock]["step_ms_runs"], results[ours]["step_ms_runs"]
            return [round(min(stock_runs) / max(ours_runs), 3), round(max(stock_runs) / min(ours_runs), 3)]
        return None

    def pick(mode: str, key: str):
        return results.get(mode, {}).get(key)

    summary = {
        "peer": f"{TRANSFORMERS_PEER} (+ PEFT target_parameters LoRA for peer_lora)",
        "speedup_full_vs_peer": speedup("peer_full", "ours_full"),
        "speedup_lora_vs_peer": speedup("peer_lora", "ours_lora"),
        "speedup_full_fp8": speedup("stock_full", "ours_full_fp8"),
        "speedup_lora_fp8": speedup("stock_lora", "ours_lora_fp8"),
        "speedup_full_fp8_vs_bf16": speedup("ours_full", "ours_full_fp8"),
        "speedup_lora_fp8_vs_bf16": speedup("ours_lora", "ours_lora_fp8"),
        "speedup_full_fp8_vs_peer": speedup("peer_full", "ours_full_fp8"),
        "speedup_lora_fp8_vs_peer": speedup("peer_lora", "ours_lora_fp8"),
        "speedup_full": speedup("stock_full", "ours_full"),
        "speedup_lora": speedup("stock_lora", "ours_lora"),
        "speedup_lora_same_targets": speedup("stock_lora", "ours_lora_attention"),
        "speedup_full_range": speedup_range("stock_full", "ours_full"),
        "speedup_lora_range": speedup_range("stock_lora", "ours_lora"),
        "tokens_per_s_ours": pick("ours_full", "tokens_per_s"),
        "tokens_per_s_stock": pick("stock_full", "tokens_per_s"),
        "peak_gb_ours": pick("ours_full", "peak_gb"),
        "peak_gb_ours_logits": pick("ours_full_logits", "peak_gb"),
        "lm_head": args.lm_head,
        "peak_gb_stock": pick("stock_full", "peak_gb"),
        "modes": results,
        "shape": {
            "layers": config.n_layers,
            "d_model": config.d_model,
            "n_heads": config.n_heads,
            "kv_n_heads": config.attn_config.kv_n_heads,
            "experts": config.ffn_config.moe_num_experts,
            "top_k": config.ffn_config.moe_top_k,
            "ffn": config.ffn_config.ffn_hidden_size,
            "vocab": config.vocab_size,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "dtype": str(dtype),
            "lora_r": args.lora_r,
            "lora_alpha": 2 * args.lora_r,
            "gradient_checkpointing": "non-reentrant",
            "steps_per_run": args.steps,
            "runs": args.repeats,
            "optimizer": "torch AdamW (fused on CUDA)",
            "router_aux_loss": config.ffn_config.moe_loss_weight,
        },
        **provenance(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
    }
    if output:
        write_result(output, summary)
    print(f"{'mode':22} {'step ms':>9} {'spread':>7} {'tokens/s':>10} {'peak GB':>8} {'trainable':>14}")
    for mode, row in results.items():
        peak = row.get("peak_gb")
        print(
            f"{mode:22} {row['step_ms']:9.1f} {row['spread_pct']:6.1f}% {row['tokens_per_s']:10.1f} "
            f"{peak if peak is not None else '-':>8} {row['trainable_params']:14,d}"
        )
    print(
        f"speedup full {summary['speedup_full']}x (runs {summary['speedup_full_range']}), LoRA "
        f"{summary['speedup_lora']}x (runs {summary['speedup_lora_range']}) "
        f"(same LoRA targets as stock: {summary['speedup_lora_same_targets']}x)"
    )


if __name__ == "__main__":
    main()
