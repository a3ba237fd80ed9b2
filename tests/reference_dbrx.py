"""A plain-torch DBRX forward, written from the architecture, to pin our model's numerics.

Like nanoGPT's model, this is one short function a reader can check line by line against DBRX
(databricks/dbrx-base): token embedding; per block a bias-free LayerNorm, fused Wqkv clamped to
[-clip_qkv, clip_qkv], rotary embedding (rotate-half, base `attn_config.rope_theta`), causal grouped-query
attention, out_proj and residual; then a bias-free LayerNorm, a softmax router with top-k experts whose
weights are renormalised to sum to one, SwiGLU experts, residual; a final bias-free LayerNorm and lm_head.

It deliberately shares no code with transformers' DBRX: it reads the weights by their original checkpoint
names, loops over tokens and experts instead of batching, and computes in float64 so that a float32 model
can be compared against it with a tight tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DbrxConfig

LAYER_NORM_EPS = 1e-5


def _check_supported(config: DbrxConfig) -> None:
    """Refuse configs this reference does not model rather than silently compare against the wrong math."""
    act = (config.ffn_config.ffn_act_fn or {}).get("name", "silu")
    if act != "silu":
        raise ValueError(f"reference_dbrx_logits models SwiGLU experts only; config has ffn_act_fn={act!r}")
    if config.ffn_config.moe_normalize_expert_weights != 1:
        raise ValueError(
            "reference_dbrx_logits models L1-normalised expert weights only; config has "
            f"moe_normalize_expert_weights={config.ffn_config.moe_normalize_expert_weights}"
        )


def _layer_norm(x: Tensor, weight: Tensor) -> Tensor:
    """Bias-free LayerNorm over the last dimension (DBRX has no LayerNorm biases)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LAYER_NORM_EPS) * weight


def reference_dbrx_logits(state_dict: dict[str, Tensor], config: DbrxConfig, input_ids: torch.LongTensor) -> Tensor:
    """Logits (batch, seq, vocab) in float64 for `input_ids` (batch, seq), no padding, positions 0..seq-1.

    `state_dict` uses the original DBRX checkpoint names; experts' `w1`, `v1`, `w2` are each
    (n_experts * ffn, d_model), and expert e's down projection is `h @ w2_e` with w2_e of shape (ffn, d_model).
    """
    _check_supported(config)
    w = {name: tensor.detach().to(torch.float64) for name, tensor in state_dict.items()}
    d_model, n_heads, kv_heads = config.d_model, config.n_heads, config.attn_config.kv_n_heads
    head_dim = d_model // n_heads
    clip = config.attn_config.clip_qkv
    n_experts, top_k = config.ffn_config.moe_num_experts, config.ffn_config.moe_top_k
    ffn = config.ffn_config.ffn_hidden_size
    batch, seq = input_ids.shape

    # Rotary embedding, rotate-half convention: channel i and i + head_dim/2 rotate together at 1/theta^(2i/hd).
    inv_freq = 1.0 / config.attn_config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (seq, head_dim/2)
    cos, sin = angles.repeat(1, 2).cos(), angles.repeat(1, 2).sin()

    def rotate(x: Tensor) -> Tensor:  # (batch, heads, seq, head_dim)
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    h = w["transformer.wte.weight"][input_ids]  # (batch, seq, d_model)
    for i in range(config.n_layers):
        p = f"transformer.blocks.{i}."

        # Attention.
        x = _layer_norm(h, w[p + "norm_attn_norm.norm_1.weight"])
        qkv = x @ w[p + "norm_attn_norm.attn.Wqkv.weight"].T
        if clip is not None:
            qkv = qkv.clamp(-clip, clip)
        q, k, v = qkv.split([n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.view(batch, seq, n_heads, head_dim).transpose(1, 2)  # (batch, n_heads, seq, head_dim)
        k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
        v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        # Grouped-query attention: query head j reads key/value head j // (n_heads / kv_heads).
        k = k.repeat_interleave(n_heads // kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, seq, d_model)
        h = h + attn @ w[p + "norm_attn_norm.attn.out_proj.weight"].T

        # Mixture of experts, token by token.
        x = _layer_norm(h, w[p + "norm_attn_norm.norm_2.weight"]).reshape(batch * seq, d_model)
        probs = (x @ w[p + "ffn.router.layer.weight"].T).softmax(dim=-1)  # (tokens, n_experts)
        top_p, top_e = probs.topk(top_k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)  # L1 norm; the probabilities are positive
        w1 = w[p + "ffn.experts.mlp.w1"].view(n_experts, ffn, d_model)
        v1 = w[p + "ffn.experts.mlp.v1"].view(n_experts, ffn, d_model)
        w2 = w[p + "ffn.experts.mlp.w2"].view(n_experts, ffn, d_model)
        moe = torch.zeros_like(x)
        for t in range(batch * seq):
            for weight, e in zip(top_p[t], top_e[t]):
                moe[t] += weight * (F.silu(x[t] @ w1[e].T) * (x[t] @ v1[e].T)) @ w2[e]
        h = h + moe.view(batch, seq, d_model)

    return _layer_norm(h, w["transformer.norm_f.weight"]) @ w["lm_head.weight"].T
