"""Rule rewards: scores computed from the completion text (and the row's other columns), for tests and demos.

`RuleReward` is the PPO form (a `RewardFunction` of a rollout batch); `RuleRewardFunc` the same rule in TRL's
reward-function interface (GRPO, RLOO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from dbrx_tune.rewards.loader import RewardModelError
from dbrx_tune.rewards.scorer import ScoringBatch


def contains_answer(completions: list[str], rows: list[dict[str, Any]], argument: str | None) -> list[float]:
    """`rule:contains_answer`: 1 when the row's gold `answer` occurs in the completion (case-insensitive), else 0."""
    scores = []
    for index, (completion, row) in enumerate(zip(completions, rows)):
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer:
            raise RewardModelError(
                f"rule:contains_answer needs a non-empty string 'answer' column; row {index} has {answer!r}"
            )
        scores.append(float(answer.lower() in completion.lower()))
    return scores


def contains_word(completions: list[str], rows: list[dict[str, Any]], argument: str | None) -> list[float]:
    """`rule:contains:WORD`: 1 when WORD occurs in the completion (case-insensitive), else 0."""
    if not argument:
        raise RewardModelError("reward_function: rule:contains needs a word, e.g. rule:contains:blue")
    return [float(argument.lower() in completion.lower()) for completion in completions]


RULES: dict[str, Callable[[list[str], list[dict[str, Any]], str | None], list[float]]] = {
    "contains_answer": contains_answer,
    "contains": contains_word,
}


@dataclasses.dataclass
class RuleReward:
    """A reward computed from the completion text (and the row's other columns) by a named rule."""

    name: str
    argument: str | None = None

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise RewardModelError(
                f"reward_function: unknown rule {self.name!r}; known: {', '.join(f'rule:{r}' for r in RULES)}"
            )

    def __call__(self, batch: ScoringBatch) -> torch.Tensor:
        return torch.tensor(RULES[self.name](batch.completions, batch.rows, self.argument), dtype=torch.float32)


def parse_reward_function(spec: str) -> RuleReward:
    """`rule:NAME` or `rule:NAME:ARGUMENT` -> that rule reward."""
    kind, _, rest = spec.partition(":")
    name, _, argument = rest.partition(":")
    if kind != "rule" or not name:
        raise RewardModelError(f"reward_function: expected 'rule:NAME' (e.g. rule:contains_answer), got {spec!r}")
    return RuleReward(name, argument or None)


class RuleRewardFunc:
    """A rule reward (`RULES`) in TRL's reward-function interface.

    TRL calls it with the prompts, the completions (text, or a one-message list for conversational data) and every
    other dataset column as a keyword list (e.g. `answer`); it returns one float per completion.
    """

    def __init__(self, spec: str):
        rule = parse_reward_function(spec)
        self.rule, self.argument = RULES[rule.name], rule.argument
        self.__name__ = spec  # TRL logs each reward as rewards/<__name__>/mean

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        texts = [completion if isinstance(completion, str) else completion[-1]["content"] for completion in completions]
        row_keys = [key for key, values in columns.items() if isinstance(values, list) and len(values) == len(texts)]
        rows = [{key: columns[key][index] for key in row_keys} for index in range(len(texts))]
        return self.rule(texts, rows, self.argument)
