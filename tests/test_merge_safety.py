"""`python -m dbrx_tune.tools.merge`: never overwrites or deletes existing files, keeps the base's dtype, writes the
tokenizer, verifies before it reports success, and reads safetensors only; the merged model loads in plain
transformers (a process that cannot import dbrx_tune)."""

import os

import pytest
import torch
from huggingface_hub import ModelCard
from stock_process import run_stock
from transformers import DbrxForCausalLM

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation
from dbrx_tune.modeling.lora import apply_expert_lora
from dbrx_tune.tools import merge as merge_module
from dbrx_tune.tools.merge import MergeError
from dbrx_tune.tools.merge import main as merge_main

IDS = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def trained(request, tmp_path_factory):
    """(root, base dir, adapter dir, adapter-model logits) for a tiny DBRX base saved in `dtype`."""
    root = tmp_path_factory.mktemp(f"merge-{str(request.param).split('.')[-1]}")
    torch.manual_seed(0)
    base = DbrxForCausalLM(tiny_dbrx_config()).to(request.param)
    base.save_pretrained(root / "base")
    peft_model = apply_expert_lora(set_experts_implementation(base, "grouped"), r=4, alpha=8)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
        expected = peft_model.eval()(IDS).logits.float()
    peft_model.save_pretrained(root / "adapter")
    return root, root / "base", root / "adapter", expected, request.param


def _merge(base, adapter, output, *extra):
    merge_main(["--base", str(base), "--adapter", str(adapter), "--output", str(output), *extra])


def test_merge_keeps_the_base_dtype_writes_the_tokenizer_and_loads_in_stock_transformers(trained):
    root, base, adapter, expected, dtype = trained
    output = root / "merged"
    _merge(base, adapter, output)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        os.listdir(output)
    )
    assert not [name for name in os.listdir(root) if ".merging-" in name]  # the staging directory is gone
    card = ModelCard.load(output / "README.md")  # a bare PEFT adapter (no run of ours): no recipe to carry over
    assert card.data.library_name == "transformers" and {"dbrx-tune", "dbrx", "merged"} <= set(card.data.tags)
    assert card.data.base_model is None and "AutoModelForCausalLM.from_pretrained" in card.text  # a local base
    script = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(output)!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(output)!r})
assert tokenizer.chat_template, "no chat template"
ids = torch.tensor({IDS.tolist()})
torch.save(model(input_ids=ids).logits.float(), {str(root / "stock_logits.pt")!r})
assert not any(name.startswith("dbrx_tune") for name in sys.modules)
print(model.dtype)
"""
    done = run_stock(script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(dtype)  # the base's dtype, kept
    stock = torch.load(root / "stock_logits.pt")
    if dtype == torch.float32:
        torch.testing.assert_close(stock, expected, rtol=1e-5, atol=1e-5)
    else:  # merged weights are rounded once to bf16: within bf16 rounding of the adapter model
        assert ((stock - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("where", ["base", "inside_base", "adapter", "file", "other_model"])
def test_merge_refuses_outputs_that_would_overwrite_and_leaves_them_intact(trained, where):
    root, base, adapter, _, _ = trained
    target = {
        "base": base,
        "inside_base": base / "merged",
        "adapter": adapter,
        "file": root / "notes.txt",
        "other_model": root / "other-model",
    }[where]
    if where == "file":
        target.write_text("keep")
    if where == "other_model":
        target.mkdir(exist_ok=True)
        (target / "model.safetensors").write_bytes(b"another model")
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit, match="--output"):
        _merge(base, adapter, target)
    after = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert after == before  # nothing written, replaced or deleted


def test_merge_refuses_pickle_only_and_truncated_weights_naming_the_file(trained, tmp_path):
    _, base, adapter, _, _ = trained
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SystemExit, match="pytorch_model.bin.*safetensors only"):
        _merge(pickled, adapter, tmp_path / "out1")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((base / "config.json").read_text())
    data = (base / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="truncated/model.safetensors: truncated"):
        _merge(truncated, adapter, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_a_merge_that_does_not_verify_writes_nothing(trained, monkeypatch, tmp_path):
    _, base, adapter, _, _ = trained
    real_merge = merge_module.merge_expert_adapter

    def broken_merge(peft_model):  # a merge bug: the expert LoRA is dropped
        merged = real_merge(peft_model)
        with torch.no_grad():
            for module in merged.modules():
                if hasattr(module, "w1") and isinstance(module.w1, torch.nn.Parameter):
                    module.w1.mul_(0.5)
        return merged

    monkeypatch.setattr(merge_module, "merge_expert_adapter", broken_merge)
    with pytest.raises(MergeError, match="merged logits differ"):
        merge_module.merge(str(base), str(adapter), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists() and not [p for p in os.listdir(tmp_path) if ".merging-" in p]
