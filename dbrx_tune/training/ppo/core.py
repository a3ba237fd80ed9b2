"""The arithmetic of PPO for language models, as plain tensor functions.

Shapes: `B` completions of `T` response tokens. A `mask` (B, T) is 1 on the tokens a completion really has (up
to and including its stop token) and 0 after; every reduction below is over those tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of `values` where `mask` is 1."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"cannot whiten fewer than 2 valid tokens (got {int(count)}); use a larger rollout batch")
    return masked_mean((values - mean) ** 2, mask) * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the valid tokens; with `shift_mean` also centre on zero, else keep the mean.

    Positions outside `mask` are returned as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def stop_mask(responses: torch.LongTensor, stop_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, stopped): `mask` (B, T) keeps every token up to and including the first stop token;
    `stopped` (B,) says whether a stop token occurred at all."""
    if not stop_token_ids:
        return torch.ones_like(responses, dtype=torch.bool), torch.zeros(
            responses.shape[0], dtype=torch.bool, device=responses.device
        )
    is_stop = torch.isin(responses, torch.tensor(list(stop_token_ids), device=responses.device))
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # stop tokens strictly before each position
    return stops_before == 0, is_stop.any(dim=1)


def apply_missing_eos_penalty(scores: torch.Tensor, stopped: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Scores minus `penalty` for every completion that ran out of tokens instead of stopping (None: unchanged)."""
    if penalty is None:
        return scores
    return scores - penalty * (~stopped).to(scores.dtype)


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    k1 = log p - log ref (unbiased, can be negative per token); k3 = (r - 1) - log r with r = ref / p
    (non-negative, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every valid token, plus the sequence score on its last valid token."""
    rewards = -kl_coef * kl * mask
    last = mask.long().sum(1).clamp(min=1) - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens: (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V and A past the last
    valid token are 0 (the episode ends there). Returns are A + V.
    """
    mask = mask.to(values.dtype)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        next_valid = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_valid if t + 1 < steps else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage * next_valid) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over valid tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLoss(loss, clipfrac, approxkl, mean_ratio)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac): 0.5 * mean over valid tokens of max((V - R)^2, (V_clipped - R)^2), where V_clipped stays
    within `cliprange_value` of the rollout's values."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac
