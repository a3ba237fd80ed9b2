"""PPO's clipped value loss where the clipped branch wins: the case the earlier data never reached.

With V far from the rollout's V_old and the return beyond V, the clipped value (V_old + clip(V - V_old)) is further
from the return than V is, so `max` picks the clipped term; its gradient is zero (the clamp is saturated). A value
loss that dropped the clipped branch, or clipped the wrong side, fails these expected numbers, computed by hand here.
"""

import torch

from dbrx_tune.training.ppo.core import clipped_value_loss


def test_the_clipped_branch_wins_and_stops_the_gradient():
    old_values = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: V=1.0, V_clipped=0.2 -> (1-2)^2=1 vs (0.2-2)^2=3.24: the clipped term wins
    # token 1: V=0.1 is inside the clip range -> both terms 0.01
    assert torch.isclose(loss, torch.tensor(0.5 * (3.24 + 0.01) / 2))
    assert torch.isclose(clipfrac, torch.tensor(0.5))
    loss.backward()
    assert values.grad[0, 0] == 0  # saturated clamp: the clipped branch passes no gradient to V
    assert torch.isclose(values.grad[0, 1], torch.tensor(0.5 * 2 * 0.1 / 2))


def test_masked_tokens_do_not_count():
    old_values = torch.zeros(1, 3)
    values = torch.tensor([[1.0, 0.1, 5.0]])
    returns = torch.tensor([[2.0, 0.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert torch.isclose(loss, torch.tensor(0.5 * (3.24 + 0.01) / 2))
