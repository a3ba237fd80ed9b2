"""The memory planner against measured QLoRA 132B peaks at long context: bench/qlora_132b.py at 4k, 16k and 32k
tokens with today's settings, and the two QLoRA recipes' settings, each in its own process (a fresh allocator).

For every configuration the planner (`dbrx_tune.tools.plan`) predicts the first step (the optimizer state exists
only after its backward), from the settings the bench JSON records (sequence length, LoRA rank, experts per group,
fused loss, activation offload, MoE token chunk, optimizer), and its steady-step figure (optimizer state resident)
beside it. Written to bench/results/planner_check_long.json: per configuration `predicted_gb` and `measured_gb`
(first step, GiB, like the other planner checks: torch.cuda.max_memory_allocated), `rel_error`, `steady_gb`, and
for runs of several steps `steady_measured_gb` / `steady_rel_error`, the bench's `step_s`.

    python bench/planner_check_long.py [--configs seq4096,seq16384,seq32768,recipe_4k,recipe_32k]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from provenance import REPO_ROOT, provenance, write_result

from dbrx_tune.tools.plan import KNOWN_CONFIGS, ModelShape, plan

GB, GIB = 1e9, 2**30

CONFIGS = {
    "seq4096": ["--seq-len", "4096"],
    "seq16384": ["--seq-len", "16384"],
    "seq32768": ["--seq-len", "32768"],
    # recipes/dbrx_sft_qlora.yaml: LoRA r16, 4 experts dequantized at a time
    "recipe_4k": ["--seq-len", "4096", "--experts-per-group", "4"],
    # recipes/dbrx_sft_qlora_32k.yaml's own settings (LoRA r8, 4 experts at a time, offload, MoE chunks of 2048
    # tokens, 8-bit AdamW), a first and a steady step
    "recipe_32k": ["--recipe", "recipes/dbrx_sft_qlora_32k.yaml", "--steps", "2"],
}


def planned(run: dict) -> dict:
    """The planner's figures for the settings one bench/qlora_132b.py run recorded."""
    values = {
        "use_peft": True,
        "load_in_4bit": True,
        "use_bnb_nested_quant": True,
        "lora_r": run["lora"]["r"],
        "gradient_checkpointing": True,
        "per_device_train_batch_size": run["batch"],
        "max_length": run["seq_len"],
        "experts_per_group": run["experts_per_group"],
        "fused_loss": run.get("fused_loss", False),
        "activation_offload": run.get("activation_offload", False),
        "moe_token_chunk": run.get("moe_token_chunk"),
        "optim": run.get("optim"),
    }
    shape = ModelShape(**{**KNOWN_CONFIGS["databricks/dbrx-base"], "n_layers": run["n_layers"]})
    result = plan(values, shape, gpus=1, gpu_memory_gb=80, ds_config=None)
    return {"predicted_gb": result.first_step_gb, "steady_gb": result.per_gpu_gb, "fits_80": result.fits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--recorded",
        nargs="+",
        metavar="NAME=JSON",
        help="compare against recorded bench/qlora_132b.py results instead of running it (no GPU needed)",
    )
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "bench", "results", "planner_check_long.json"))
    args = parser.parse_args()
    results: dict = {}

    def record(name: str, run: dict, settings) -> None:
        # runs of several steps (`--steps`) record the first step apart; their `peak_gib` is the steady peak
        first_gib = round(run["first_step_peak_gb"] * GB / GIB, 2) if "first_step_peak_gb" in run else run["peak_gib"]
        entry = {**planned(run), "measured_gb": first_gib, "measured_decimal_gb": run.get("first_step_peak_gb")}
        entry["measured_decimal_gb"] = entry["measured_decimal_gb"] or run["peak_gb"]
        entry["rel_error"] = round(entry["predicted_gb"] / entry["measured_gb"] - 1, 3)
        if run.get("steps", 1) > 1:
            entry["steady_measured_gb"] = run["peak_gib"]
            entry["steady_rel_error"] = round(entry["steady_gb"] / run["peak_gib"] - 1, 3)
        entry.update({key: run[key] for key in ("seq_len", "step_s", "activations_gb", "optimizer_gb")})
        entry["settings"] = settings
        results[name] = entry
        print(f"{name}: predicted {entry['predicted_gb']} GiB, measured {entry['measured_gb']} GiB")

    if args.recorded:
        for item in args.recorded:
            name, path = item.split("=", 1)
            with open(path, encoding="utf-8") as handle:
                run = json.load(handle)
            record(name, run, {"recorded": os.path.relpath(path, REPO_ROOT), "command": run.get("command")})
    else:
        with tempfile.TemporaryDirectory() as scratch:
            for name in args.configs.split(","):
                path = os.path.join(scratch, f"{name}.json")
                command = [sys.executable, os.path.join(REPO_ROOT, "bench", "qlora_132b.py"), *CONFIGS[name]]
                done = subprocess.run([*command, "--output", path], cwd=REPO_ROOT, capture_output=True, text=True)
                if done.returncode:
                    results[name] = {"error": done.stderr.strip().splitlines()[-1:]}
                    print(f"{name}: failed: {results[name]['error']}")
                    continue
                with open(path, encoding="utf-8") as handle:
                    record(name, json.load(handle), CONFIGS[name])
    results.update(measured="torch.cuda.max_memory_allocated of one bench/qlora_132b.py step, GiB")
    write_result(args.output, {**results, **provenance("NVIDIA H200")})


if __name__ == "__main__":
    main()
