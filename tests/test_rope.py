"""Loading a published DBRX config.json gives the RoPE base DBRX was trained with (500000).

transformers 5.2x reads the base from top-level `rope_parameters`, which the published config.json does not
have (it keeps `attn_config.rope_theta`), and silently falls back to 10000. These tests pin our correction,
the upstream behaviour it works around, and that the checkpoints we save need no correction.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, DbrxForCausalLM

from dbrx_tune.modeling.config import load_dbrx_config

DBRX_ROPE_THETA = 500000
D_MODEL, N_HEADS = 64, 4
HEAD_DIM = D_MODEL // N_HEADS


def _write_original_dbrx_config(directory: Path) -> Path:
    """A config.json laid out as published for databricks/dbrx-base, with tiny sizes."""
    config = {
        "architectures": ["DbrxForCausalLM"],
        "attn_config": {"clip_qkv": 8, "kv_n_heads": 2, "model_type": "", "rope_theta": DBRX_ROPE_THETA},
        "d_model": D_MODEL,
        "emb_pdrop": 0.0,
        "ffn_config": {
            "ffn_hidden_size": 128,
            "model_type": "",
            "moe_jitter_eps": 0,
            "moe_loss_weight": 0.05,
            "moe_num_experts": 4,
            "moe_top_k": 2,
        },
        "initializer_range": 0.02,
        "max_seq_len": 512,
        "model_type": "dbrx",
        "n_heads": N_HEADS,
        "n_layers": 2,
        "output_router_logits": False,
        "resid_pdrop": 0.0,
        "router_aux_loss_coef": 0.05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "use_cache": True,
        "vocab_size": 256,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _expected_inv_freq() -> torch.Tensor:
    return 1.0 / DBRX_ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)


def _rope_theta(config) -> float | None:
    return (config.rope_parameters or {}).get("rope_theta")


def _inv_freq(config) -> torch.Tensor:
    return DbrxForCausalLM(config).transformer.rotary_emb.inv_freq.double()


def test_load_dbrx_config_builds_rotary_embedding_with_attn_config_rope_theta(tmp_path: Path) -> None:
    config = load_dbrx_config(str(_write_original_dbrx_config(tmp_path)))

    torch.testing.assert_close(_inv_freq(config), _expected_inv_freq(), rtol=1e-6, atol=0.0)


def test_plain_autoconfig_still_ignores_attn_config_rope_theta(tmp_path: Path) -> None:
    config = AutoConfig.from_pretrained(_write_original_dbrx_config(tmp_path))

    assert _rope_theta(config) != DBRX_ROPE_THETA, (
        "plain AutoConfig now reads attn_config.rope_theta: the upstream RoPE-base bug looks fixed in this "
        "transformers release; dbrx_tune.modeling.config.fix_rope_parameters may no longer be needed (update this test)"
    )


def test_saved_config_reloads_with_plain_autoconfig_at_dbrx_rope_theta(tmp_path: Path) -> None:
    load_dbrx_config(str(_write_original_dbrx_config(tmp_path / "original"))).save_pretrained(tmp_path / "saved")

    reloaded = AutoConfig.from_pretrained(tmp_path / "saved")

    assert _rope_theta(reloaded) == DBRX_ROPE_THETA
    assert reloaded.attn_config.rope_theta == DBRX_ROPE_THETA
    torch.testing.assert_close(_inv_freq(reloaded), _expected_inv_freq(), rtol=1e-6, atol=0.0)


def test_load_dbrx_config_names_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_dbrx_config(str(tmp_path))
