"""The tiny lifecycle (SFT -> RM -> DPO / ORPO / PPO -> RewardBench) in bf16 on one CUDA GPU, summarised.

    python bench/tiny_pipeline_cuda.py --output bench/results/tiny_pipeline_cuda.json

Runs `scripts/tiny_pipeline.sh` with `--use_cpu false --bf16 true --dtype bfloat16` (grouped experts then take
the `torch._grouped_mm` path), then records, per stage, the first and last logged training loss, the final
metrics, the wall time that the trainers report and the vibe checks (how many, generation errors, last scores);
`--vibes-report PATH` also writes the vibe-check page of the generating stages.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import tempfile
import time

from provenance import provenance, write_result

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sft", "rm", "dpo", "orpo", "ppo")
GENERATING_STAGES = ("sft", "dpo", "orpo", "ppo")


def vibes_summary(stage_dir: str) -> dict | None:
    """Checks run, answers that failed to generate, and the last check's score per category; None without vibes."""
    from dbrx_tune.evals.vibes.report import load_runs, score_curves
    from dbrx_tune.evals.vibes.schema import VIBES_FILE

    if not os.path.exists(os.path.join(stage_dir, VIBES_FILE)):
        return None
    (run,) = load_runs([stage_dir])
    curves = score_curves([run])
    return {
        "checks_at_steps": run.steps,
        "answers": len(run.records),
        "generation_errors": sum(record.error is not None for record in run.records),
        "last_scores": {
            category: points[run.name][-1][1] for category, points in curves.items() if points.get(run.name)
        },
    }


def stage_summary(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    with open(os.path.join(stage_dir, "train_results.json")) as handle:
        results = json.load(handle)
    summary = {
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "logged_steps": len(losses),
    }
    keep = ("train_runtime", "eval_accuracy", "eval_rewards/margins", "eval_rewards/accuracies", "eval_loss")
    summary.update({key: results[key] for key in keep if key in results})
    vibes = vibes_summary(stage_dir)
    if vibes is not None:
        summary["vibes"] = vibes
    ppo = [entry for entry in history if "objective/scores" in entry]
    if ppo:
        summary.update(
            {
                "first_score": ppo[0]["objective/scores"],
                "last_score": ppo[-1]["objective/scores"],
                "last_kl": ppo[-1].get("objective/kl"),
                "peak_gb": max(e.get("memory/peak_gb", 0) for e in ppo),
            }
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "bench", "results", "tiny_pipeline_cuda.json"))
    parser.add_argument("--vibes-report", help="also write the vibe-check page of the generating stages here")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tiny_pipeline_")
    start = time.perf_counter()
    subprocess.run(
        [
            "bash",
            os.path.join(REPO_ROOT, "scripts", "tiny_pipeline.sh"),
            root,
            "--use_cpu",
            "false",
            "--bf16",
            "true",
            "--dtype",
            "bfloat16",
            "--report_to",
            "none",
        ],
        check=True,
        cwd=REPO_ROOT,
    )
    import torch

    (leaderboard_file,) = glob.glob(os.path.join(root, "rewardbench", "eval-set", "*", "*.json"))
    with open(leaderboard_file) as handle:
        rewardbench = json.load(handle)
    result = {
        "stages": {stage: stage_summary(os.path.join(root, stage)) for stage in STAGES},
        "rewardbench_sample": {k: v for k, v in rewardbench.items() if isinstance(v, (int, float))},
        "total_wall_s": time.perf_counter() - start,
        **provenance(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    }
    write_result(args.output, result)
    if args.vibes_report:
        from dbrx_tune.evals.vibes.report import write_report

        write_report([os.path.join(root, stage) for stage in GENERATING_STAGES], output=args.vibes_report)
    for stage, summary in result["stages"].items():
        print(
            f"{stage:5s} loss {summary['first_loss']} -> {summary['last_loss']}  runtime {summary.get('train_runtime')}"
        )


if __name__ == "__main__":
    main()
