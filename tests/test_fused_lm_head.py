"""The 100k-vocabulary loss without full logits: TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, chunked
log-probabilities, Triton on CUDA) on DBRX equals the model's own loss and gradients, router aux loss included.

TRL 1.16's SFT, DPO, GRPO, RLOO and KTO trainers patch every model they train with it and call
`model(..., fused_lm_head=True)`, so the toolkit's stages inherit it; what DBRX needs for it is `sync_moe_config`
(the fused forward reads `num_experts`, `num_experts_per_tok` and `router_aux_loss_coef` from the config). These tests
pin both facts, so a TRL upgrade that drops the fused head or changes its numbers fails here.
"""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import DbrxForCausalLM
from trl import SFTConfig
from trl.trainer.utils import add_fused_lm_head

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation
from dbrx_tune.modeling.moe_loss import sync_moe_config
from dbrx_tune.tokenizer import build_dbrx_tokenizer, ensure_chat_template, ensure_pad_token
from dbrx_tune.training.trainers import DbrxSFTTrainer


def _tiny_dbrx(seed: int = 0) -> DbrxForCausalLM:
    torch.manual_seed(seed)
    config = sync_moe_config(tiny_dbrx_config(vocab_size=1024, pad_token_id=1000, bos_token_id=1001, eos_token_id=1001))
    model = DbrxForCausalLM(config).float()
    set_experts_implementation(model, "grouped")
    return model.train()


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1000, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[1, -3:] = -100  # padding
    return input_ids, labels


@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_fused_head_loss_and_gradients_equal_the_models_own_with_the_router_loss(num_items_in_batch):
    reference = _tiny_dbrx()
    fused = copy.deepcopy(reference)
    add_fused_lm_head(fused)
    input_ids, labels = _batch()
    kwargs = {"output_router_logits": True}
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    expected = reference(input_ids=input_ids, labels=labels, **kwargs)
    got = fused(input_ids=input_ids, labels=labels, fused_lm_head=True, **kwargs)
    assert reference.config.router_aux_loss_coef > 0 and got.aux_loss is not None
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    fused_params = dict(fused.named_parameters())
    for name, param in reference.named_parameters():
        assert fused_params[name].grad is not None, name
        torch.testing.assert_close(fused_params[name].grad, param.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not hasattr(got, "logits") or got.get("logits") is None  # no (batch, seq, 100k) logits were returned


def test_fused_head_log_probs_equal_a_full_log_softmax():
    """What DPO, GRPO and RLOO read: per-token log-probabilities of the labels, zero where the label is ignored."""
    model = _tiny_dbrx().eval()
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused, outputs=("log_probs", "entropy"))
    input_ids, labels = _batch(seed=2)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        out = fused(input_ids=input_ids, labels=labels, fused_lm_head=True)
    targets = labels[:, 1:]
    mask = targets != -100
    full = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.log_probs, full * mask, rtol=1e-5, atol=1e-6)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(out.entropy, entropy * mask, rtol=1e-5, atol=1e-5)


def test_the_sft_stage_trainer_trains_dbrx_through_the_fused_head(tmp_path):
    tokenizer = build_dbrx_tokenizer()
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer)
    torch.manual_seed(0)
    model = DbrxForCausalLM(sync_moe_config(tiny_dbrx_config())).float()  # the real 100k vocabulary
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], max_length=32, bf16=False
    )
    trainer = DbrxSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer.model.forward.__func__.__code__.co_name == "_fused_forward"  # TRL's, bound to this instance
    trainer.train()
    assert trainer.state.log_history and "train_loss" in trainer.state.log_history[-1]
