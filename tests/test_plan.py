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


# Long context: the QLoRA plan against the 132B peaks measured by bench/qlora_132b.py at 4k, 16k and 32k tokens.


def _measured_qlora_runs() -> list[dict]:
    """(settings, run) of every committed bench/qlora_132b.py measurement: the 4k JSON and the long-context runs."""
    results = os.path.join(REPO_ROOT, "bench", "results")
    with open(os.path.join(results, "qlora_132b.json"), encoding="utf-8") as handle:
        short = json.load(handle)
    with open(os.path.join(results, "qlora_132b_long.json"), encoding="utf-8") as handle:
        long = json.load(handle)
    settings = {key: long[key] for key in ("experts_per_group", "fused_loss", "activation_offload", "moe_token_chunk")}
    short_run = {"seq_len": short["seq_len"], "peak_gb": short["peak_gb"], "lora": short["lora"]}
    return [({**settings, "lora": short["lora"]}, short_run)] + [
        ({**settings, "lora": long["lora"]}, run) for run in long["runs"]
    ]


def _bench_values(settings: dict, seq_len: int) -> dict:
    """The recipe keys of one bench/qlora_132b.py run: QLoRA (nested NF4), LoRA on attention and experts,
    checkpointing, batch 1."""
    return {
        "use_peft": True,
        "load_in_4bit": True,
        "use_bnb_nested_quant": True,
        "lora_r": settings["lora"]["r"],
        "gradient_checkpointing": True,
        "per_device_train_batch_size": 1,
        "max_length": seq_len,
        "experts_per_group": settings["experts_per_group"],
        "fused_loss": settings["fused_loss"],
        "activation_offload": settings["activation_offload"],
        "moe_token_chunk": settings["moe_token_chunk"],
    }


@pytest.mark.parametrize("index", range(4))
def test_qlora_first_step_agrees_with_the_measured_132b_peak_within_10_percent(index):
    runs = _measured_qlora_runs()
    assert len(runs) == 4 and {run["seq_len"] for _, run in runs} == {4096, 16384, 32768}
    settings, run = runs[index]
    predicted = plan(_bench_values(settings, run["seq_len"]), DBRX, gpus=1, gpu_memory_gb=80, ds_config=None)
    # the bench measures one step: forward and backward before the optimizer state exists
    assert predicted.first_step_gb * 1024**3 / 1e9 == pytest.approx(run["peak_gb"], rel=0.10)


def test_qlora_recipe_fits_one_80gb_gpu(monkeypatch):
    from dbrx_tune.tools.plan import plan_recipe

    monkeypatch.chdir(REPO_ROOT)
    result = plan_recipe("recipes/dbrx_sft_qlora.yaml", gpus=1, gpu_memory_gb=80)
    with open(os.path.join(REPO_ROOT, "bench", "results", "qlora_132b.json"), encoding="utf-8") as handle:
        measured = json.load(handle)
    # adapters are fp32 weights beside the frozen base; AdamW keeps two fp32 moments of them, no master copy
    assert result.params_gb * 1024**3 / 1e9 == pytest.approx(measured["weights_gb"], rel=0.03)
    assert result.optimizer_gb * 1024**3 / 1e9 == pytest.approx(measured["optimizer_gb"], rel=0.03)
    assert result.fits and result.min_gpus == 1 and result.per_gpu_gb <= 80


def test_fused_loss_offload_and_moe_chunks_each_shrink_long_context_activations():
    base = {"use_peft": True, "load_in_4bit": True, "gradient_checkpointing": True, "max_length": 32768}
    plans = [
        plan({**base, **extra}, DBRX, gpus=1, gpu_memory_gb=80, ds_config=None)
        for extra in (
            {"fused_loss": False},
            {"fused_loss": True},
            {"fused_loss": True, "activation_offload": True},
            {"fused_loss": True, "activation_offload": True, "moe_token_chunk": 4096},
        )
    ]
    acts = [p.activations_gb for p in plans]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 4
    assert plans[2].host_activations_gb > 0 == plans[1].host_activations_gb


def test_sequence_parallelism_divides_activations_and_needs_a_multiple_of_sp_gpus():
    full = {"max_length": 32768, "gradient_checkpointing": True, "fused_loss": True}
    alone = plan(full, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    split = plan({**full, "sp_size": 8}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
    assert split.sp_size == 8 and split.activations_gb == pytest.approx(alone.activations_gb / 8, rel=0.05)
    assert split.min_gpus % 8 == 0
    with pytest.raises(ValueError, match="max_length 32767 is not divisible by sp_size 8"):
        plan({**full, "sp_size": 8, "max_length": 32767}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_8bit_optimizers_hold_a_quarter_of_the_adam_moments(method):
    """bitsandbytes' 8-bit AdamW keeps one byte per moment instead of four; full fine-tuning keeps its fp32 master."""
    values = {"use_peft": True, "load_in_4bit": True} if method == "qlora" else {}
    values.update(max_length=4096, gradient_checkpointing=True)
    fp32 = plan(values, DBRX, gpus=1, gpu_memory_gb=80, ds_config=None)
    eight_bit = plan({**values, "optim": "adamw_8bit"}, DBRX, gpus=1, gpu_memory_gb=80, ds_config=None)
    master = 0 if method == "qlora" else 4
    assert eight_bit.optimizer_gb == pytest.approx(fp32.optimizer_gb * (2 + master) / (8 + master), rel=0.01)
    assert eight_bit.per_gpu_gb < fp32.per_gpu_gb


def test_max_length_above_the_models_context_is_refused_naming_both():
    with pytest.raises(ValueError, match="max_length 65536 exceeds the model's max_seq_len 32768"):
        plan({**FULL, "max_length": 65536}, DBRX, gpus=8, gpu_memory_gb=80, ds_config=ZERO3)
