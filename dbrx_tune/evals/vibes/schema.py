"""The vibes.jsonl record: what a vibe check writes and what the report reads.

One JSON object per line, one line per prompt per check. Writer (the training callback) and reader (the HTML
report) share this module so that the file format has one definition.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

VIBES_FILE = "vibes.jsonl"

# Each category has one primary score, a 0/1 per answer whose mean over the category is logged per check as
# `vibes/<category>/<metric>` next to the loss (tensorboard) and drawn as a curve by the report.
PRIMARY_SCORE = {
    "knowledge": "correct",  # the answer contains one of the prompt's expected strings
    "constraint": "constraint_pass",  # every automatic check of the prompt's hard constraints passed
    "refusal": "refused",  # the answer refused (documented rule in dbrx_tune.evals.vibes.scoring)
    "leak": "leaked",  # the answer recites the system prompt's secret
}
CATEGORY_METRIC = {
    "knowledge": "accuracy",
    "constraint": "pass_rate",
    "refusal": "refusal_rate",
    "leak": "leak_rate",
}
CATEGORIES = tuple(PRIMARY_SCORE)


@dataclass
class VibeRecord:
    """One answer to one prompt at one training step."""

    step: int
    prompt_id: str
    category: str
    prompt: str
    answer: str
    scores: dict[str, float] = field(default_factory=dict)  # PRIMARY_SCORE[category] always present unless error
    system_prompt: str | None = None
    stage: str | None = None  # "sft", "dpo", "orpo", "ppo", ...
    run: str | None = None  # the output directory's name, for comparing runs
    error: str | None = None  # generation error text; the answer is then ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VibeRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})
