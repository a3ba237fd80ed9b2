"""NF4 DBRX experts (QLoRA): storage, dequantization per expert group, forward/backward, LoRA on top, merge CLI."""

import bitsandbytes.functional as bnb_functional  # a hard dependency: a broken install must fail, not skip
import pytest
import torch
from transformers import DbrxForCausalLM

from dbrx_tune.modeling.config import tiny_dbrx_config  # noqa: E402
from dbrx_tune.modeling.experts import DbrxGroupedExperts, set_experts_implementation  # noqa: E402
from dbrx_tune.modeling.lora import apply_expert_lora  # noqa: E402
from dbrx_tune.modeling.quantized_experts import DbrxNF4Experts, quantize_experts_4bit  # noqa: E402
from dbrx_tune.tools.merge import main as merge_main  # noqa: E402

IDS = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


def _grouped_experts(seed: int = 0):
    config = tiny_dbrx_config()
    torch.manual_seed(seed)
    experts = DbrxGroupedExperts(config.ffn_config)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.05)
    return experts, config.ffn_config


def _routing(tokens, ffn_config):
    logits = torch.randn(tokens, ffn_config.moe_num_experts, generator=torch.Generator().manual_seed(1))
    return torch.topk(torch.softmax(logits, -1), ffn_config.moe_top_k, dim=-1)


def test_dequantize_matches_bitsandbytes_and_quantizes_to_4_bits():
    experts, ffn_config = _grouped_experts()
    quantized = DbrxNF4Experts.from_experts(experts, ffn_config)
    for name in ("w1", "v1", "w2"):
        weight = getattr(experts, name).detach()
        packed, state = bnb_functional.quantize_4bit(
            weight.reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        expected = bnb_functional.dequantize_4bit(packed, state).reshape(weight.shape)
        torch.testing.assert_close(quantized.dequantize(name, torch.float32), expected)
        assert getattr(quantized, name).numel() == weight.numel() // 2  # two 4-bit codes per byte
        assert ((quantized.dequantize(name, torch.float32) - weight).abs().max() / weight.abs().max()) < 0.2


def test_one_expert_group_dequantizes_to_the_slice_of_all_experts():
    experts, ffn_config = _grouped_experts()
    quantized = DbrxNF4Experts.from_experts(experts, ffn_config)
    torch.testing.assert_close(
        quantized.dequantize("w2", torch.float32, 1, 3), quantized.dequantize("w2", torch.float32)[1:3]
    )


@pytest.mark.parametrize("experts_per_group", [None, 1, 3])
def test_forward_and_input_gradient_match_experts_with_dequantized_weights(experts_per_group):
    experts, ffn_config = _grouped_experts()
    quantized = DbrxNF4Experts.from_experts(experts, ffn_config, experts_per_group=experts_per_group)
    reference = DbrxGroupedExperts(ffn_config)
    with torch.no_grad():
        for name in ("w1", "v1", "w2"):
            getattr(reference, name).copy_(quantized.dequantize(name, torch.float32))
    weights, index = _routing(10, ffn_config)
    x = torch.randn(1, 10, ffn_config.hidden_size)
    outs, grads = [], []
    for module in (reference, quantized):
        inputs = x.clone().requires_grad_()
        out = module(inputs, index, weights)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append(inputs.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in quantized.parameters())


def test_qlora_trains_only_adapters_on_4bit_experts():
    torch.manual_seed(0)
    model = DbrxForCausalLM(tiny_dbrx_config()).float()
    quantize_experts_4bit(model)
    assert isinstance(model.transformer.blocks[0].ffn.experts, DbrxNF4Experts)
    peft_model = apply_expert_lora(model, r=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(IDS, labels=IDS).loss
        loss.backward()
        expert_grads = [p.grad for n, p in peft_model.named_parameters() if "experts" in n and "lora_A" in n]
        assert expert_grads and all(g is not None and torch.isfinite(g).all() for g in expert_grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="dbrx_tune.tools.merge"):
        peft_model.merge_and_unload()


def test_merge_command_writes_a_stock_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = DbrxForCausalLM(tiny_dbrx_config()).float()
    base.save_pretrained(tmp_path / "base")
    peft_model = apply_expert_lora(set_experts_implementation(base, "grouped"), r=4, alpha=8)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    expected = peft_model.eval()(IDS).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_main(
        [
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output",
            str(tmp_path / "merged"),
            "--dtype",
            "float32",
        ]
    )
    merged = DbrxForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-4, atol=1e-5)
