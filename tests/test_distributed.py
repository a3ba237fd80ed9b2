"""ZeRO-3 and expert parallelism for DBRX on 2 CPU processes (gloo), the DBRX AutoEP preset, and launch checks.

The 2-process runs start this file as a worker (`python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py MODE OUT.json`); the worker trains a tiny DBRX with DeepSpeed and writes what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from gloo_ranks import REPO_ROOT, VOCAB, build_model, launch_two_ranks, start_gloo_deepspeed, tiny_config

STEPS = 3
MICRO_BATCH = 2
SEQ = 16


def batches(world_size: int) -> torch.Tensor:
    """(STEPS, world_size * MICRO_BATCH, SEQ) token ids: the global batch of every step."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (STEPS, world_size * MICRO_BATCH, SEQ), generator=generator)


def single_process_losses(world_size: int) -> list[float]:
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches(world_size):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _worker(mode: str, out_path: str) -> None:
    """One rank of a 2-process ZeRO-3 run; mode 'leaf' (no EP) or 'ep' (AutoEP, EP=2)."""
    import deepspeed
    from transformers import DbrxForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from dbrx_tune.parallel.zero3 import apply_experts_implementation, prepare_for_deepspeed

    start_gloo_deepspeed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    if mode == "ep":
        ds_config["expert_parallel"] = {
            "enabled": True,
            "autoep_size": 2,
            "preset_model": "dbrx",
            "use_grouped_mm": False,
        }
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (keeps ZeRO-3 "active" for transformers)
    report: dict = {}

    # Random init the way the loader does it: _from_config with the HF DeepSpeed config active (zero.Init).
    zero_init_model = DbrxForCausalLM._from_config(tiny_config(), dtype=torch.float32)
    apply_experts_implementation(zero_init_model, "grouped")
    experts = zero_init_model.transformer.blocks[0].ffn.experts
    with deepspeed.zero.GatheredParameters(list(experts.parameters())):
        report["zero_init_experts"] = {
            name: {"finite": bool(torch.isfinite(p).all()), "std": p.std().item(), "shape": list(p.shape)}
            for name, p in experts.named_parameters()
        }
    del zero_init_model

    model = build_model()  # same weights as the single-process reference
    report["prepared"] = prepare_for_deepspeed(model, ds_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    report["ffn_class"] = type(engine.module.transformer.blocks[0].ffn).__name__
    losses = []
    for batch in batches(world):
        micro = batch[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        loss = engine(input_ids=micro, labels=micro).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    report["losses"] = losses

    # Skew: rank 0 feeds one repeated token, so all its tokens pick the same top-k experts; rank 1 routes normally.
    skewed = torch.full((MICRO_BATCH, SEQ), 7) if rank == 0 else batches(world)[0][:MICRO_BATCH]
    for _ in range(2):
        out = engine(input_ids=skewed, labels=skewed, output_router_logits=True)
        engine.backward(out.loss)
        engine.step()
    chosen = torch.topk(out.router_logits[0], k=2, dim=-1).indices.unique().tolist()
    report["skew_experts_used"] = chosen
    report["skew_finished"] = True
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    torch.distributed.barrier()


def run_two_ranks(mode: str, tmp_path) -> dict:
    out = tmp_path / f"{mode}.json"
    launch_two_ranks(__file__, [mode, str(out)], port_offset=7 if mode == "ep" else 0, timeout=150, what=f"{mode} run")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference_losses():
    return single_process_losses(world_size=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, prepared, ffn_class", [("leaf", "zero3_leaf", "DbrxFFN"), ("ep", "autoep", "AutoEPMoELayer")]
)
def test_zero3_two_ranks_train_like_one_process_and_survive_skewed_routing(
    mode, prepared, ffn_class, reference_losses, tmp_path
):
    report = run_two_ranks(mode, tmp_path)
    assert report["prepared"] == prepared
    assert report["ffn_class"] == ffn_class
    assert report["losses"] == pytest.approx(reference_losses, abs=1e-4)
    assert report["skew_finished"]
    assert len(report["skew_experts_used"]) == 2  # rank 0 really used only top_k=2 of the 4 experts
    # zero.Init random init through _from_config + the ZeRO-3-aware experts swap: real, finite weights.
    for name, stats in report["zero_init_experts"].items():
        assert stats["finite"], name
        assert stats["std"] == pytest.approx(0.02, rel=0.2), name  # initializer_range
    assert report["zero_init_experts"]["w2"]["shape"] == [4, 64, 128]


def test_dbrx_autoep_preset_replaces_blocks_with_the_same_outputs_and_router_logits():
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    from dbrx_tune.parallel.autoep import prepare_dbrx_for_autoep, register_dbrx_autoep_preset

    model = build_model().eval()
    ids = batches(1)[0]
    before = model(input_ids=ids, output_router_logits=True)
    register_dbrx_autoep_preset()
    assert prepare_dbrx_for_autoep(model) == 2
    assert "transformer.blocks.0.ffn.router_gate.weight" not in model.state_dict()  # alias is not a submodule
    autoep = AutoEP(
        model, parse_autoep_config({"enabled": True, "autoep_size": 1, "preset_model": "dbrx", "use_grouped_mm": False})
    )
    specs = autoep.ep_parser()
    assert [s.moe_module_name for s in specs] == ["transformer.blocks.0.ffn", "transformer.blocks.1.ffn"]
    spec = specs[0]
    assert (spec.expert_w1_name, spec.expert_w3_name, spec.expert_w2_name) == ("w1", "v1", "w2")
    assert (spec.num_experts, spec.top_k, spec.hidden_size, spec.ffn_hidden_size) == (4, 2, 64, 128)
    assert (spec.score_func, spec.score_apply, spec.route_norm) == ("softmax", "post", True)
    autoep.replace_moe_layers(specs, ep_size=1, ep_rank=0)
    after = model(input_ids=ids, output_router_logits=True)
    assert type(model.transformer.blocks[0].ffn).__name__ == "AutoEPMoELayer"
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    assert len(after.router_logits) == 2
    torch.testing.assert_close(after.router_logits[0], before.router_logits[0])
    torch.testing.assert_close(after.aux_loss, before.aux_loss)


def test_deepspeed_stock_router_logit_retarget_breaks_on_this_transformers_and_ours_does_not():
    """DeepSpeed 0.19.8 calls the registry's get(key, default); transformers 5.2x's registry get takes one argument."""
    from deepspeed.module_inject.auto_ep_presets.base import _install_instance_transformers_output_recorders
    from transformers.utils import output_capturing

    from dbrx_tune.parallel.autoep import retarget_router_logit_recorders

    model = build_model()
    key = str(model.transformer.__class__)
    entries = {key: dict(model.transformer._can_record_outputs)}
    if isinstance(output_capturing._CAN_RECORD_REGISTRY, output_capturing._CanRecordRegistry):
        with pytest.raises(TypeError):
            _install_instance_transformers_output_recorders(model, entries, output_capturing, lambda m: 0)
    original = dict.get(output_capturing._CAN_RECORD_REGISTRY, key)
    assert retarget_router_logit_recorders(model, torch.nn.Linear, lambda m: 0) >= 1
    assert dict.get(output_capturing._CAN_RECORD_REGISTRY, key) is original  # class-level registry restored


def test_deepspeed_rejects_the_dbrx_preset_until_registered_then_accepts_it():
    from deepspeed.module_inject.auto_ep_presets import registry

    from dbrx_tune.parallel.autoep import register_dbrx_autoep_preset

    register_dbrx_autoep_preset()
    register_dbrx_autoep_preset()  # idempotent
    assert registry.get_preset("dbrx").expert_w3 == "v1"
    assert registry.preset_name_for_hf_model_type("dbrx") == "dbrx"


# --- configuration checks before launch ---------------------------------------------------------------------


def ep_config(size, **extra):
    config = {"zero_optimization": {"stage": 3}, "expert_parallel": {"enabled": True, "autoep_size": size}}
    for key, value in extra.items():
        config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.__setitem__(key, value)
    return config


def test_repo_zero3_ep_config_fits_dbrx_on_one_and_several_nodes():
    from dbrx_tune.parallel.launch import check_parallel_config, read_json_config
    from dbrx_tune.parallel.zero3 import expert_parallel_size

    config = read_json_config(os.path.join(REPO_ROOT, "recipes/deepspeed/zero3_ep.json"))
    assert expert_parallel_size(config) == 8
    for world_size in (8, 16, 32):
        check_parallel_config(config, world_size=world_size, num_experts=16)


def test_repo_zero3_ep_config_passes_deepspeeds_own_autoep_validation():
    """The shipped AutoEP options (fused combine, asynchronous split plan: bench/RESULTS.md) are ones DeepSpeed
    accepts together; a typo or a combination it rejects would otherwise surface only on the GPU cluster."""
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config, validate_autoep_config

    from dbrx_tune.parallel.autoep import register_dbrx_autoep_preset
    from dbrx_tune.parallel.launch import read_json_config

    register_dbrx_autoep_preset()
    config = read_json_config(os.path.join(REPO_ROOT, "recipes/deepspeed/zero3_ep.json"))
    autoep = parse_autoep_config(config["expert_parallel"])
    assert (autoep.combine_impl, autoep.async_split_plan) == ("fused_weighted_sum", True)
    validate_autoep_config(autoep, world_size=16, pp_size=1, tp_size=1, sp_size=1, zero_stage=3)


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        (ep_config(3), {"world_size": 6, "num_experts": 16}, "does not divide the model's 16 experts"),
        (ep_config(4), {"world_size": 6, "num_experts": 16}, "does not divide the world size 6"),
        (ep_config(2), {"world_size": 8, "num_experts": 16, "experts_implementation": "eager"}, "grouped"),
        (ep_config(2), {"world_size": 8, "num_experts": 16, "use_peft": True}, "use_peft"),
        (
            ep_config(2, zero_optimization={"zero_quantized_gradients": True}),
            {"world_size": 8, "num_experts": 16},
            "quantized gradients",
        ),
        (ep_config(2, zero_optimization={"zero_hpz_partition_size": 8}), {"world_size": 8, "num_experts": 16}, "hpZ"),
        (ep_config(2, sequence_parallel_size=2), {"world_size": 8, "num_experts": 16}, "sequence parallelism"),
        (
            ep_config(2, expert_parallel={"expert_tensor_parallel_size": 2}),
            {"world_size": 8, "num_experts": 16},
            "expert tensor parallelism",
        ),
        (ep_config(2, expert_parallel={"preset_model": "mixtral"}), {"world_size": 8, "num_experts": 16}, "'dbrx'"),
    ],
)
def test_bad_parallel_settings_are_rejected_before_launch(config, kwargs, message):
    from dbrx_tune.parallel.launch import ParallelConfigError, check_parallel_config

    with pytest.raises(ParallelConfigError, match=message):
        check_parallel_config(config, **kwargs)


def test_zero3_without_ep_and_ep_under_zero2_pass_the_checks():
    from dbrx_tune.parallel.launch import check_parallel_config

    check_parallel_config({"zero_optimization": {"stage": 3}}, world_size=6, num_experts=16, use_peft=True)
    check_parallel_config(
        ep_config(2, zero_optimization={"stage": 2, "zero_quantized_gradients": True}), world_size=4, num_experts=16
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ({"main_process_ip": None}, "main_process_ip"),
        ({"main_process_ip": "bad host!"}, "main_process_ip"),
        ({"main_process_port": None}, "main_process_port"),
        ({"machine_rank": 2}, "machine_rank"),
        ({"num_processes": 15}, "not a multiple"),
        ({"rdzv_backend": "tcp"}, "rdzv_backend"),
    ],
)
def test_multi_node_launch_without_complete_addresses_is_rejected(override, message):
    from dbrx_tune.parallel.launch import ParallelConfigError, check_launch_settings

    settings = {
        "num_machines": 2,
        "num_processes": 16,
        "machine_rank": 1,
        "main_process_ip": "10.0.0.1",
        "main_process_port": 29500,
        "rdzv_backend": "c10d",
    }
    check_launch_settings(settings)
    with pytest.raises(ParallelConfigError, match=message):
        check_launch_settings({**settings, **override})


def test_repo_accelerate_configs_check_out():
    from dbrx_tune.parallel.launch import ParallelConfigError, check_launch_settings
    from dbrx_tune.recipe import load_yaml_mapping

    os.chdir(REPO_ROOT)
    single = load_yaml_mapping("recipes/accelerate/single_node_8gpu.yaml")
    check_launch_settings(single)
    assert single["num_processes"] == 8
    multi = load_yaml_mapping("recipes/accelerate/multi_node.yaml")
    with pytest.raises(ParallelConfigError, match="main_process_ip"):
        check_launch_settings(multi)  # per-run addresses are placeholders until the launcher fills them
    check_launch_settings({**multi, "main_process_ip": "gpu01", "machine_rank": 0})


def test_slurm_node_lists_expand_like_scontrol():
    from dbrx_tune.parallel.launch import expand_nodelist

    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a1,b[9-10]") == ["a1", "b9", "b10"]


def slurm_dry_run(**extra_env: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHON=sys.executable, **extra_env)
    env.pop("SLURM_JOB_NODELIST", None)
    if "PYTORCH_CUDA_ALLOC_CONF" not in extra_env:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    result = subprocess.run(
        [
            "bash",
            "scripts/slurm_launch.sh",
            "--dry-run",
            "--nodes",
            "gpu[01-03]",
            "--gpus-per-node",
            "8",
            "--",
            "sft/train.py",
            "recipes/dbrx_sft.yaml",
            "--learning_rate",
            "5e-6",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


@pytest.mark.slow
def test_slurm_launcher_dry_run_prints_one_accelerate_launch_per_node():
    lines = slurm_dry_run()
    assert len(lines) == 3
    for rank, (line, host) in enumerate(zip(lines, ["gpu01", "gpu02", "gpu03"])):
        # ZeRO-3 at DBRX scale needs expandable segments (bench/RESULTS.md); srun hands the variable to every node
        assert line.startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ")
        assert f"--nodelist={host} accelerate launch" in line
        assert f"--machine_rank {rank} " in line
        assert "--num_machines 3 --num_processes 24" in line
        assert "--main_process_ip gpu01 --main_process_port 29500" in line
        assert line.rstrip().endswith("sft/train.py recipes/dbrx_sft.yaml --learning_rate 5e-6")


@pytest.mark.slow
def test_slurm_launcher_keeps_the_users_allocator_setting():
    (line, *_) = slurm_dry_run(PYTORCH_CUDA_ALLOC_CONF="garbage_collection_threshold:0.6")
    assert line.startswith("PYTORCH_CUDA_ALLOC_CONF=garbage_collection_threshold:0.6 ")


@pytest.mark.slow
def test_slurm_launcher_refuses_a_bad_ep_size_before_launching(tmp_path):
    bad = tmp_path / "ep3.json"
    bad.write_text(json.dumps(ep_config(3)))
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {bad}\n"
        "num_machines: 2\nnum_processes: 16\nmain_process_port: 29500\nrdzv_backend: c10d\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHON=sys.executable)
    result = subprocess.run(
        [
            "bash",
            "scripts/slurm_launch.sh",
            "--dry-run",
            "--nodes",
            "n[1-2]",
            "--config",
            str(config),
            "--",
            "sft/train.py",
            "recipes/dbrx_sft.yaml",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "does not divide the model's 16 experts" in result.stderr
    assert "accelerate launch" not in result.stdout


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
