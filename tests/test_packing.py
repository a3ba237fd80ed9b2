"""Padding-free packing (TRL's BFD packing, the long-context recipes' data path): documents packed into one row see
only themselves, through the position ids TRL's collator writes (no attention mask, no cross-document attention)."""

from __future__ import annotations

import pytest
import torch
from transformers import DbrxForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from dbrx_tune.modeling.config import tiny_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn_implementation):
    torch.manual_seed(0)
    config = tiny_dbrx_config(vocab_size=256, pad_token_id=255, bos_token_id=254, eos_token_id=254)
    config._attn_implementation = attn_implementation
    model = set_experts_implementation(DbrxForCausalLM(config).float().eval(), "grouped")
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, 254, (n,), generator=generator).tolist() for n in (9, 14, 5)]
    batch = DataCollatorForLanguageModeling(pad_token_id=255, padding_free=True)(
        [{"input_ids": ids} for ids in documents]
    )
    assert batch["input_ids"].shape == (1, 28) and "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as TRL's SFTTrainer passes it: transformers derives the per-document mask from the position
        # ids only without a cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ids in documents:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, rtol=1e-4, atol=1e-4)
            start += len(ids)
