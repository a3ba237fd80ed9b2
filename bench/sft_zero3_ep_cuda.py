"""The default SFT recipe's parallelism through the real stage script on GPUs: ZeRO-3 + DeepSpeed AutoEP over NCCL.

    python bench/sft_zero3_ep_cuda.py --gpus 2 --output bench/results/sft_zero3_ep_cuda.json

`recipes/dbrx_sft.yaml` trains with `recipes/deepspeed/zero3_ep.json`; everything else in this repository runs that
combination either on gloo CPU processes (tests) or in a hand-written loop (bench/ep_2gpu.py). This runs
`accelerate launch sft/train.py recipes/tiny/dbrx_sft.yaml` on `--gpus` GPUs in bf16 with the shipped EP config
(`autoep_size` = GPU count) and, with `--modes ep,zero3`, the same with `zero3.json` (leaf MoE blocks). Per run it
records the loss curve, the vibe checks made during training (every rank generates under ZeRO-3 / EP), how many
MoE blocks AutoEP replaced and whether every intermediate checkpoint has the final one's tensor names and shapes;
then it reloads the saved checkpoint in one process with the toolkit's loader, answers the same vibe prompts
greedily and counts the answers equal to the last in-training check's, which tests the EP save path (experts
gathered back from their ranks into the DBRX layout) end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

from provenance import provenance, write_result
from tiny_pipeline_cuda import stage_summary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"ep": "zero3_ep.json", "zero3": "zero3.json"}
VIBE_MAX_NEW_TOKENS = 16  # recipes/tiny/dbrx_sft.yaml's value: the reloaded model must answer like the trained one


def deepspeed_config(mode: str, gpus: int, directory: str) -> str:
    """The shipped DeepSpeed config of `mode`, with the EP size set to the GPU count; returns its path."""
    from dbrx_tune.parallel.launch import read_json_config

    config = read_json_config(os.path.join(REPO_ROOT, "recipes", "deepspeed", CONFIGS[mode]))
    if "expert_parallel" in config:
        config["expert_parallel"]["autoep_size"] = gpus
    path = os.path.join(directory, f"{mode}_{gpus}gpu.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return path


def train(mode: str, gpus: int, root: str) -> tuple[str, str]:
    """One SFT run; returns its output directory and its combined log."""
    output_dir = os.path.join(root, f"sft-{mode}")
    command = [
        "accelerate",
        "launch",
        "--num_processes",
        str(gpus),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "sft/train.py",
        "recipes/tiny/dbrx_sft.yaml",
        "--output_dir",
        output_dir,
        "--use_cpu",
        "false",
        "--bf16",
        "true",
        "--dtype",
        "bfloat16",
        "--report_to",
        "none",
        "--deepspeed",
        deepspeed_config(mode, gpus, root),
    ]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    log = completed.stdout + completed.stderr
    with open(os.path.join(root, f"sft-{mode}.log"), "w", encoding="utf-8") as handle:
        handle.write(log)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log[-6000:]}")
    return output_dir, log


def log_facts(log: str) -> dict:
    """What the run's log says about expert parallelism and saving (dbrx_tune's own log lines, on rank 0)."""
    planned = re.findall(r"AutoEP: (\d+) DBRX MoE blocks will be replaced", log)
    return {
        "autoep_blocks_replaced": int(planned[0]) if planned else 0,
        "router_logits_recaptured_from_autoep": "router_logits now recorded from router.gate" in log,
        "saved_in_dbrx_layout": [
            os.path.basename(path)
            for path in re.findall(r"saved the DeepSpeed-trained model to (\S+) in the original DBRX", log)
        ],
    }


def weight_layout(directory: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a saved model (one safetensors file or an indexed set of shards)."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    layout = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as handle:
            layout.update({key: handle.get_slice(key).get_shape() for key in handle.keys()})
    return layout


def intermediate_checkpoints_match_final(output_dir: str) -> dict[str, bool]:
    """Per `checkpoint-N`: whether its weights have the final (DBRX-layout) checkpoint's names and shapes."""
    final = weight_layout(output_dir)
    return {
        name: weight_layout(os.path.join(output_dir, name)) == final
        for name in sorted(os.listdir(output_dir))
        if name.startswith("checkpoint-")
    }


def reload_and_answer(output_dir: str) -> dict:
    """Answers of the saved checkpoint, reloaded in this process, against the last in-training vibe check."""
    import torch

    from dbrx_tune.args import ModelArguments, VibeArguments
    from dbrx_tune.build import load_causal_lm
    from dbrx_tune.evals.vibes.check import VibeChecker
    from dbrx_tune.evals.vibes.prompts import load_vibe_prompts
    from dbrx_tune.evals.vibes.report import load_runs
    from dbrx_tune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(output_dir)
    model = load_causal_lm(
        ModelArguments(model_name_or_path=output_dir, dtype="bfloat16", experts_implementation="grouped"), tokenizer
    )
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    settings = VibeArguments(vibe_prompts="default", vibe_max_new_tokens=VIBE_MAX_NEW_TOKENS)
    reload_dir = output_dir + "-reloaded"
    checker = VibeChecker(load_vibe_prompts("default"), tokenizer, settings, output_dir=reload_dir, stage="sft")
    with torch.no_grad():
        result = checker.run(model, step=0, is_main=True, every_rank=False)
    (trained,) = load_runs([output_dir])
    last = trained.at_step(trained.steps[-1])
    reloaded = {record.prompt_id: record.answer for record in result.records}
    same = [prompt_id for prompt_id, answer in reloaded.items() if last[prompt_id].answer == answer]
    return {
        "answers": len(reloaded),
        "equal_to_last_in_training_check": len(same),
        "differing_prompt_ids": sorted(set(reloaded) - set(same)),
        "generation_errors": sum(record.error is not None for record in result.records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--modes", default="ep,zero3", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "bench", "results", "sft_zero3_ep_cuda.json"))
    args = parser.parse_args()
    import torch

    root = tempfile.mkdtemp(prefix="sft_zero3_ep_")
    runs = {}
    for mode in args.modes.split(","):
        try:
            output_dir, log = train(mode, args.gpus, root)
        except RuntimeError as error:  # record it and go on to the next mode: one GPU call is expensive
            runs[mode] = {"config": CONFIGS[mode], "error": str(error)[-3000:]}
            print(error, flush=True)
            continue
        runs[mode] = {
            "config": CONFIGS[mode],
            **stage_summary(output_dir),
            **log_facts(log),
            "intermediate_checkpoints_match_final_layout": intermediate_checkpoints_match_final(output_dir),
            "reloaded": reload_and_answer(output_dir),
        }
        print(mode, json.dumps(runs[mode], indent=1), flush=True)
    write_result(
        args.output,
        {
            "runs": runs,
            "recipe": "recipes/tiny/dbrx_sft.yaml (bf16, 2 epochs of bundled data)",
            **provenance(f"{args.gpus}x {torch.cuda.get_device_name(0)}"),
        },
    )


if __name__ == "__main__":
    main()
