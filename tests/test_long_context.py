"""Long context without changing a number: MoE token chunks and activation offload give the same loss and gradients
(fp32, tiny DBRX), and their settings are refused before any weights load when they cannot work."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DbrxForCausalLM

from dbrx_tune.modeling import experts as experts_module
from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation, set_moe_token_chunk
from dbrx_tune.modeling.lora import apply_expert_lora
from dbrx_tune.modeling.quantized_experts import DbrxNF4Experts, quantize_experts_4bit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_sft.yaml")


def _tiny_lora_model(four_bit: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254)
    model = set_experts_implementation(DbrxForCausalLM(config).float(), "grouped")
    if four_bit:
        quantize_experts_4bit(model)
    model = apply_expert_lora(model, r=4, alpha=8)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters contribute so their gradients differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.train()


def _loss_and_grads(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids, output_router_logits=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(reference, other) -> None:
    (loss, grads), (other_loss, other_grads) = reference, other
    torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == other_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(other_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "four_bit,experts_per_group", [(False, None), (True, None), (True, 3)], ids=["grouped", "nf4", "nf4-groups"]
)
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "checkpointed", "reentrant"])
def test_moe_token_chunks_give_the_same_loss_and_gradients(four_bit, experts_per_group, checkpointing):
    model = _tiny_lora_model(four_bit)
    for experts in _nf4_experts(model):
        experts.experts_per_group = experts_per_group or experts.num_experts  # 4 experts: groups of 3 and 1
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    input_ids = torch.randint(0, 254, (2, 24), generator=torch.Generator().manual_seed(1))
    whole = _loss_and_grads(model, input_ids)
    set_moe_token_chunk(model, 7)  # 48 tokens in chunks of 7, the last one short
    chunks = [m.token_chunk for m in model.modules() if hasattr(type(m), "token_chunk")]
    assert chunks and set(chunks) == {7}
    _assert_same(whole, _loss_and_grads(model, input_ids))


@pytest.mark.parametrize("split_groups", [False, True], ids=["one-group", "expert-groups"])
def test_moe_token_chunks_train_full_experts_the_same(split_groups):
    """Without LoRA the expert weights themselves are trained: their gradients come through the per-block backward,
    also when the blocks run over slices of the weights (expert groups)."""
    torch.manual_seed(0)
    config = tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254)
    model = set_experts_implementation(DbrxForCausalLM(config).float(), "grouped").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, 254, (2, 24), generator=torch.Generator().manual_seed(2))
    whole = _loss_and_grads(model, input_ids)
    assert any(".experts.w1" in name for name in whole[1])
    set_moe_token_chunk(model, 10)
    if split_groups:
        for experts in model.modules():
            if hasattr(type(experts), "token_chunk"):
                experts.expert_groups = lambda: ((0, 1), (1, 4))
    _assert_same(whole, _loss_and_grads(model, input_ids))


def test_checkpointed_layers_do_not_rerun_the_chunked_experts(monkeypatch):
    """Under activation checkpointing the layer's recompute stops before the chunked experts (their inputs are all it
    needs), so every routed row runs once forward and once in its own backward, not a third time in the layer's
    recompute; and each group of 4-bit experts is dequantized once per pass, not once per token chunk."""
    model = _tiny_lora_model(four_bit=True)
    for experts in _nf4_experts(model):
        experts.experts_per_group = 2  # 4 experts: 2 groups
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_moe_token_chunk(model, 8)  # 48 tokens, top 2: blocks of at most 16 of the 96 routed rows per layer
    rows, dequantized = [], []
    original_rows, original_dequantize = experts_module.swiglu_experts, DbrxNF4Experts.dequantize
    monkeypatch.setattr(
        experts_module,
        "swiglu_experts",
        lambda module, x, *rest: rows.append(len(x)) or original_rows(module, x, *rest),
    )
    monkeypatch.setattr(
        DbrxNF4Experts, "dequantize", lambda *args: dequantized.append(args[1]) or original_dequantize(*args)
    )
    _loss_and_grads(model, torch.randint(0, 254, (2, 24), generator=torch.Generator().manual_seed(1)))
    layers, top_k = model.config.n_layers, model.config.ffn_config.moe_top_k
    assert max(rows) <= 8 * top_k and len(rows) > layers * 2 * 2  # several blocks per group and pass
    assert sum(rows) == layers * 48 * top_k * 2
    assert len(dequantized) == layers * 2 * 3 * 2  # layers x groups x (w1, v1, w2) x (forward, backward)


def _nf4_experts(model: torch.nn.Module) -> list[DbrxNF4Experts]:
    return [module for module in model.modules() if isinstance(module, DbrxNF4Experts)]


def test_moe_token_chunk_refuses_the_eager_experts():
    model = DbrxForCausalLM(tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254))
    with pytest.raises(ValueError, match="moe_token_chunk needs experts_implementation: grouped"):
        set_moe_token_chunk(model, 8)


@pytest.mark.parametrize("halves", [False, True], ids=["whole-blocks", "blocks-by-halves"])
def test_activation_offload_moves_checkpointed_inputs_to_host_and_keeps_the_numbers(monkeypatch, halves):
    import transformers.modeling_utils as modeling_utils

    from dbrx_tune.modeling.checkpointing import checkpoint_blocks_by_halves

    packed = []

    class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        """transformers' own offload context, recording what it packs. On a CPU the host copy is a clone (pinned
        memory needs an accelerator, and `.cpu()` of a CPU tensor is the tensor itself)."""

        def __init__(self, pin_memory: bool = False, device_type: str = "cuda"):
            super().__init__(pin_memory=False, device_type=device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tuple(tensor.shape)) or pack(tensor.detach().clone())

    monkeypatch.setattr(modeling_utils, "save_on_cpu", RecordingSaveOnCpu)
    model = _tiny_lora_model(four_bit=False)
    input_ids = torch.randint(0, 254, (2, 24), generator=torch.Generator().manual_seed(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    on_device = _loss_and_grads(model, input_ids)
    if halves:
        checkpoint_blocks_by_halves(model)
    assert not packed
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    offloaded = _loss_and_grads(model, input_ids)
    d_model, layers = model.config.d_model, model.config.n_layers
    # every checkpoint's input went through the host copy: the block's, or both halves' (the MoE half's too)
    assert packed.count((2, 24, d_model)) == layers * (2 if halves else 1)
    _assert_same(on_device, offloaded)


def _start(tmp_path, *overrides: str):
    from dbrx_tune.training.stage import start_stage
    from sft.train import SFTConfig

    return start_stage(
        [SFT_RECIPE, "--output_dir", str(tmp_path / "out"), "--report_to", "none", *overrides], SFTConfig
    )


def test_activation_offload_switches_on_transformers_checkpoint_offload(tmp_path, monkeypatch):
    import dbrx_tune.training.offload as offload
    from dbrx_tune.build import load_model_config

    monkeypatch.chdir(REPO_ROOT)
    recipe = _start(tmp_path, "--gradient_checkpointing", "true", "--use_cpu", "false")
    assert not (recipe.training.activation_checkpointing_kwargs or {}).get("offload")
    recipe.model.activation_offload = True
    monkeypatch.setattr(offload.torch.cuda, "is_available", lambda: True)  # as on a GPU node (nothing is moved)
    offload.check_long_context_settings(recipe, load_model_config(recipe.model))
    assert recipe.training.activation_checkpointing_kwargs["offload"] is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--activation_offload", "true"), "activation_offload: .* set gradient_checkpointing: true"),
        (("--max_length", "4096"), "max_length 4096 exceeds the model's max_seq_len 512"),
        (("--gradient_checkpointing", "true", "--activation_offload", "true"), "need .* GB of host memory, 0.0 GB"),
    ],
)
def test_long_context_settings_are_refused_before_loading(tmp_path, monkeypatch, overrides, message):
    import dbrx_tune.training.offload as offload

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(offload, "available_host_memory", lambda: 0)
    with pytest.raises(SystemExit, match=message):
        _start(tmp_path, *overrides)
    assert not (tmp_path / "out").exists()


def test_the_32k_qlora_recipe_plans_to_fit_one_80gb_gpu(monkeypatch):
    from dbrx_tune.tools.plan import plan_recipe

    monkeypatch.chdir(REPO_ROOT)
    result = plan_recipe("recipes/dbrx_sft_qlora_32k.yaml", gpus=1, gpu_memory_gb=80)
    assert result.seq_len == 32768 and result.fused_loss and result.activation_offload and result.moe_token_chunk
    assert result.fits and result.min_gpus == 1 and result.host_activations_gb > 0


@pytest.mark.slow
def test_tiny_twin_of_the_32k_qlora_recipe_trains_on_cpu(tmp_path, monkeypatch):
    import json

    from sft.train import main as train_sft

    monkeypatch.chdir(REPO_ROOT)
    output_dir = tmp_path / "out"
    train_sft([os.path.join("recipes", "tiny", "dbrx_sft_qlora_32k.yaml"), "--output_dir", str(output_dir)])
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert (output_dir / "adapter_model.safetensors").exists()
