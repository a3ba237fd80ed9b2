"""Running a scorer over RewardBench examples and turning the scores into per-example results and accuracies.

A scorer is anything with `score(prompts, responses, desc) -> list[float]` (`dbrx_tune.rewards.RewardModelScorer`,
`dbrx_tune.evals.rewardbench.scoring.DpoRewardScorer`). The per-example table has the columns of RewardBench's own
scores files, so `dbrx_tune.evals.rewardbench.export` writes it as is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from dbrx_tune.evals.rewardbench.benchmark_data import BestOfNExample, Messages, PairExample
from dbrx_tune.evals.rewardbench.sections import (
    V2_TIES_SUBSET,
    best_of_n_result,
    pairwise_result,
    subset_accuracies,
    ties_score,
)
from dbrx_tune.rewards.scorer import format_conversation

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    def score(self, prompts: Sequence[Messages], responses: Sequence[str], desc: str = ...) -> list[float]: ...


@dataclass
class EvalResult:
    """Accuracy per subset (in order of first appearance) and the per-example table (column -> values)."""

    accuracies: dict[str, float]
    table: dict[str, list[Any]]


def evaluate_pairs(
    scorer: Scorer, tokenizer: PreTrainedTokenizerBase, examples: Sequence[PairExample], desc: str = "RewardBench"
) -> EvalResult:
    """Score chosen and rejected of every pair; a pair is won only when chosen scores strictly higher."""
    prompts = [e.prompt for e in examples]
    chosen = scorer.score(prompts, [e.chosen for e in examples], desc=f"{desc} chosen")
    rejected = scorer.score(prompts, [e.rejected for e in examples], desc=f"{desc} rejected")
    results = [pairwise_result(c, r) for c, r in zip(chosen, rejected, strict=True)]
    subsets = [e.subset for e in examples]
    table = {
        "text_chosen": [format_conversation(tokenizer, e.prompt, e.chosen) for e in examples],
        "text_rejected": [format_conversation(tokenizer, e.prompt, e.rejected) for e in examples],
        "results": results,
        "subset": subsets,
        "id": [e.id for e in examples],
        "scores_chosen": chosen,
        "scores_rejected": rejected,
    }
    return EvalResult(accuracies=subset_accuracies(subsets, results), table=table)


def evaluate_best_of_n(
    scorer: Scorer, tokenizer: PreTrainedTokenizerBase, examples: Sequence[BestOfNExample], desc: str = "RewardBench 2"
) -> EvalResult:
    """Score every completion; best-of-n credit per prompt, and the Ties subset's own score."""
    flat_prompts = [e.prompt for e in examples for _ in e.completions]
    flat_responses = [c for e in examples for c in e.completions]
    flat_scores = scorer.score(flat_prompts, flat_responses, desc=desc)
    scores: list[list[float]] = []
    start = 0
    for e in examples:
        scores.append(flat_scores[start : start + len(e.completions)])
        start += len(e.completions)

    is_ties = [e.subset == V2_TIES_SUBSET for e in examples]
    # Ties rows get no per-row result: the subset is scored as a whole (RewardBench stores null there too).
    results = [None if tie else best_of_n_result(s) for tie, s in zip(is_ties, scores, strict=True)]
    accuracies = subset_accuracies(
        [e.subset for e, tie in zip(examples, is_ties, strict=True) if not tie],
        [r for r in results if r is not None],
    )
    if any(is_ties):
        ties = [(e, s) for e, s, tie in zip(examples, scores, is_ties, strict=True) if tie]
        accuracies[V2_TIES_SUBSET] = ties_score(
            [e.id for e, _ in ties], [s for _, s in ties], [e.num_correct for e, _ in ties]
        )
    table = {
        "text": [[format_conversation(tokenizer, e.prompt, c) for c in e.completions] for e in examples],
        "scores": scores,
        "results": results,
        "subset": [e.subset for e in examples],
        "id": [e.id for e in examples],
        "num_correct": [e.num_correct for e in examples],
    }
    return EvalResult(accuracies=accuracies, table=table)
