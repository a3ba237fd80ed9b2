"""`rlhf/ppo.py` under DeepSpeed ZeRO-3 on 2 CPU processes (gloo, fp32, torch AdamW), end to end.

The policy and value model are one ZeRO-3 engine, the frozen reference a second partitioned model, rollouts use
`synced_gpus` generation, and the save gathers the partitions into plain DBRX checkpoints. The test starts this
file as the worker (`python -m torch.distributed.run --nproc_per_node 2 tests/test_ppo_zero3.py ARGS...`); the
worker switches off DeepSpeed's shared-memory kernel build and runs the stage script's `main(ARGS)`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_ppo.yaml")
UPDATES = 2
PROMPTS_PER_RANK = 2
WORLD = 2
SEED = 42

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def _worker(argv: list[str]) -> None:
    import deepspeed
    import deepspeed.ops

    from rlhf.ppo import main

    # The shared-memory allreduce kernel is a JIT C++ build (minutes on 2 cores); plain gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # With use_cpu, accelerate starts torch.distributed but not DeepSpeed's communicator, whose world size
    # zero.Init and the batch-size checks read; on GPUs accelerate starts it itself.
    deepspeed.init_distributed(dist_backend="gloo")
    main(argv)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ppo_zero3")
    ds_path = work / "zero3.json"
    ds_path.write_text(json.dumps(ZERO3))
    out = work / "out"
    recipe_args = [
        RECIPE, "--deepspeed", str(ds_path), "--use_cpu", "true", "--output_dir", str(out), "--report_to", "none",
        "--save_strategy", "no", "--per_device_train_batch_size", str(PROMPTS_PER_RANK), "--num_mini_batches", "1",
        "--num_ppo_epochs", "1", "--response_length", "4", "--local_rollout_forward_batch_size", "2",
        "--total_episodes", str(UPDATES * PROMPTS_PER_RANK * WORLD), "--max_train_samples", "8",
        "--seed", str(SEED),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(29500 + os.getpid() % 1000 + 21), __file__, *recipe_args]
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-rank ZeRO-3 PPO run hung (timeout): {str(err.stdout)[-3000:]} {str(err.stderr)[-3000:]}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return out


def test_zero3_ppo_runs_the_requested_updates_with_finite_metrics(ppo_run):
    state = json.loads((ppo_run / "trainer_state.json").read_text())
    history = state["log_history"]
    assert state["global_step"] == UPDATES
    assert [entry["step"] for entry in history] == list(range(1, UPDATES + 1))
    for entry in history:
        for name in ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "router/aux_loss"):
            assert math.isfinite(entry[name]), (name, entry)
    assert history[-1]["episode"] == UPDATES * PROMPTS_PER_RANK * WORLD


if __name__ == "__main__":
    _worker(sys.argv[1:])
