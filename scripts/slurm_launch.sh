#!/usr/bin/env bash
# Launch a dbrx_tune stage on every node of a SLURM allocation: one `accelerate launch` per node, machine rank =
# position in the node list, rendezvous at the first node. Settings are checked (python -m dbrx_tune.tools.launch
# check) before anything starts.
#
#   sbatch --nodes 4 --gpus-per-node 8 --wrap "scripts/slurm_launch.sh -- sft/train.py recipes/dbrx_sft.yaml"
#   scripts/slurm_launch.sh --dry-run --nodes "gpu[01-02]" -- sft/train.py recipes/dbrx_sft.yaml --learning_rate 5e-6
#
# Options:
#   --nodes LIST            SLURM node list (default: $SLURM_JOB_NODELIST)
#   --gpus-per-node N       processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   --port P                rendezvous port on the first node (default: 29500)
#   --config FILE           accelerate config (default: recipes/accelerate/multi_node.yaml)
#   --num-experts E         also check the DeepSpeed EP size against E experts (default: 16, DBRX)
#   --dry-run               print the per-node commands instead of running them
set -euo pipefail

nodes="${SLURM_JOB_NODELIST:-}"
gpus_per_node="${SLURM_GPUS_ON_NODE:-8}"
port=29500
config="recipes/accelerate/multi_node.yaml"
num_experts=16
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus_per_node="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --num-experts) num_experts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (stage script and recipe go after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [options] -- STAGE_SCRIPT RECIPE.yaml [--key value ...]" >&2
  exit 2
fi
if [[ -z "$nodes" ]]; then
  echo "error: no node list: run inside a SLURM allocation or pass --nodes" >&2
  exit 2
fi

# ZeRO-3 at DBRX scale runs close to the memory limit; without expandable segments the allocator fragments and
# DeepSpeed flushes its cache mid-step (bench/RESULTS.md, Scale-out). srun passes the environment to every node.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF-expandable_segments:True}"  # unset: default; set: kept

python_bin="${PYTHON:-python}"
mapfile -t hosts < <("$python_bin" -m dbrx_tune.tools.launch nodes "$nodes")
num_machines=${#hosts[@]}
num_processes=$((num_machines * gpus_per_node))
head="${hosts[0]}"

"$python_bin" -m dbrx_tune.tools.launch check --accelerate-config "$config" --num-machines "$num_machines" \
  --num-processes "$num_processes" --machine-rank 0 --main-process-ip "$head" --main-process-port "$port" \
  --num-experts "$num_experts"

pids=()
for rank in "${!hosts[@]}"; do
  cmd=(srun --nodes=1 --ntasks=1 --nodelist="${hosts[$rank]}"
       accelerate launch --config_file "$config" --num_machines "$num_machines" --num_processes "$num_processes"
       --machine_rank "$rank" --main_process_ip "$head" --main_process_port "$port" "$@")
  if [[ $dry_run -eq 1 ]]; then
    printf 'PYTORCH_CUDA_ALLOC_CONF=%q ' "$PYTORCH_CUDA_ALLOC_CONF"; printf '%q ' "${cmd[@]}"; printf '\n'
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
