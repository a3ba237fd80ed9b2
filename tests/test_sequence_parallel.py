"""Ulysses sequence parallelism (DeepSpeed ALST) on DBRX: two gloo ranks give one process's loss and gradients, and
the recipe settings it cannot work with are refused before any weights load.

DeepSpeed's `UlyssesSPAttentionHF` runs on a CPU: its all-to-all is a plain `torch.distributed` collective, which
gloo implements. The worker below does what the HF Trainer does under `sp_size` (transformers'
`deepspeed_sp_compute_loss`): every rank runs its shard of the sequence with pre-shifted labels, and the ranks' losses
are combined weighted by their label counts. The router load-balancing loss is left out of the comparison: each rank
computes it on its own tokens, so under sequence parallelism it is close to, not equal to, the full-sequence value.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from gloo_ranks import REPO_ROOT, launch_two_ranks, start_gloo_deepspeed

SFT_RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_sft.yaml")
ZERO3 = os.path.join(REPO_ROOT, "recipes", "deepspeed", "zero3.json")
ZERO3_EP = os.path.join(REPO_ROOT, "recipes", "deepspeed", "zero3_ep.json")


def _worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import DbrxForCausalLM

    from dbrx_tune.modeling.config import tiny_dbrx_config
    from dbrx_tune.modeling.experts import set_experts_implementation

    start_gloo_deepspeed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254)
    config._attn_implementation = "sdpa"
    model = set_experts_implementation(DbrxForCausalLM(config).float(), "grouped").train()
    input_ids = torch.randint(0, 254, (1, 32), generator=torch.Generator().manual_seed(1))

    whole = model(input_ids=input_ids, labels=input_ids).loss
    whole.backward()
    reference = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=world, micro_batch_size=1
    )
    shift_labels = torch.nn.functional.pad(input_ids, (0, 1), value=-100)[:, 1:]
    shard = slice(rank * input_ids.shape[1] // world, (rank + 1) * input_ids.shape[1] // world)
    positions = torch.arange(input_ids.shape[1])[None]
    out = model(
        input_ids=input_ids[:, shard],
        position_ids=positions[:, shard],
        labels=shift_labels[:, shard],
        shift_labels=shift_labels[:, shard],
    )
    share = (shift_labels[:, shard] != -100).sum() / (shift_labels != -100).sum()
    (out.loss * share).backward()
    loss = (out.loss.detach() * share).clone()
    dist.all_reduce(loss)
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank holds its shard's part of every weight's gradient
        worst = max(worst, (grad - reference[name]).abs().max().item())
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as handle:
            json.dump({"whole": whole.item(), "sequence_parallel": loss.item(), "max_grad_diff": worst}, handle)


@pytest.mark.slow
def test_ulysses_on_two_ranks_gives_one_process_loss_and_gradients(tmp_path):
    out = tmp_path / "sp.json"
    launch_two_ranks(__file__, [str(out)], port_offset=21, timeout=150, what="Ulysses run")
    result = json.loads(out.read_text())
    assert result["sequence_parallel"] == pytest.approx(result["whole"], rel=1e-5)
    assert result["max_grad_diff"] < 1e-5


def _start(tmp_path, *overrides: str):
    from trl import SFTConfig

    from dbrx_tune.training.stage import start_stage

    base = [SFT_RECIPE, "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--attn_implementation", "sdpa"]
    return start_stage([*base, *overrides], SFTConfig)


def test_an_accepted_sp_size_configures_accelerate_and_pads_to_equal_shards(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    recipe = _start(tmp_path, "--sp_size", "2", "--deepspeed", ZERO3)
    parallelism = recipe.training.parallelism_config
    assert parallelism.sp_size == 2 and parallelism.sp_backend == "deepspeed"
    assert parallelism.sp_handler.sp_attn_implementation == recipe.model.attn_implementation == "sdpa"
    assert recipe.training.pad_to_multiple_of == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--sp_size", "2"), "runs inside DeepSpeed; set deepspeed"),
        (("--sp_size", "3", "--deepspeed", ZERO3), "4 attention heads and 2 KV heads must split evenly"),
        (
            ("--sp_size", "2", "--deepspeed", ZERO3, "--max_length", "127"),
            "max_length 127 is not a multiple of sp_size 2",
        ),
        (("--sp_size", "2", "--deepspeed", ZERO3, "--packing", "true"), "packed documents would attend to each other"),
        (("--sp_size", "2", "--deepspeed", ZERO3, "--attn_implementation", "eager"), "eager cannot be sharded"),
        (("--sp_size", "0", "--deepspeed", ZERO3), "sp_size must be a positive number of ranks"),
    ],
)
def test_sequence_parallel_settings_that_cannot_work_are_refused_before_loading(
    tmp_path, monkeypatch, overrides, message
):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit, match=message):
        _start(tmp_path, *overrides)
    assert not (tmp_path / "out").exists()


def test_sequence_parallelism_is_refused_beside_autoep(tmp_path, monkeypatch):
    from trl import SFTConfig

    from dbrx_tune.build import load_model_config
    from dbrx_tune.training.sequence_parallel import check_sequence_parallel

    monkeypatch.chdir(REPO_ROOT)
    with open(ZERO3_EP, encoding="utf-8") as handle:
        ds_config = json.load(handle)
    ds_config["expert_parallel"]["autoep_size"] = 2  # the tiny model's 4 experts over 2 ranks
    path = tmp_path / "zero3_ep2.json"
    path.write_text(json.dumps(ds_config))
    recipe = _start(tmp_path, "--sp_size", "2", "--deepspeed", ZERO3)
    recipe.training.deepspeed = str(path)  # start_stage's own check wants 2 ranks for EP 2; this is one process
    with pytest.raises(ValueError, match="refuses Ulysses sequence parallelism together with AutoEP"):
        check_sequence_parallel(recipe, load_model_config(recipe.model), SFTConfig)


def test_sequence_parallelism_is_refused_outside_sft(tmp_path, monkeypatch):
    from trl import DPOConfig

    from dbrx_tune.training.stage import start_stage

    monkeypatch.chdir(REPO_ROOT)
    recipe = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_dpo.yaml")
    with pytest.raises(SystemExit, match="sequence parallelism is supported for SFT only, not DPOConfig"):
        start_stage(
            [
                recipe,
                "--output_dir",
                str(tmp_path / "out"),
                "--sp_size",
                "2",
                "--deepspeed",
                ZERO3,
                "--report_to",
                "none",
            ],
            DPOConfig,
        )


def test_the_32k_full_fine_tuning_recipe_plans_sequence_parallel_ranks(monkeypatch):
    from dbrx_tune.tools.plan import plan_recipe

    monkeypatch.chdir(REPO_ROOT)
    split = plan_recipe("recipes/dbrx_sft_32k.yaml", gpus=32, gpu_memory_gb=80)
    assert split.sp_size == 8 and split.seq_len == 32768 and split.zero_stage == 3 and split.fits
    assert split.min_gpus == 32


if __name__ == "__main__":
    _worker(sys.argv[1])
