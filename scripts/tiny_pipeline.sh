#!/usr/bin/env bash
# The whole DBRX lifecycle on the tiny recipes, in minutes: SFT -> reward model -> DPO, ORPO and PPO from the SFT
# model (PPO scored by the trained reward model) -> RewardBench evaluation and leaderboard files for the RM.
#
#   bash scripts/tiny_pipeline.sh [OUTPUT_ROOT] [--key value ...]
#
# Extra `--key value` pairs go to every training stage, e.g. on a GPU:
#   bash scripts/tiny_pipeline.sh outputs/tiny-gpu --use_cpu false --bf16 true --dtype bfloat16
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-outputs/tiny-pipeline}
shift || true
launch=(accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no)
from_sft=(--model_name_or_path "$root/sft" --random_init false)

"${launch[@]}" sft/train.py recipes/tiny/dbrx_sft.yaml --output_dir "$root/sft" "$@"
"${launch[@]}" reward_models/train.py recipes/tiny/dbrx_rm.yaml --output_dir "$root/rm" "${from_sft[@]}" "$@"
"${launch[@]}" rlhf/dpo.py recipes/tiny/dbrx_dpo.yaml --output_dir "$root/dpo" "${from_sft[@]}" "$@"
"${launch[@]}" rlhf/orpo.py recipes/tiny/dbrx_orpo.yaml --output_dir "$root/orpo" "$@"
"${launch[@]}" rlhf/ppo.py recipes/tiny/dbrx_ppo.yaml --output_dir "$root/ppo" "${from_sft[@]}" \
    --reward_model_path "$root/rm" --reward_function null "$@"
python -m dbrx_tune.evals.rewardbench --model "$root/rm" --dataset dbrx_tune/data/samples/rewardbench_v1_sample.jsonl \
    --prior-sets dbrx_tune/data/samples/rewardbench_prior_sets_sample.jsonl --output-dir "$root/rewardbench"
echo "tiny pipeline done: $root/{sft,rm,dpo,orpo,ppo,rewardbench}"
