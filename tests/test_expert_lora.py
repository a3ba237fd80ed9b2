"""Per-expert LoRA on DBRX's 3D experts: trainable set, grouped compute, standard PEFT save/load/merge."""

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import layer as peft_lora_layer
from safetensors.torch import load_file, save_file
from transformers import DbrxForCausalLM

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation
from dbrx_tune.modeling.lora import apply_expert_lora, load_expert_adapter, merge_expert_adapter, read_adapter_config

IDS = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


def _swapped_model(seed: int = 0, **config) -> DbrxForCausalLM:
    torch.manual_seed(seed)
    return set_experts_implementation(DbrxForCausalLM(tiny_dbrx_config(**config)).float().eval(), "grouped")


def _randomise_lora(model) -> None:
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)


def test_only_adapter_parameters_receive_gradients_router_frozen_by_default():
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8)
    model(IDS, labels=IDS).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("ffn.experts.lora_A" in n for n in trainable) and any("Wqkv.lora_A" in n for n in trainable)
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_train_router_makes_router_trainable_and_saved(tmp_path):
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8, train_router=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("router" in n and "lora_" not in n for n in trainable)
    model.save_pretrained(tmp_path)
    assert any("router" in key for key in load_file(tmp_path / "adapter_model.safetensors"))


def test_each_expert_gets_its_own_lora_pair():
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8, target_attention=False)
    experts = model.base_model.model.transformer.blocks[0].ffn.experts  # outermost wrapper: w2
    assert experts.parameter_name == "w2" and experts.num_experts == 4
    assert experts.lora_A["default"].weight.shape == (4 * 4, 128)  # (r * n_experts, ffn): w2's input
    assert experts.lora_B["default"].weight.shape == (64, 4 * 4)


def test_expert_lora_runs_without_a_dense_weight_delta(monkeypatch):
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8)
    _randomise_lora(model)

    def forbidden(*args, **kwargs):
        raise AssertionError("dense expert delta built")

    monkeypatch.setattr(peft_lora_layer.ParamWrapper, "get_delta_weight", forbidden)
    monkeypatch.setattr(peft_lora_layer.ParamWrapper, "get_delta_factors", forbidden)
    model(IDS, labels=IDS).loss.backward()


def test_grouped_lora_equals_peft_dense_reparametrisation(tmp_path):
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8)
    _randomise_lora(model)
    ours = model(IDS).logits
    model.save_pretrained(tmp_path)
    # PEFT's own W + BA path (the config read by ours: stock PEFT refuses the file, see test_adapter_loading.py)
    stock_loaded = PeftModel.from_pretrained(_swapped_model(), tmp_path, config=read_adapter_config(str(tmp_path)))
    assert type(stock_loaded.base_model.model.transformer.blocks[0].ffn.experts) is peft_lora_layer.ParamWrapper
    torch.testing.assert_close(stock_loaded(IDS).logits, ours, rtol=1e-5, atol=1e-5)
    ours_loaded = load_expert_adapter(_swapped_model(), str(tmp_path))
    torch.testing.assert_close(ours_loaded(IDS).logits, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, _swapped_model()(IDS).logits, atol=1e-3)  # the adapter changes the output


def test_load_as_trainable_continues_training(tmp_path):
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8)
    model.save_pretrained(tmp_path)
    loaded = load_expert_adapter(_swapped_model(), str(tmp_path), is_trainable=True)
    loaded(IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in loaded.named_parameters() if "experts" in n and "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_merge_and_unload_equals_adapter_output_and_saves_original_layout(tmp_path):
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8)
    _randomise_lora(model)
    with_adapter = model(IDS).logits
    merged = merge_expert_adapter(model)
    torch.testing.assert_close(merged(IDS).logits, with_adapter, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path)
    stock = DbrxForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(stock(IDS).logits, with_adapter, rtol=1e-4, atol=1e-5)


def test_adapter_for_another_model_shape_names_the_tensor(tmp_path):
    model = apply_expert_lora(_swapped_model(), r=4, alpha=8)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.transformer.blocks.1.ffn.experts.base_layer.lora_A.weight"
    tensors[key] = torch.zeros(4 * 8, 64)  # an adapter trained for 8 experts
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.experts\.base_layer\.lora_A\.weight has shape \(32, 64\)"):
        load_expert_adapter(_swapped_model(), str(tmp_path))


def test_lora_dropout_on_experts_is_rejected_with_advice():
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_expert_lora(_swapped_model(), r=4, alpha=8, dropout=0.1)


def test_expert_lora_needs_the_3d_layout():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="set_experts_implementation"):
        apply_expert_lora(DbrxForCausalLM(tiny_dbrx_config()), r=4, alpha=8)


def test_saved_adapter_is_a_standard_peft_adapter(tmp_path):
    apply_expert_lora(_swapped_model(), r=4, alpha=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_parameters"]) == [
        "ffn.experts.v1",
        "ffn.experts.w1",
        "ffn.experts.w2",
    ]
