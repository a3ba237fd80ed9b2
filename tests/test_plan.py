"""The memory planner: component sizes, fitting, and the smallest GPU count, computed from recipe + config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dbrx_tune.tools.plan import KNOWN_CONFIGS, ModelShape, plan

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    ep = plan(
        FULL,
        DBRX,
        gpus=64,
        gpu_memory_gb=80,
        ds_config={**ZERO3, "expert_parallel": {"enabled": True, "autoep_size": 8}},
    )
    assert ep.working_set_gb == pytest.approx(ckpt.working_set_gb / 8, rel=0.01) and ep.min_gpus % 8 == 0
    lora = plan({**FULL, "use_peft": True}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    qlora = plan({**FULL, "use_peft": True, "load_in_4bit": True}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    full = plan(FULL, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    assert qlora.params_gb < lora.params_gb == pytest.approx(full.params_gb, rel=0.01)
    assert lora.optimizer_gb < full.optimizer_gb / 50
    assert (lora.method, qlora.method) == ("lora", "qlora")


@pytest.mark.slow
def test_cli_plans_the_dbrx_recipe_offline_as_json_and_table():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    command = [
        sys.executable,
        "-m",
        "dbrx_tune.tools.plan",
        "recipes/dbrx_sft.yaml",
        "--gpus",
        "16",
        "--gpu-memory",
        "80",
    ]
    result = subprocess.run(command + ["--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"fits", "per_gpu_gb", "min_gpus"} <= set(data)
    assert data["min_gpus"] > 16 and not data["fits"]
    table = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "smallest GPU count that fits" in table.stdout and str(data["min_gpus"]) in table.stdout


@pytest.mark.slow
def test_cli_names_a_missing_recipe():
    result = subprocess.run(
        [sys.executable, "-m", "dbrx_tune.tools.plan", "nope.yaml", "--gpus", "8"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "nope.yaml" in result.stderr


# Dense Llama 2 next to DBRX: the same planner, shapes and LoRA counts checked against what transformers and the
# toolkit build.

LLAMA_70B, LLAMA_7B = "meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-7b-hf"


def _meta_model(hub_id: str):
    """The real-size model built by transformers on the meta device (shapes only, no memory)."""
    import torch
    from transformers import DbrxForCausalLM, LlamaConfig, LlamaForCausalLM

    from dbrx_tune.modeling.config import dbrx_base_config

    k = KNOWN_CONFIGS[hub_id]
    with torch.device("meta"):
        if k["experts"] > 1:
            return DbrxForCausalLM(dbrx_base_config(n_layers=k["n_layers"]))
        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=k["d_model"],
                num_hidden_layers=k["n_layers"],
                num_attention_heads=k["n_heads"],
                num_key_value_heads=k["kv_heads"],
                intermediate_size=k["ffn"],
                vocab_size=k["vocab"],
            )
        )


@pytest.mark.parametrize("hub_id", ["databricks/dbrx-base", LLAMA_7B, LLAMA_70B])
def test_known_shapes_count_exactly_the_parameters_transformers_builds(hub_id):
    shape = ModelShape(**KNOWN_CONFIGS[hub_id])
    assert shape.total_params == sum(p.numel() for p in _meta_model(hub_id).parameters())


@pytest.mark.parametrize(
    "model_dir, recipe_values",
    [
        ("recipes/tiny/dbrx-tiny", {}),
        ("recipes/tiny/dbrx-tiny", {"lora_target_experts": False}),
        ("recipes/tiny/dbrx-tiny", {"lora_target_attention": False, "train_router": True}),
        ("recipes/tiny/llama2-tiny", {}),
        ("recipes/tiny/llama2-tiny", {"lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    ],
)
def test_lora_count_equals_what_the_toolkit_trains(model_dir, recipe_values):
    import torch
    from transformers import DbrxForCausalLM, LlamaForCausalLM

    from dbrx_tune.args import ModelArguments
    from dbrx_tune.build import finish_model, is_dbrx, load_model_config, prepare_for_training
    from dbrx_tune.tools.plan import lora_targets, model_shape

    args = ModelArguments(
        model_name_or_path=os.path.join(REPO_ROOT, model_dir), use_peft=True, lora_r=8, **recipe_values
    )
    config = load_model_config(args)
    with torch.device("meta"):
        model = (DbrxForCausalLM if is_dbrx(config) else LlamaForCausalLM)(config)
        model = prepare_for_training(finish_model(model, args), args)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = model_shape(args.model_name_or_path)
    assert shape.lora_params(8, lora_targets({**recipe_values, "lora_r": 8}, shape)) == trained


@pytest.mark.slow
def test_llama2_recipe_plans_offline_and_needs_fewer_gpus_than_dbrx(monkeypatch):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "dbrx_tune.tools.plan", "recipes/llama2_sft.yaml", "--gpus", "8", "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    llama_70b = json.loads(result.stdout)
    assert {"fits", "per_gpu_gb", "min_gpus"} <= set(llama_70b) and llama_70b["method"] == "full"
    from dbrx_tune.tools.plan import plan_recipe

    monkeypatch.chdir(REPO_ROOT)  # recipes name their DeepSpeed config relative to the repository root
    dbrx = plan_recipe("recipes/dbrx_sft_zero3.yaml", gpus=8, gpu_memory_gb=80)
    llama_7b = plan_recipe(
        "recipes/llama2_sft.yaml", gpus=8, gpu_memory_gb=80, overrides={"model_name_or_path": LLAMA_7B}
    )
    assert llama_7b.min_gpus < llama_70b["min_gpus"] < dbrx.min_gpus
    assert llama_7b.per_gpu_gb < llama_70b["per_gpu_gb"] < dbrx.per_gpu_gb


def test_qlora_stores_attention_and_mlp_in_nf4():
    llama = ModelShape(**KNOWN_CONFIGS[LLAMA_70B])
    lora = plan({**FULL, "use_peft": True}, llama, gpus=1, gpu_memory_gb=80, ds_config=None)
    qlora = plan({**FULL, "use_peft": True, "load_in_4bit": True}, llama, gpus=1, gpu_memory_gb=80, ds_config=None)
    nested = plan(
        {**FULL, "use_peft": True, "load_in_4bit": True, "use_bnb_nested_quant": True},
        llama,
        gpus=1,
        gpu_memory_gb=80,
        ds_config=None,
    )
    assert nested.params_gb < qlora.params_gb < lora.params_gb / 3  # only embeddings and head stay bf16
    assert qlora.optimizer_gb == lora.optimizer_gb and qlora.min_gpus == 1 and lora.min_gpus is None


def test_dbrx_qlora_weights_agree_with_the_measured_132b_benchmark():
    with open(os.path.join(REPO_ROOT, "bench", "results", "qlora_132b.json"), encoding="utf-8") as handle:
        measured = json.load(handle)
    base_weights_gb = sum(gb for part, gb in measured["weights_breakdown_gb"].items() if part != "lora")
    values = {**FULL, "use_peft": True, "load_in_4bit": True, "use_bnb_nested_quant": True}
    predicted = plan(values, DBRX, gpus=1, gpu_memory_gb=80, ds_config=None)
    assert predicted.params_gb * 1024**3 / 1e9 == pytest.approx(base_weights_gb, rel=0.05)


def test_expert_parallelism_on_a_dense_model_is_an_error():
    llama = ModelShape(**KNOWN_CONFIGS[LLAMA_7B])
    with pytest.raises(ValueError, match="expert parallelism.*dense"):
        plan(
            FULL,
            llama,
            gpus=8,
            gpu_memory_gb=80,
            ds_config={**ZERO3, "expert_parallel": {"enabled": True, "autoep_size": 8}},
        )


def test_a_config_neither_dbrx_nor_llama_style_is_named(tmp_path):
    from dbrx_tune.tools.plan import model_shape

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=f"{tmp_path}.*gpt2"):
        model_shape(str(tmp_path))
