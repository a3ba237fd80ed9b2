"""One PPO run of a DBRX-width model under DeepSpeed ZeRO-3 on several GPUs: time per rollout and per
optimisation phase, peak memory.

    python bench/ppo_zero3.py --gpus 2 --layers 1 --output bench/results/ppo_zero3.json

The model has DBRX's full width (d_model 6144, 48 heads / 8 KV heads, 16 experts of ffn 10752, top-4, vocab
100352) and random weights; the policy and a value model start from it, a frozen reference is a copy, and the
reward is a rule (a reward model would be a fourth DBRX-width model). It runs `rlhf/ppo.py` on the tiny PPO
recipe with the shape, ZeRO-3 and bf16 overridden, through `accelerate launch`, and reads the PPO trainer's own
`time/*` and `memory/peak_gb` metrics from its trainer_state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from provenance import provenance, write_result

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DBRX_WIDTH = {
    "architectures": ["DbrxForCausalLM"],
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
    "d_model": 6144,
    "ffn_config": {
        "ffn_hidden_size": 10752,
        "moe_jitter_eps": 0,
        "moe_loss_weight": 0.05,
        "moe_num_experts": 16,
        "moe_top_k": 4,
    },
    "max_seq_len": 32768,
    "model_type": "dbrx",
    "n_heads": 48,
    "vocab_size": 100352,
}

ZERO3 = {
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "bench", "results", "ppo_zero3.json"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="ppo_zero3_")
    model_dir = os.path.join(work, "dbrx-width")
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as handle:
        json.dump({**DBRX_WIDTH, "n_layers": args.layers}, handle)
    ds_path = os.path.join(work, "zero3.json")
    with open(ds_path, "w") as handle:
        json.dump(ZERO3, handle)
    batch = 4  # prompts per process per update
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(args.gpus),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        os.path.join(REPO_ROOT, "rlhf", "ppo.py"),
        os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_ppo.yaml"),
        "--model_name_or_path",
        model_dir,
        "--random_init",
        "true",
        "--dtype",
        "bfloat16",
        "--use_cpu",
        "false",
        "--bf16",
        "true",
        "--deepspeed",
        ds_path,
        "--gradient_checkpointing",
        "true",
        "--output_dir",
        os.path.join(work, "out"),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        str(batch),
        "--num_mini_batches",
        "1",
        "--num_ppo_epochs",
        "1",
        "--response_length",
        str(args.response_length),
        "--logging_steps",
        "1",
        "--total_episodes",
        str(batch * args.gpus * args.updates),
        "--max_train_samples",
        "64",
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    with open(os.path.join(work, "out", "trainer_state.json")) as handle:
        history = [entry for entry in json.load(handle)["log_history"] if "time/rollout_s" in entry]
    last = history[-1]  # the first update includes warm-up (kernel selection, allocator growth)
    import torch

    result = {
        "rollout_s": last["time/rollout_s"],
        "optimise_s": last["time/optimise_s"],
        "peak_gb": max(entry.get("memory/peak_gb", 0.0) for entry in history),
        "updates": len(history),
        "per_update": [
            {k: v for k, v in entry.items() if k.startswith(("time/", "memory/", "objective/kl"))} for entry in history
        ],
        "n_layers": args.layers,
        "gpus": args.gpus,
        "prompts_per_update": batch * args.gpus,
        "response_length": args.response_length,
        **provenance(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    }
    write_result(args.output, result)
    print(f"{'rollout s':>10} {'optimise s':>11} {'peak GB':>8}")
    print(f"{result['rollout_s']:>10.2f} {result['optimise_s']:>11.2f} {result['peak_gb']:>8.1f}")


if __name__ == "__main__":
    main()
