"""The memory planner: component sizes, fitting, and the smallest GPU count, computed from recipe + config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from dbrx_tune.plan import KNOWN_CONFIGS, ModelShape, plan  # noqa: E402

DBRX = ModelShape(**KNOWN_CONFIGS["databricks/dbrx-base"])
ZERO3 = {"zero_optimization": {"stage": 3}}
FULL = {"max_length": 4096, "per_device_train_batch_size": 1, "gradient_checkpointing": True}


def test_dbrx_base_shape_has_132b_parameters():
    assert DBRX.total_params / 1e9 == pytest.approx(132, rel=0.02)


def test_zero3_partitions_weights_gradients_and_optimizer_over_gpus():
    small, large = (plan(FULL, DBRX, gpus=n, gpu_memory_gb=80, ds_config=ZERO3) for n in (16, 64))
    for field in ("params_gb", "gradients_gb", "optimizer_gb"):
        assert getattr(small, field) == pytest.approx(4 * getattr(large, field), rel=0.01)
    assert small.optimizer_gb == pytest.approx(6 * small.params_gb, rel=0.01)  # 12 vs 2 bytes per parameter


def test_fits_and_min_gpus_agree_with_the_per_gpu_total():
    result = plan(FULL, DBRX, gpus=16, gpu_memory_gb=80, ds_config=ZERO3)
    assert not result.fits and result.per_gpu_gb > 80
    at_min = plan(FULL, DBRX, gpus=result.min_gpus, gpu_memory_gb=80, ds_config=ZERO3)
    below = plan(FULL, DBRX, gpus=result.min_gpus - 1, gpu_memory_gb=80, ds_config=ZERO3)
    assert at_min.fits and not below.fits


def test_checkpointing_expert_parallelism_and_lora_each_shrink_the_plan():
    base = plan({**FULL, "gradient_checkpointing": False}, DBRX, gpus=64, gpu_memory_gb=80, ds_config=ZERO3)
    ckpt = plan(FULL, DBRX, gpus=64, gpu_memory_gb=80, ds_config=ZERO3)
    assert ckpt.activations_gb < base.activations_gb == base.activations_full_gb
    ep = plan(FULL, DBRX, gpus=64, gpu_memory_gb=80,
              ds_config={**ZERO3, "expert_parallel": {"enabled": True, "autoep_size": 8}})
    assert ep.working_set_gb == pytest.approx(ckpt.working_set_gb / 8, rel=0.01) and ep.min_gpus % 8 == 0
    lora = plan({**FULL, "use_peft": True}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    qlora = plan({**FULL, "use_peft": True, "load_in_4bit": True}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    full = plan(FULL, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    assert qlora.params_gb < lora.params_gb == pytest.approx(full.params_gb, rel=0.01)
    assert lora.optimizer_gb < full.optimizer_gb / 50
    assert (lora.method, qlora.method) == ("lora", "qlora")


def test_cli_plans_the_dbrx_recipe_offline_as_json_and_table():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    command = [sys.executable, "-m", "dbrx_tune.plan", "recipes/dbrx_sft.yaml", "--gpus", "16", "--gpu-memory", "80"]
    result = subprocess.run(command + ["--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"fits", "per_gpu_gb", "min_gpus"} <= set(data)
    assert data["min_gpus"] > 16 and not data["fits"]
    table = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "smallest GPU count that fits" in table.stdout and str(data["min_gpus"]) in table.stdout


def test_cli_names_a_missing_recipe():
    result = subprocess.run([sys.executable, "-m", "dbrx_tune.plan", "nope.yaml", "--gpus", "8"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nope.yaml" in result.stderr
