"""Helpers for notebooks/dbrx_vs_llama2.ipynb: parameter accounting, loss histories and recipe diffs.

Kept out of the notebook so its cells stay short; nothing here is part of the toolkit's API.
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter

import torch
import yaml
from torch import nn
from transformers import DbrxConfig, LlamaConfig, PreTrainedModel

from dbrx_tune.plan import KNOWN_CONFIGS

LLAMA2_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False)


def dbrx_base_config() -> DbrxConfig:
    """databricks/dbrx-base's shape (the planner's offline copy of its config.json values)."""
    k = KNOWN_CONFIGS["databricks/dbrx-base"]
    return DbrxConfig(
        d_model=k["d_model"], n_layers=k["n_layers"], n_heads=k["n_heads"], vocab_size=k["vocab"],
        attn_config={"kv_n_heads": k["kv_heads"], "clip_qkv": 8, "rope_theta": 500000},
        ffn_config={"ffn_hidden_size": k["ffn"], "moe_num_experts": k["experts"], "moe_top_k": k["top_k"]},
        tie_word_embeddings=False,
    )


def llama2_70b_config() -> LlamaConfig:
    """meta-llama/Llama-2-70b-hf's shape."""
    return LlamaConfig(**LLAMA2_70B)


def build_on_meta(model_class: type, config) -> PreTrainedModel:
    """The real-size model with no storage: shapes and module types only, built in seconds."""
    with torch.device("meta"):
        return model_class(config)


def parameter_groups(model: nn.Module) -> Counter:
    """Parameter counts by what stock bitsandbytes 4-bit loading does with them.

    bnb converts `nn.Linear` modules except the LM head (kept in high precision by transformers' default);
    everything else (embeddings, norms, and DBRX's fused expert parameters) stays bf16.
    """
    head = model.get_output_embeddings()
    groups: Counter = Counter()
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not own:
            continue
        if module is head:
            groups["lm_head (Linear, skipped)"] += own
        elif isinstance(module, nn.Linear):
            groups["nn.Linear (4-bit)"] += own
        elif "experts" in name:
            groups["fused experts (stay bf16)"] += own
        else:
            groups["embeddings / norms (stay bf16)"] += own
    return groups


def active_parameters(config: DbrxConfig, total: int, expert_params: int) -> int:
    """Parameters one token passes through: everything but the experts, plus top_k of n_experts of them."""
    ffn = config.ffn_config
    return total - expert_params + expert_params * ffn.moe_top_k // ffn.moe_num_experts


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_history(output_dir: str) -> dict[int, float]:
    """step -> training loss, from the run's trainer_state.json."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def recipe_lines(path: str) -> list[str]:
    """The recipe's `key: value` lines, comments and blank lines removed."""
    with open(path, encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].rstrip() for line in handle]
    return [line for line in lines if line]


def recipe_diff(path_a: str, path_b: str) -> tuple[int, int, list[str]]:
    """(setting lines of a, lines changed between a and b, the unified diff of the setting lines)."""
    a, b = recipe_lines(path_a), recipe_lines(path_b)
    diff = list(difflib.unified_diff(a, b, path_a, path_b, n=0, lineterm=""))
    changed = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
    return len(a), changed, diff


def recipe_keys_differing(path_a: str, path_b: str) -> dict[str, tuple]:
    """key -> (value in a, value in b) for every key whose value differs (absent = None)."""
    with open(path_a, encoding="utf-8") as handle:
        a = yaml.safe_load(handle)
    with open(path_b, encoding="utf-8") as handle:
        b = yaml.safe_load(handle)
    return {key: (a.get(key), b.get(key)) for key in dict.fromkeys([*a, *b]) if a.get(key) != b.get(key)}
