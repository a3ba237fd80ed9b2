"""ZeRO-3 with leaf MoE blocks vs ZeRO-3 + AutoEP (EP=2) on 2 GPUs, on a DBRX-width few-layer model.

    python bench/ep_2gpu.py --layers 2 --configs recipe,short      # launches each run with torch.distributed.run

Configurations (`--configs`, comma-separated; the first one fills the JSON's top-level keys):
  recipe  what recipes/dbrx_sft.yaml trains with: sequence 4096, micro-batch 1, 8 gradient-accumulation steps,
          non-reentrant activation checkpointing;
  short   sequence 2048, no accumulation, no checkpointing (the first measurement, kept for comparison: an
          optimizer step after every 2048 tokens makes the step, not the layers, dominate).
Each run trains with the DeepSpeed config the recipes ship (`recipes/deepspeed/zero3.json` for ZeRO-3 with leaf
MoE blocks, `zero3_ep.json` with `autoep_size` set to the GPU count for EP), its "auto" values filled by the
Trainer's own code from the recipe's TrainingArguments, and the optimizer the Trainer would build (fused torch
AdamW). The model is built the way the loader builds it (random init under the HF DeepSpeed config, grouped
experts, `prepare_for_deepspeed`); both modes train on the same token batches. Reports losses, tokens/s
(optimizer steps after the warm-up, nothing synchronised inside a step), the forward / backward / optimizer-step
split (one extra step, synchronised between phases) and peak GPU memory (max_memory_allocated, max over ranks).
`--ep-options JSON` (repeatable) runs one more EP variant per value with those keys merged into the
`expert_parallel` section; the first variant fills the JSON's top-level keys. Writes bench/results/ep_<N>gpu.json
and, with the planner's prediction for every run, planner_check[_<N>gpu].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from provenance import provenance, write_result  # bench/, this script's directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIGS = {
    "recipe": {"seq": 4096, "grad_accum": 8, "checkpointing": True},
    "short": {"seq": 2048, "grad_accum": 1, "checkpointing": False},
}


def training_arguments(mode: str, world: int, grad_accum: int, ep_options: dict, output_dir: str):
    """The recipe's TrainingArguments around the shipped DeepSpeed config of `mode`; HF fills its "auto" batch,
    precision and clipping values here and the hidden-size ones in `finalize_deepspeed_config`."""
    from transformers import TrainingArguments

    from dbrx_tune.parallel.launch import read_json_config

    name = "zero3_ep.json" if mode == "ep" else "zero3.json"
    config = read_json_config(os.path.join(ROOT, "recipes", "deepspeed", name))
    if mode == "ep":
        # autoep_size defaults to the GPU count; '{"autoep_size": 4}' on 8 GPUs gives EP=4 x expert-data-parallel 2
        config["expert_parallel"].update({"autoep_size": world, **ep_options})
    return TrainingArguments(
        output_dir=output_dir,
        deepspeed=config,
        bf16=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1e-5,
        weight_decay=0.0,
        max_grad_norm=1.0,
        report_to=[],
    )


def finalize_deepspeed_config(args, model, steps: int) -> dict:
    """The DeepSpeed config as the Trainer hands it to `deepspeed.initialize` (hidden-size "auto" keys filled)."""
    args.hf_deepspeed_config.trainer_config_finalize(args, model, steps)
    return args.hf_deepspeed_config.config


def bench_config(layers: int):
    from dbrx_tune.modeling.config import tiny_dbrx_config
    from dbrx_tune.modeling.moe_loss import sync_moe_config

    config = tiny_dbrx_config(
        d_model=6144,
        n_heads=48,
        n_layers=layers,
        max_seq_len=32768,
        attn_config={"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": 500000.0},
        ffn_config={
            "ffn_hidden_size": 10752,
            "moe_num_experts": 16,
            "moe_top_k": 4,
            "moe_jitter_eps": None,
            "moe_loss_weight": 0.05,
            "moe_normalize_expert_weights": 1.0,
        },
    )
    return sync_moe_config(config)


def worker(args) -> None:
    import deepspeed
    from transformers import DbrxForCausalLM, Trainer

    from dbrx_tune.parallel.zero3 import apply_experts_implementation, prepare_for_deepspeed

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.cuda.set_device(rank)
    training_args = training_arguments(
        args.mode, world, args.grad_accum, json.loads(args.ep_options), os.path.dirname(os.path.abspath(args.out))
    )
    torch.manual_seed(0)  # the HF DeepSpeed config is active from here: the model is built partitioned (zero.Init)
    model = DbrxForCausalLM._from_config(bench_config(args.layers), dtype=torch.bfloat16, attn_implementation="sdpa")
    apply_experts_implementation(model, "grouped")
    config = finalize_deepspeed_config(training_args, model, args.steps)
    prepare_for_deepspeed(model, config)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    optimizer_kwargs["weight_decay"] = training_args.weight_decay  # the Trainer sets it per parameter group
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **optimizer_kwargs)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1)
    micro_steps = (args.steps + 1) * args.grad_accum
    data = torch.randint(2, 100000, (micro_steps, world, args.seq), generator=generator)
    losses, step_times, split = [], [], {"forward": 0.0, "backward": 0.0, "step": 0.0}
    torch.cuda.reset_peak_memory_stats()
    profiler = None
    for step in range(args.steps + 1):  # the extra last step only measures the split
        split_step = step == args.steps
        if args.profile and step == args.warmup:  # the first timed optimizer step, on every rank
            profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            profiler.start()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for micro in range(args.grad_accum):
            batch = data[step * args.grad_accum + micro, rank : rank + 1].cuda()
            mark = _timed(split, "forward", None) if split_step else None
            loss = engine(input_ids=batch, labels=batch).loss
            mark = _timed(split, "backward", mark) if split_step else None
            engine.backward(loss)
            mark = _timed(split, "step", mark) if split_step else None
            engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            if split_step:
                _timed(split, None, mark)
            else:
                losses.append(loss.detach().float().clone())
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        if profiler is not None and step == args.warmup:
            profiler.stop()
            if rank == 0:
                with open(args.profile, "w", encoding="utf-8") as handle:
                    handle.write(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40))
                profiler.export_chrome_trace(args.profile + ".trace.json")  # read with bench/trace_summary.py
            profiler = None
    mean_losses = torch.stack(losses)
    torch.distributed.all_reduce(mean_losses)
    load = expert_parallel_load(engine.module, world)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 1024**3, device="cuda")
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    timed = step_times[args.warmup : args.steps]
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "ds_config": config,
                    "optimizer": f"{optimizer_cls.__name__}({optimizer_kwargs})",
                    "losses": (mean_losses / world).tolist(),
                    "tokens_per_s": world * args.seq * args.grad_accum * len(timed) / sum(timed),
                    "peak_gb": peak.item(),
                    "step_s": step_times,
                    "ep_rank_load_max_over_mean": load,
                    "split_s_per_step": split,
                },
                handle,
            )


def expert_parallel_load(model, world: int) -> float | None:
    """Under EP, the busiest rank's routed tokens over the mean, from AutoEP's per-expert token counters summed
    over layers and ranks (1.0 = balanced; every rank waits for the busiest one at the combine all-to-all)."""
    counters = [
        module.tokens_per_expert
        for module in model.modules()
        if isinstance(getattr(module, "tokens_per_expert", None), torch.Tensor)
    ]
    if not counters:
        return None
    per_expert = torch.stack([counter.float() for counter in counters]).sum(0)
    torch.distributed.all_reduce(per_expert)
    per_rank = per_expert.view(world, -1).sum(1)
    return round((per_rank.max() / per_rank.mean()).item(), 4)


def _timed(split: dict, phase: str | None, mark: tuple | None) -> tuple:
    """Close the running phase (device-synchronised) and open `phase`; returns the new (phase, start) mark."""
    torch.cuda.synchronize()
    now = time.perf_counter()
    if mark is not None:
        split[mark[0]] += now - mark[1]
    return (phase, now)


def launch(args, name: str, shape: dict, mode: str, ep_options: str = "{}") -> dict:
    """One run of `mode` in its own `torch.distributed.run` launch over `args.gpus` processes; its worker result."""
    out = os.path.join(args.results, f".ep_{name}_{mode}.json")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(args.gpus),
            __file__,
            "--mode",
            mode,
            "--out",
            out,
            "--layers",
            str(args.layers),
            "--seq",
            str(shape["seq"]),
            "--grad-accum",
            str(shape["grad_accum"]),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--ep-options",
            ep_options,
        ]
        + (["--checkpointing"] if shape["checkpointing"] else []),
        check=True,
    )
    with open(out, encoding="utf-8") as handle:
        result = json.load(handle)
    os.remove(out)
    print(
        f"{name} {mode} {ep_options}: {result['tokens_per_s']:.0f} tok/s, peak {result['peak_gb']:.2f} GiB, "
        f"split {result['split_s_per_step']}",
        flush=True,
    )
    return result


def compare(zero3: dict, ep: dict) -> dict:
    """The issue's keys for one EP run against the ZeRO-3 leaf run of the same configuration."""
    return {
        "tokens_per_s_zero3": round(zero3["tokens_per_s"], 1),
        "tokens_per_s_ep": round(ep["tokens_per_s"], 1),
        "speedup": round(ep["tokens_per_s"] / zero3["tokens_per_s"], 3),
        "peak_gb_zero3": round(zero3["peak_gb"], 2),
        "peak_gb_ep": round(ep["peak_gb"], 2),
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(zero3["losses"], ep["losses"])),
        "split_s_per_step_zero3": zero3["split_s_per_step"],
        "split_s_per_step_ep": ep["split_s_per_step"],
        "step_s_zero3": zero3["step_s"],
        "step_s_ep": ep["step_s"],
        "ep_rank_load_max_over_mean": ep["ep_rank_load_max_over_mean"],
    }


def run_configuration(args, name: str, shape: dict) -> dict:
    """ZeRO-3 leaf once, then every EP variant, of one configuration; the first variant's comparison on top."""
    zero3 = launch(args, name, shape, "zero3")
    variants = []
    for index, options in enumerate(args.ep_options):
        ep = launch(args, f"{name}{index}", shape, "ep", options)
        variants.append(
            {
                "ep_options": json.loads(options),
                **compare(zero3, ep),
                "losses_ep": ep["losses"],
                "ds_config_ep": ep["ds_config"],
            }
        )
    headline = _scalars(variants[0])
    return {
        **shape,
        **headline,
        "optimizer": zero3["optimizer"],
        "ds_config_zero3": zero3["ds_config"],
        "losses_zero3": zero3["losses"],
        "ep_variants": variants,
    }


def _scalars(run: dict) -> dict:
    """`run` without its per-micro-step losses and DeepSpeed configs (the headline and printed summaries)."""
    return {key: value for key, value in run.items() if not key.startswith(("losses", "ds_config"))}


def planner_check(name: str, shape: dict, measured: dict, layers: int, gpus: int) -> dict:
    """The memory planner's per-GPU prediction for every run of one configuration, next to its measured peak."""
    from dbrx_tune.tools.plan import ModelShape, plan

    config = bench_config(layers)
    model_shape = ModelShape(
        d_model=6144, n_layers=layers, n_heads=48, kv_heads=8, vocab=config.vocab_size, ffn=10752, experts=16, top_k=4
    )
    recipe = {
        "max_length": shape["seq"],
        "per_device_train_batch_size": 1,
        "gradient_checkpointing": shape["checkpointing"],
    }
    runs = [("zero3_leaf", measured["ds_config_zero3"], measured["peak_gb_zero3"])]
    runs += [
        (f"zero3_ep{gpus}" + (f"_variant{index}" if index else ""), variant["ds_config_ep"], variant["peak_gb_ep"])
        for index, variant in enumerate(measured["ep_variants"])
    ]
    check = {}
    for mode, ds_config, observed in runs:
        predicted = plan(recipe, model_shape, gpus=gpus, gpu_memory_gb=141, ds_config=ds_config).per_gpu_gb
        check[f"{name}_{mode}"] = {
            "predicted_gb": predicted,
            "measured_gb": observed,
            "rel_error": round(abs(predicted - observed) / observed, 3),
        }
    return check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--configs", default="recipe,short", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of tokens/s")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs = EP size; results go to ep_<N>gpu.json")
    parser.add_argument(
        "--ep-options",
        action="append",
        default=None,
        help="JSON merged into the shipped expert_parallel section; repeat for more EP variants "
        "(default: the shipped section as is; '{\"async_split_plan\": false}' measures it "
        "without the asynchronous split plan; '{\"autoep_size\": 4}' on 8 GPUs: EP=4 with expert-data-parallel 2); "
        "worker: one JSON",
    )
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        help="worker only: write rank 0's kernel table of the first timed step here, "
        "and its Chrome trace at PROFILE.trace.json",
    )
    args = parser.parse_args()
    if args.mode:
        args.ep_options = (args.ep_options or ["{}"])[-1]
        return worker(args)
    args.ep_options = args.ep_options or ["{}"]
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}")
    command = (
        f"python bench/ep_2gpu.py --gpus {args.gpus} --layers {args.layers} --configs {args.configs} "
        f"--steps {args.steps}" + "".join(f" --ep-options '{options}'" for options in args.ep_options)
    )
    os.makedirs(args.results, exist_ok=True)
    configurations = {name: run_configuration(args, name, CONFIGS[name]) for name in names}
    primary = configurations[names[0]]
    keys = ("tokens_per_s_zero3", "tokens_per_s_ep", "speedup", "peak_gb_zero3", "peak_gb_ep", "loss_max_abs_diff")
    result = {
        "configuration": names[0],
        **{key: primary[key] for key in keys},
        **provenance(f"{args.gpus}x {torch.cuda.get_device_name(0)}", command),
        "ep_options": json.loads(args.ep_options[0]),
        "optimizer": primary["optimizer"],
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "model": f"DBRX width (d_model 6144, 16 experts x ffn 10752, top-4), {args.layers} layers, bf16",
        "configurations": configurations,
    }
    write_result(os.path.join(args.results, f"ep_{args.gpus}gpu.json"), result)
    check = {}
    for name in names:
        check.update(planner_check(name, CONFIGS[name], configurations[name], args.layers, args.gpus))
    check.update(
        command=command,
        measured="torch.cuda.max_memory_allocated, max over ranks",
        gpu=result["gpu"],
        date=result["date"],
    )
    write_result(
        os.path.join(args.results, f"planner_check_{args.gpus}gpu.json" if args.gpus != 2 else "planner_check.json"),
        check,
    )
    print(
        json.dumps(
            {
                name: _scalars(run) | {"ep_variants": [_scalars(variant) for variant in run["ep_variants"]]}
                for name, run in configurations.items()
            },
            indent=2,
        )
    )
    print(json.dumps(check, indent=2))


if __name__ == "__main__":
    main()
