"""`rlhf/ppo.py` under DeepSpeed ZeRO-3 on 2 CPU processes (gloo, fp32, torch AdamW), end to end.

Under ZeRO-3 the policy and value model are one partitioned engine, the frozen reference is a second partitioned
model built from the same seed, rollouts generate with `synced_gpus`, and the save gathers the partitions into
plain DBRX checkpoints. The test starts this file as the worker (`python -m torch.distributed.run --nproc_per_node 2
tests/test_ppo_zero3.py RECIPE --key value ...`); the worker prepares DeepSpeed's communicator for a CPU run and
calls the stage script's `main` with those arguments.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from gloo_ranks import REPO_ROOT, WORLD, ZERO3_AUTO, launch_two_ranks, start_gloo_deepspeed
from safetensors.torch import load_file

from dbrx_tune.training.manifest import MANIFEST, verify_manifest

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or executes

RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_ppo.yaml")
UPDATES = 2
PROMPTS_PER_RANK = 2
LEARNING_RATE = 3e-3
N_EXPERTS, FFN, D_MODEL = 4, 128, 64  # recipes/tiny/dbrx-tiny


def _worker(argv: list[str]) -> None:
    from rlhf.ppo import main

    start_gloo_deepspeed()
    main(argv)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """(output_dir, stdout) of one 2-process ZeRO-3 run: 2 updates of 2 prompts per rank, 4-token responses."""
    work = tmp_path_factory.mktemp("ppo_zero3")
    ds_config = work / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_AUTO))
    out = work / "out"
    recipe_args = [
        RECIPE,
        "--deepspeed",
        str(ds_config),
        "--use_cpu",
        "true",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",  # checkpoints of partitioned grouped experts
        "--per_device_train_batch_size",
        str(PROMPTS_PER_RANK),
        "--num_mini_batches",
        "1",
        "--num_ppo_epochs",
        "1",
        "--response_length",
        "4",
        "--local_rollout_forward_batch_size",
        str(PROMPTS_PER_RANK),
        "--total_episodes",
        str(UPDATES * PROMPTS_PER_RANK * WORLD),
        "--max_train_samples",
        "8",
        "--learning_rate",
        str(LEARNING_RATE),
    ]
    result = launch_two_ranks(__file__, recipe_args, port_offset=21, timeout=180, what="ZeRO-3 PPO run")
    return out, result.stdout


def test_zero3_ppo_partitions_the_models_and_logs_every_update_with_finite_metrics(ppo_run):
    out, stdout = ppo_run
    # policy, reference and value model were each built partitioned (ZeRO-3 zero.Init + leaf MoE blocks)
    assert stdout.count("ZeRO-3: registered 2 DBRX MoE blocks as leaf modules") == 3
    state = json.loads((out / "trainer_state.json").read_text())
    history = state["log_history"]
    assert state["global_step"] == UPDATES
    assert [entry["step"] for entry in history] == list(range(1, UPDATES + 1))
    assert history[-1]["episode"] == UPDATES * PROMPTS_PER_RANK * WORLD  # both ranks' prompts counted
    for entry in history:
        for name in (
            "objective/kl",
            "objective/scores",
            "objective/rlhf_reward",
            "loss/policy_avg",
            "loss/value_avg",
            "router/aux_loss",
            "policy/entropy_avg",
        ):
            assert math.isfinite(entry[name]), (name, entry)
    # The reference is a second seeded build: it equals the policy until the first update, then the policy moves.
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(history[1]["objective/kl"]) > 1e-4
    assert json.loads((out / "train_results.json").read_text())["objective/kl"] == history[-1]["objective/kl"]
    # intermediate checkpoints of the partitioned grouped experts were written too
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}" for step in range(1, UPDATES + 1)]
    for checkpoint in out.glob("checkpoint-*"):  # hashed once both ranks had written their files
        verify_manifest(str(checkpoint))
        recorded = json.loads((checkpoint / MANIFEST).read_text())["files"]
        assert {f"random_states_{rank}.pkl" for rank in range(WORLD)} <= set(recorded), sorted(recorded)


def test_zero3_ppo_saves_a_trained_policy_that_stock_dbrx_loads_in_the_original_layout(ppo_run):
    from transformers import DbrxForCausalLM

    out, _ = ppo_run
    saved = load_file(out / "model.safetensors")
    assert saved["transformer.blocks.0.ffn.experts.mlp.w1"].shape == (N_EXPERTS * FFN, D_MODEL)
    assert saved["transformer.blocks.1.ffn.experts.mlp.w2"].shape == (N_EXPERTS * FFN, D_MODEL)  # un-transposed
    assert saved["transformer.blocks.0.ffn.router.layer.weight"].shape == (N_EXPERTS, D_MODEL)
    assert not any(key.startswith(("policy.", "value_model.")) or "score" in key for key in saved)

    policy = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(policy.transformer.blocks[0].ffn.experts).__name__ == "DbrxExperts"  # stock 2D experts
    loaded = policy.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in saved.items())
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([[100257, 9906, 11, 1917]])).logits
    assert torch.isfinite(logits).all()
    # The norm weights start at exactly 1 (the random matrices depend on zero.Init's RNG use); two AdamW steps of
    # lr move each weight by at most about 2 * lr, and by more than nothing.
    norms = [
        tensor for key, tensor in saved.items() if key.endswith("norm_1.weight") or key == "transformer.norm_f.weight"
    ]
    moved = torch.stack([(norm - 1).abs().max() for norm in norms])
    assert (moved > 0).all() and (moved <= UPDATES * LEARNING_RATE * 1.01).all(), moved


def test_zero3_ppo_saves_a_trained_value_model_that_load_value_model_restores(ppo_run):
    from dbrx_tune.args import ModelArguments
    from dbrx_tune.build import load_value_model
    from dbrx_tune.modeling.value_head import DbrxForTokenValue

    out, _ = ppo_run
    directory = str(out / "value_model")
    saved = load_file(os.path.join(directory, "model.safetensors"))
    assert saved["transformer.blocks.0.ffn.experts.mlp.v1"].shape == (N_EXPERTS * FFN, D_MODEL)
    assert saved["score.weight"].shape == (1, D_MODEL)
    # the head starts at zero on a causal-LM checkpoint; a non-zero saved head was trained
    assert saved["score.weight"].abs().max() > 0

    value_model = load_value_model(ModelArguments(model_name_or_path=directory, dtype="float32"), directory)
    assert isinstance(value_model, DbrxForTokenValue)
    torch.testing.assert_close(value_model.score.weight.detach(), saved["score.weight"], rtol=0, atol=0)
    with torch.no_grad():
        values = value_model(input_ids=torch.tensor([[100257, 9906, 11, 1917]])).token_values
    assert values.shape == (1, 4) and torch.isfinite(values).all()


if __name__ == "__main__":
    _worker(sys.argv[1:])
