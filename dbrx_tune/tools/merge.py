"""Merge a DBRX LoRA adapter into its base model and write a full Hugging Face checkpoint.

    python -m dbrx_tune.tools.merge --base PATH --adapter PATH --output PATH [--dtype bfloat16]

The output has DBRX's original parameter names and shapes (`ffn.experts.mlp.w1/v1/w2` as (n_experts * ffn,
d_model)), so stock `DbrxForCausalLM.from_pretrained` loads it without this package. Adapters trained on 4-bit
experts (QLoRA) merge into the bf16 base here.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import DbrxForCausalLM

from dbrx_tune.modeling.config import load_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation
from dbrx_tune.modeling.lora import load_expert_adapter, merge_expert_adapter

logger = logging.getLogger(__name__)


def merge(base: str, adapter: str, output: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Load `base` (local path or hub id), apply and fold `adapter`, save the merged model to `output`."""
    config = load_dbrx_config(base)
    model = DbrxForCausalLM.from_pretrained(base, config=config, dtype=dtype)
    set_experts_implementation(model, "grouped")
    merged = merge_expert_adapter(load_expert_adapter(model, adapter))
    merged.save_pretrained(output)
    logger.info("merged %s into %s -> %s", adapter, base, output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base DBRX checkpoint: local directory or hub id")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory saved by training")
    parser.add_argument("--output", required=True, help="directory for the merged checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    merge(args.base, args.adapter, args.output, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
