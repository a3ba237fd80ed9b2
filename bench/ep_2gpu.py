"""ZeRO-3 with leaf MoE blocks vs ZeRO-3 + AutoEP (EP=2) on 2 GPUs, on a DBRX-width few-layer model.

    python bench/ep_2gpu.py --layers 2 --configs recipe,short      # launches each run with torch.distributed.run

Configurations (`--configs`, comma-separated; the first one fills the JSON's top-level keys):
  recipe  what recipes/dbrx_sft.yaml trains with: sequence 4096, micro-batch 1, 8 gradient-accumulation steps,
          non-reentrant activation checkpointing;
  short   sequence 2048, no accumulation, no checkpointing (the first measurement, kept for comparison: an
          optimizer step after every 2048 tokens makes the step, not the layers, dominate).
Each run builds the model the way the loader does (random init under the HF DeepSpeed config, grouped experts,
`prepare_for_deepspeed`), trains with DeepSpeed (bf16, torch AdamW) on the same token batches, and reports
losses, tokens/s (optimizer steps after the warm-up), the forward / backward / optimizer-step split and peak GPU
memory (max_memory_allocated, max over ranks). Writes bench/results/ep_2gpu.json and, with the planner's
prediction for every configuration, planner_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from provenance import provenance, write_result  # noqa: E402  (bench/, this script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


CONFIGS = {
    "recipe": {"seq": 4096, "grad_accum": 8, "checkpointing": True},
    "short": {"seq": 2048, "grad_accum": 1, "checkpointing": False},
}


def ds_config(mode: str, world: int, grad_accum: int = 1, ep_options: dict | None = None) -> dict:
    config = {
        "bf16": {"enabled": True},
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": world * grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 0},
    }
    if mode == "ep":
        config["expert_parallel"] = {"enabled": True, "autoep_size": world, "preset_model": "dbrx",
                                     **(ep_options or {})}
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
    config = ds_config(args.mode, world, args.grad_accum, json.loads(args.ep_options))
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841
    torch.manual_seed(0)
    model = DbrxForCausalLM._from_config(bench_config(args.layers), dtype=torch.bfloat16, attn_implementation="sdpa")
    apply_experts_implementation(model, "grouped")
    prepare_for_deepspeed(model, config)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1)
    micro_steps = args.steps * args.grad_accum
    data = torch.randint(2, 100000, (micro_steps, world, args.seq), generator=generator)
    losses, step_times, split = [], [], {"forward": 0.0, "backward": 0.0, "step": 0.0}
    torch.cuda.reset_peak_memory_stats()
    profiler = None
    for step in range(args.steps):
        if args.profile and step == args.warmup:  # the first timed optimizer step, on every rank
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiler.start()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for micro in range(args.grad_accum):
            batch = data[step * args.grad_accum + micro, rank:rank + 1].cuda()
            mark = _timed(split, "forward", None)
            loss = engine(input_ids=batch, labels=batch).loss
            mark = _timed(split, "backward", mark)
            engine.backward(loss)
            mark = _timed(split, "step", mark)
            engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            _timed(split, None, mark)
            total = loss.detach().float().clone()
            torch.distributed.all_reduce(total)
            losses.append(total.item() / world)
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        if step + 1 == args.warmup:
            split = dict.fromkeys(split, 0.0)
        if profiler is not None and step == args.warmup:
            profiler.stop()
            if rank == 0:
                with open(args.profile, "w", encoding="utf-8") as handle:
                    handle.write(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40))
            profiler = None
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 1024**3, device="cuda")
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    timed = step_times[args.warmup:]
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "tokens_per_s": world * args.seq * args.grad_accum * len(timed) / sum(timed),
                       "peak_gb": peak.item(), "step_s": step_times,
                       "split_s_per_step": {k: v / len(timed) for k, v in split.items()}}, handle)


def _timed(split: dict, phase: str | None, mark: tuple | None) -> tuple:
    """Close the running phase (device-synchronised) and open `phase`; returns the new (phase, start) mark."""
    torch.cuda.synchronize()
    now = time.perf_counter()
    if mark is not None:
        split[mark[0]] += now - mark[1]
    return (phase, now)


def run_pair(args, name: str, shape: dict) -> dict:
    """Both modes of one configuration, each in its own 2-process launch; returns their worker results."""
    runs = {}
    for mode in ("zero3", "ep"):
        out = os.path.join(args.results, f".ep_2gpu_{name}_{mode}.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus), __file__,
                        "--mode", mode, "--out", out, "--layers", str(args.layers), "--seq", str(shape["seq"]),
                        "--grad-accum", str(shape["grad_accum"]), "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--ep-options", args.ep_options]
                       + (["--checkpointing"] if shape["checkpointing"] else []),
                       check=True)
        with open(out, encoding="utf-8") as handle:
            runs[mode] = json.load(handle)
        os.remove(out)
    zero3, ep = runs["zero3"], runs["ep"]
    return {
        **shape,
        "tokens_per_s_zero3": round(zero3["tokens_per_s"], 1), "tokens_per_s_ep": round(ep["tokens_per_s"], 1),
        "speedup": round(ep["tokens_per_s"] / zero3["tokens_per_s"], 3),
        "peak_gb_zero3": round(zero3["peak_gb"], 2), "peak_gb_ep": round(ep["peak_gb"], 2),
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(zero3["losses"], ep["losses"])),
        "split_s_per_step_zero3": zero3["split_s_per_step"], "split_s_per_step_ep": ep["split_s_per_step"],
        "losses_zero3": zero3["losses"], "losses_ep": ep["losses"],
    }


def planner_check(name: str, shape: dict, measured: dict, layers: int, gpus: int) -> dict:
    """The memory planner's per-GPU prediction for both modes of one configuration, next to the measured peaks."""
    from dbrx_tune.plan import ModelShape, plan

    config = bench_config(layers)
    model_shape = ModelShape(d_model=6144, n_layers=layers, n_heads=48, kv_heads=8, vocab=config.vocab_size,
                             ffn=10752, experts=16, top_k=4)
    recipe = {"max_length": shape["seq"], "per_device_train_batch_size": 1,
              "gradient_checkpointing": shape["checkpointing"]}
    check = {}
    for mode, key in (("zero3_leaf", "zero3"), (f"zero3_ep{gpus}", "ep")):
        predicted = plan(recipe, model_shape, gpus=gpus, gpu_memory_gb=141,
                         ds_config=ds_config(key, gpus, shape["grad_accum"])).per_gpu_gb
        observed = measured[f"peak_gb_{key}"]
        check[f"{name}_{mode}"] = {"predicted_gb": predicted, "measured_gb": observed,
                                   "rel_error": round(abs(predicted - observed) / observed, 3)}
    return check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--configs", default="recipe,short", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of tokens/s")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs = EP size; results go to ep_<N>gpu.json")
    parser.add_argument("--ep-options", default="{}", help="JSON merged into the expert_parallel section")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help="worker only: write rank 0's kernel table of the first timed step here")
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}")
    command = (f"python bench/ep_2gpu.py --gpus {args.gpus} --layers {args.layers} --configs {args.configs} "
               f"--steps {args.steps}" + (f" --ep-options '{args.ep_options}'" if args.ep_options != "{}" else ""))
    configurations = {name: run_pair(args, name, CONFIGS[name]) for name in names}
    primary = configurations[names[0]]
    keys = ("tokens_per_s_zero3", "tokens_per_s_ep", "speedup", "peak_gb_zero3", "peak_gb_ep", "loss_max_abs_diff")
    result = {
        "configuration": names[0], **{key: primary[key] for key in keys},
        **provenance(f"{args.gpus}x {torch.cuda.get_device_name(0)}", command),
        "ep_options": json.loads(args.ep_options),
        "model": f"DBRX width (d_model 6144, 16 experts x ffn 10752, top-4), {args.layers} layers, bf16",
        "configurations": configurations,
    }
    write_result(os.path.join(args.results, f"ep_{args.gpus}gpu.json"), result)
    check = {}
    for name in names:
        check.update(planner_check(name, CONFIGS[name], configurations[name], args.layers, args.gpus))
    check.update(command=command, measured="torch.cuda.max_memory_allocated, max over ranks", gpu=result["gpu"],
                 date=result["date"])
    write_result(os.path.join(args.results, f"planner_check_{args.gpus}gpu.json" if args.gpus != 2 else
                              "planner_check.json"), check)
    print(json.dumps({name: {k: v for k, v in run.items() if not k.startswith("losses")}
                      for name, run in configurations.items()}, indent=2))
    print(json.dumps(check, indent=2))


if __name__ == "__main__":
    main()
