"""DBRX configuration: loading the published config.json correctly, and the tiny twin used on CPU.

transformers 5.2x builds DBRX's rotary embedding from the top-level `rope_parameters`, but the published
DBRX config.json keeps the base only in `attn_config.rope_theta` (500000). Loading it as is silently gives
theta 10000, i.e. a model whose positions are wrong for every pretrained weight. `fix_rope_parameters`
copies the attention config's theta into `rope_parameters` before any model is built.
"""

from __future__ import annotations

import logging
import os

from transformers import AutoConfig, DbrxConfig, PretrainedConfig

logger = logging.getLogger(__name__)

DBRX_ROPE_THETA = 500_000.0


def fix_rope_parameters(config: DbrxConfig) -> DbrxConfig:
    """Make `config.rope_parameters` agree with `attn_config.rope_theta` (in place, returned for chaining)."""
    attn_theta = getattr(config.attn_config, "rope_theta", None)
    if attn_theta is None:
        return config
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_theta") != float(attn_theta):
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"config has rope_type={rope['rope_type']!r} with rope_theta={rope.get('rope_theta')} but "
                f"attn_config.rope_theta={attn_theta}; refusing to guess which base is meant"
            )
        logger.info(
            "DBRX config: rope_theta %s -> %s (from attn_config.rope_theta)", rope.get("rope_theta"), attn_theta
        )
        config.rope_parameters = {"rope_type": "default", "rope_theta": float(attn_theta)}
    return config


class NotDbrxConfigError(ValueError):
    """The config loaded but is not a DBRX config. Callers that also accept dense models catch this one error (rather
    than any ValueError) and reuse `config` instead of loading it again."""

    def __init__(self, message: str, config: PretrainedConfig):
        super().__init__(message)
        self.config = config


def load_dbrx_config(
    model_name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False, **overrides
) -> DbrxConfig:
    """Load a DBRX config from a hub id or a local directory and correct its RoPE base.

    A clear error names the path when it is neither a directory with a config.json nor a hub id.
    """
    if os.path.isdir(model_name_or_path) and not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        raise FileNotFoundError(f"{model_name_or_path}: directory has no config.json; is this a model directory?")
    try:
        config = AutoConfig.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code, **overrides
        )
    except OSError as err:
        raise FileNotFoundError(
            f"model_name_or_path={model_name_or_path!r}: not a local model directory and could not be loaded "
            f"as a hub id ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    if not isinstance(config, DbrxConfig):
        raise NotDbrxConfigError(f"{model_name_or_path}: model_type is {config.model_type!r}, expected 'dbrx'", config)
    return fix_rope_parameters(config)


def tiny_dbrx_config(**overrides) -> DbrxConfig:
    """A DBRX-shaped config small enough to train on a CPU in seconds.

    Same architecture as databricks/dbrx-base (GQA, clip_qkv, RoPE 500000, 16 experts top-4 scaled down to
    4 experts top-2, SwiGLU experts, bias-free LayerNorm) and the real DBRX vocabulary, so the real
    tokenizer works with it.
    """
    values = dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=512,
        vocab_size=100352,
        attn_config={"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": DBRX_ROPE_THETA},
        ffn_config={
            "ffn_hidden_size": 128,
            "moe_num_experts": 4,
            "moe_top_k": 2,
            "moe_jitter_eps": 0.0,
            "moe_loss_weight": 0.05,
            "moe_normalize_expert_weights": 1.0,
        },
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=100277,
        bos_token_id=100257,
        eos_token_id=100257,
    )
    values.update(overrides)
    return fix_rope_parameters(DbrxConfig(**values))


def dbrx_base_config(n_layers: int = 40, **overrides) -> DbrxConfig:
    """databricks/dbrx-base's published shape (132B parameters, 36B active), for random-init benchmarks.

    d_model 6144, 48 heads / 8 KV heads, 16 experts of ffn 10752 with top-4 routing, RoPE 500000, clip_qkv 8,
    vocab 100352; `n_layers` (40 in the real model) is the knob benchmarks turn to fit a machine.
    """
    values = dict(
        d_model=6144,
        n_heads=48,
        n_layers=n_layers,
        max_seq_len=32768,
        attn_config={"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": DBRX_ROPE_THETA},
        ffn_config={
            "ffn_hidden_size": 10752,
            "moe_num_experts": 16,
            "moe_top_k": 4,
            "moe_jitter_eps": 0.0,
            "moe_loss_weight": 0.05,
            "moe_normalize_expert_weights": 1.0,
        },
    )
    values.update(overrides)
    return tiny_dbrx_config(**values)
