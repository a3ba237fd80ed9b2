"""The planner's ZeRO-3 offload path, read from the shipped recipes/deepspeed/zero3_offload.json (nothing tested it)."""

from __future__ import annotations

import pytest

from dbrx_tune.parallel.launch import read_json_config
from dbrx_tune.tools.plan import KNOWN_CONFIGS, ModelShape, plan

DBRX = ModelShape(**KNOWN_CONFIGS["databricks/dbrx-base"])
FULL = {"max_length": 4096, "per_device_train_batch_size": 1, "gradient_checkpointing": True}


def test_the_shipped_offload_config_moves_optimizer_state_and_parameters_off_the_gpu():
    zero3 = read_json_config("recipes/deepspeed/zero3.json")
    offload = read_json_config("recipes/deepspeed/zero3_offload.json")
    on_gpu = plan(FULL, DBRX, gpus=16, gpu_memory_gb=80, ds_config=zero3)
    offloaded = plan(FULL, DBRX, gpus=16, gpu_memory_gb=80, ds_config=offload)
    # full fine-tuning: AdamW's 12 bytes per parameter, split over 16 ZeRO-3 ranks, unless offloaded
    assert on_gpu.optimizer_gb == pytest.approx(12 * DBRX.total_params / 16 / 2**30, abs=0.01)
    assert offloaded.optimizer_gb == 0
    assert offloaded.params_gb == 0 and on_gpu.params_gb > 0
    assert offloaded.per_gpu_gb < on_gpu.per_gpu_gb - on_gpu.optimizer_gb + 1e-9
    # and the verdict follows: fewer GPUs fit when the optimizer lives in host memory
    assert offloaded.min_gpus is not None and (on_gpu.min_gpus is None or offloaded.min_gpus <= on_gpu.min_gpus)


def test_a_gpu_count_that_cannot_hold_the_expert_parallel_size_is_refused():
    expert_parallel = read_json_config("recipes/deepspeed/zero3_ep.json")  # autoep_size 8
    with pytest.raises(ValueError, match="4 GPUs cannot hold expert-parallel size 8"):
        plan(FULL, DBRX, gpus=4, gpu_memory_gb=80, ds_config=expert_parallel)


def test_non_finite_gpu_memory_is_refused_by_the_command():
    from dbrx_tune.tools.plan import main

    with pytest.raises(SystemExit):
        main(["recipes/dbrx_sft.yaml", "--gpus", "16", "--gpu-memory", "nan"])
