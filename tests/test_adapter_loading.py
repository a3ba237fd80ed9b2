"""An expert-LoRA adapter never loads silently half-applied: stock PEFT (in a process that cannot import dbrx_tune)
refuses it naming dbrx_tune, the toolkit's loader gives the training-time logits, the adapter's README says how to
load, merge and serve it, and a LoRA run on a random-init model saves its base so that the adapter merges."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from stock_process import run_stock
from transformers import DbrxForCausalLM, Trainer, TrainingArguments

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation
from dbrx_tune.modeling.lora import README_HEADING, apply_expert_lora, base_model_copy, load_expert_adapter
from dbrx_tune.modeling.quantized_experts import quantize_experts_4bit
from dbrx_tune.tools.merge import main as merge_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))


def _save_like_a_stage(model, tmp_path, name: str) -> str:
    """`Trainer.save_model`, what `train_and_save` calls for every stage (and `checkpoint-N`)."""
    args = TrainingArguments(output_dir=str(tmp_path / f"{name}-run"), use_cpu=True, report_to="none")
    Trainer(model=model, args=args).save_model(str(tmp_path / name))
    return str(tmp_path / name)


def _trained_adapter(tmp_path, **lora):
    """(base dir, adapter dir, the adapter model's logits, the base's logits) for a tiny fp32 DBRX."""
    torch.manual_seed(0)
    base = DbrxForCausalLM(tiny_dbrx_config()).float().eval()
    base.save_pretrained(tmp_path / "base")
    base_logits = base(IDS).logits
    model = apply_expert_lora(set_experts_implementation(base, "grouped"), r=4, alpha=8, **lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
        expected = model.eval()(IDS).logits
    return str(tmp_path / "base"), _save_like_a_stage(model, tmp_path, "adapter"), expected, base_logits


STOCK_LOADS = """
import json, torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import DbrxForCausalLM
base, adapter = {base!r}, {adapter!r}
results = {{}}
for how, load in (
    ("PeftModel.from_pretrained", lambda: PeftModel.from_pretrained(DbrxForCausalLM.from_pretrained(base), adapter)),
    ("transformers load_adapter", lambda: DbrxForCausalLM.from_pretrained(base).load_adapter(adapter)),
    ("AutoPeftModelForCausalLM", lambda: AutoPeftModelForCausalLM.from_pretrained(adapter)),
):
    try:
        load()
        results[how] = "loaded"
    except Exception as err:
        results[how] = type(err).__name__ + ": " + str(err)
assert not any(name.startswith("dbrx_tune") for name in sys.modules)
print(json.dumps(results))
"""


def _stock_load_results(base: str, adapter: str) -> dict[str, str]:
    done = run_stock(STOCK_LOADS.format(base=base, adapter=adapter))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stock_peft_refuses_an_expert_lora_adapter_naming_dbrx_tune(tmp_path):
    base, adapter, _, _ = _trained_adapter(tmp_path)
    with pytest.raises(
        ValueError, match=r"dbrx_tune expert LoRA adapter.*load_expert_adapter.*dbrx_tune\.tools\.merge"
    ):
        PeftModel.from_pretrained(DbrxForCausalLM.from_pretrained(base), adapter)


@pytest.mark.slow  # a fresh interpreter importing transformers and PEFT
def test_every_stock_load_path_refuses_it_without_dbrx_tune_installed(tmp_path):
    base, adapter, _, _ = _trained_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base  # so that AutoPeftModel finds the base too
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    results = _stock_load_results(base, adapter)
    for how, result in results.items():
        assert result.startswith("ValueError") and "dbrx_tune" in result and "load_expert_adapter" in result, how


def test_the_toolkit_loader_gives_the_training_time_logits(tmp_path):
    base, adapter, expected, base_logits = _trained_adapter(tmp_path)
    model = set_experts_implementation(DbrxForCausalLM.from_pretrained(base).float().eval(), "grouped")
    loaded = load_expert_adapter(model, adapter)
    assert loaded.peft_config["default"].task_type == "CAUSAL_LM"  # the real task type, set aside on save
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the expert LoRA changes the output
    resaved = _save_like_a_stage(loaded, tmp_path, "resaved")  # a loaded adapter saves marked again
    assert json.loads(open(os.path.join(resaved, "adapter_config.json")).read())["task_type"].startswith("dbrx_tune")


def test_the_adapter_readme_says_how_to_load_merge_and_serve_once(tmp_path):
    _, adapter, _, _ = _trained_adapter(tmp_path)
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in readme  # PEFT's model card is kept, the note is added to it
    assert "load_expert_adapter" in readme and "python -m dbrx_tune.tools.merge" in readme
    assert "Serve: merge first" in readme
    _save_like_a_stage(load_expert_adapter(_swapped_tiny(), adapter), tmp_path, "adapter")  # saved again, same dir
    assert (tmp_path / "adapter" / "README.md").read_text().count(README_HEADING) == 1


def _swapped_tiny() -> DbrxForCausalLM:
    torch.manual_seed(0)
    return set_experts_implementation(DbrxForCausalLM(tiny_dbrx_config()).float().eval(), "grouped")


def test_an_attention_only_adapter_stays_stock_loadable_and_right(tmp_path):
    base, adapter, expected, _ = _trained_adapter(tmp_path, target_experts=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and "dbrx_tune" not in config
    stock = PeftModel.from_pretrained(DbrxForCausalLM.from_pretrained(base).float().eval(), adapter)
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_base_saved_for_a_4bit_lora_model_is_the_one_its_adapter_trained_on(tmp_path):
    torch.manual_seed(0)
    model = set_experts_implementation(DbrxForCausalLM(tiny_dbrx_config()).float().eval(), "grouped")
    peft_model = apply_expert_lora(quantize_experts_4bit(model), r=4, alpha=8, train_router=True)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
        expected = peft_model(IDS).logits
        base_model_copy(peft_model).save_pretrained(tmp_path / "base")
        torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=0, atol=0)  # the copy changed nothing
        peft_model.save_pretrained(tmp_path / "adapter")
        stock, info = DbrxForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]  # a plain DBRX checkpoint
        loaded = load_expert_adapter(set_experts_implementation(stock.eval(), "grouped"), str(tmp_path / "adapter"))
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, overrides",
    [
        (
            "dbrx_sft.yaml",
            ["--use_peft", "true", "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "2"],
        ),
        ("dbrx_sft_qlora_32k.yaml", ["--max_steps", "1"]),  # NF4 experts: the base saved is what LoRA trained on
    ],
    ids=["lora", "qlora"],
)
def test_a_random_init_lora_run_saves_its_base_and_the_adapter_merges(tmp_path, monkeypatch, recipe, overrides):
    from sft.train import main as train_sft

    monkeypatch.chdir(REPO_ROOT)
    output_dir = tmp_path / "out"
    train_sft(
        [os.path.join("recipes", "tiny", recipe), "--output_dir", str(output_dir), "--report_to", "none"]
        + ["--vibe_prompts", "null", "--eval_strategy", "no", "--save_strategy", "no", *overrides]
    )
    base = output_dir / "base"
    assert (base / "model.safetensors").exists() and (base / "config.json").exists()
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    merge_main(["--base", str(base), "--adapter", str(output_dir), "--output", str(tmp_path / "merged")])  # verifies
    assert (tmp_path / "merged" / "model.safetensors").exists()
    results = _stock_load_results(str(base), str(output_dir))  # the stage's own save, refused by stock PEFT
    assert all(result.startswith("ValueError") and "dbrx_tune" in result for result in results.values()), results


def test_merging_onto_a_config_only_base_names_the_directory(tmp_path):
    _, adapter, _, _ = _trained_adapter(tmp_path)
    config_only = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx-tiny")
    with pytest.raises(SystemExit, match="dbrx-tiny: holds no weights.*OUTPUT_DIR/base"):
        merge_main(["--base", config_only, "--adapter", adapter, "--output", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_a_random_init_ppo_run_with_lora_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import dbrx_tune.training.ppo.models as ppo_models
    from rlhf.ppo import main as train_ppo

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(ppo_models, "load_causal_lm", None)  # calling it would raise TypeError, not the refusal
    recipe = os.path.join("recipes", "tiny", "dbrx_ppo.yaml")
    with pytest.raises(ValueError, match="random_init with use_peft: PPO cannot save the random base"):
        train_ppo([recipe, "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_peft", "true"])
