"""ZeRO-3 with leaf MoE blocks vs ZeRO-3 + AutoEP (EP=2) on 2 GPUs, on a DBRX-width few-layer model.

    python bench/ep_2gpu.py --layers 2 --seq 2048 --steps 8      # launches both runs with torch.distributed.run

Each run builds the model the way the loader does (random init under the HF DeepSpeed config, grouped experts,
`prepare_for_deepspeed`), trains with DeepSpeed (bf16, torch AdamW) on the same token batches, and reports
losses, tokens/s (steps after the warm-up) and peak GPU memory (max_memory_allocated). Writes
bench/results/ep_2gpu.json and, with the planner's prediction for both configurations, planner_check.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ds_config(mode: str, world: int) -> dict:
    config = {
        "bf16": {"enabled": True},
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 0},
    }
    if mode == "ep":
        config["expert_parallel"] = {"enabled": True, "autoep_size": world, "preset_model": "dbrx"}
    return config


def bench_config(layers: int):
    from dbrx_tune.modeling.config import tiny_dbrx_config
    from dbrx_tune.modeling.moe_loss import sync_moe_config

    config = tiny_dbrx_config(
        d_model=6144, n_heads=48, n_layers=layers, max_seq_len=32768,
        attn_config={"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": 500000.0},
        ffn_config={"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4, "moe_jitter_eps": None,
                    "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
    )
    return sync_moe_config(config)


def worker(args) -> None:
    import deepspeed
    from transformers import DbrxForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from dbrx_tune.distributed import apply_experts_implementation, prepare_for_deepspeed

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.cuda.set_device(rank)
    config = ds_config(args.mode, world)
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841
    torch.manual_seed(0)
    model = DbrxForCausalLM._from_config(bench_config(args.layers), dtype=torch.bfloat16, attn_implementation="sdpa")
    apply_experts_implementation(model, "grouped")
    prepare_for_deepspeed(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(2, 100000, (args.steps, world, args.seq), generator=generator)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        batch = data[step, rank:rank + 1].cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        total = loss.detach().float().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 1024**3, device="cuda")
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    timed = times[args.warmup:]
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "tokens_per_s": world * args.seq * len(timed) / sum(timed),
                       "peak_gb": peak.item(), "step_s": times}, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    runs = {}
    for mode in ("zero3", "ep"):
        out = os.path.join(args.results, f".ep_2gpu_{mode}.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                        "--mode", mode, "--out", out, "--layers", str(args.layers), "--seq", str(args.seq),
                        "--steps", str(args.steps), "--warmup", str(args.warmup)], check=True)
        with open(out, encoding="utf-8") as handle:
            runs[mode] = json.load(handle)
        os.remove(out)
    zero3, ep = runs["zero3"], runs["ep"]
    command = f"python bench/ep_2gpu.py --layers {args.layers} --seq {args.seq} --steps {args.steps}"
    result = {
        "tokens_per_s_zero3": round(zero3["tokens_per_s"], 1), "tokens_per_s_ep": round(ep["tokens_per_s"], 1),
        "speedup": round(ep["tokens_per_s"] / zero3["tokens_per_s"], 3),
        "peak_gb_zero3": round(zero3["peak_gb"], 2), "peak_gb_ep": round(ep["peak_gb"], 2),
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(zero3["losses"], ep["losses"])),
        "losses_zero3": zero3["losses"], "losses_ep": ep["losses"],
        "gpu": f"2x {torch.cuda.get_device_name(0)}", "command": command,
        "model": f"DBRX width (d_model 6144, 16 experts x ffn 10752, top-4), {args.layers} layers, bf16",
        "date": datetime.date.today().isoformat(),
    }
    with open(os.path.join(args.results, "ep_2gpu.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)

    from dbrx_tune.plan import ModelShape, plan

    config = bench_config(args.layers)
    shape = ModelShape(d_model=6144, n_layers=args.layers, n_heads=48, kv_heads=8, vocab=config.vocab_size,
                       ffn=10752, experts=16, top_k=4)
    recipe = {"max_length": args.seq, "per_device_train_batch_size": 1, "gradient_checkpointing": False}
    check = {}
    for mode, measured in (("zero3_leaf", zero3["peak_gb"]), ("zero3_ep2", ep["peak_gb"])):
        predicted = plan(recipe, shape, gpus=2, gpu_memory_gb=141, ds_config=ds_config(
            "ep" if mode == "zero3_ep2" else "zero3", 2)).per_gpu_gb
        check[mode] = {"predicted_gb": predicted, "measured_gb": round(measured, 2),
                       "rel_error": round(abs(predicted - measured) / measured, 3)}
    check.update(command=command, measured="torch.cuda.max_memory_allocated, max over ranks", gpu=result["gpu"],
                 date=result["date"])
    with open(os.path.join(args.results, "planner_check.json"), "w", encoding="utf-8") as handle:
        json.dump(check, handle, indent=2)
    print(json.dumps(result, indent=2))
    print(json.dumps(check, indent=2))


if __name__ == "__main__":
    main()
