"""The DBRX router load-balancing loss is part of the TRL training loss, weighted by ffn_config.moe_loss_weight."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import DbrxForCausalLM
from trl import SFTConfig, SFTTrainer

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.moe_loss import sync_moe_config


def _token_dataset(n_rows: int = 8, length: int = 24, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 1000, (n_rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": rows.tolist()})


def _trainer(model, tokenizer, tmp_path, name: str) -> SFTTrainer:
    args = SFTConfig(
        output_dir=str(tmp_path / name),
        use_cpu=True,
        bf16=False,  # fp32 weights under bf16 autocast break the stock experts' index_add_
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    return SFTTrainer(model=model, args=args, train_dataset=_token_dataset(), processing_class=tokenizer)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return DbrxForCausalLM(tiny_dbrx_config())


def test_sync_moe_config_exposes_dbrx_weight_under_trl_names():
    config = sync_moe_config(tiny_dbrx_config(), moe_loss_weight=0.07)
    assert config.router_aux_loss_coef == pytest.approx(0.07)
    assert config.ffn_config.moe_loss_weight == pytest.approx(0.07)
    assert (config.num_experts, config.num_experts_per_tok) == (4, 2)


@pytest.mark.slow
def test_logged_training_loss_includes_weighted_router_loss(base_model, dbrx_tokenizer, tmp_path):
    weight = 0.5  # large, so the difference is far above the 4-decimal rounding of logged losses
    logs = {}
    for name, moe_loss_weight in (("with_aux", weight), ("without_aux", 0.0)):
        model = copy.deepcopy(base_model)
        sync_moe_config(model.config, moe_loss_weight)
        trainer = _trainer(model, dbrx_tokenizer, tmp_path, name)
        trainer.train()
        logs[name] = next(entry for entry in trainer.state.log_history if "loss" in entry)
    aux = logs["with_aux"]["aux_loss"]
    assert aux > 0
    assert "aux_loss" not in logs["without_aux"]
    assert logs["with_aux"]["loss"] - logs["without_aux"]["loss"] == pytest.approx(weight * aux, abs=2e-3)


def test_router_loss_changes_router_gradients(base_model, dbrx_tokenizer, tmp_path):
    grads = {}
    for name, moe_loss_weight in (("with_aux", 0.5), ("without_aux", 0.0)):
        model = copy.deepcopy(base_model)
        sync_moe_config(model.config, moe_loss_weight)
        trainer = _trainer(model, dbrx_tokenizer, tmp_path, name)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        model.train()
        trainer.compute_loss(model, batch).backward()
        grads[name] = model.transformer.blocks[0].ffn.router.layer.weight.grad.clone()
    difference = (grads["with_aux"] - grads["without_aux"]).norm() / grads["without_aux"].norm()
    assert difference > 1e-3
