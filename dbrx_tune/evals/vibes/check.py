"""One vibe check: every prompt answered, scored, appended to `OUTPUT_DIR/vibes.jsonl`, summarised per category.

`VibeChecker` is what the trainer hooks (`dbrx_tune.evals.vibes.callback`) call; it knows nothing of trainers. The main
process writes; under ZeRO-3 the other ranks generate with it (their weights are needed) and write nothing.
`vibes.jsonl` is only ever appended to: a resumed run continues the file, and a reader that meets a (step, prompt)
twice (a run resumed from before its last check) keeps the later record.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from dbrx_tune.args import VibeArguments
from dbrx_tune.evals.vibes.generation import generate_answers, training_state_kept
from dbrx_tune.evals.vibes.prompts import VibePrompt
from dbrx_tune.evals.vibes.schema import CATEGORIES, CATEGORY_METRIC, PRIMARY_SCORE, VIBES_FILE, VibeRecord
from dbrx_tune.evals.vibes.scoring import score_answer

logger = logging.getLogger(__name__)


@dataclass
class VibeCheckResult:
    """What the main process got from one check: the records written and the scalars to log."""

    step: int
    records: list[VibeRecord]
    scalars: dict[str, float]  # `vibes/<category>/<metric>` -> mean primary score over the answered prompts

    def answer_texts(self) -> dict[str, str]:
        """`vibes/answers/<prompt id>` -> markdown of prompt, answer and scores, for tensorboard's text tab."""
        return {f"vibes/answers/{record.prompt_id}": answer_markdown(record) for record in self.records}


def answer_markdown(record: VibeRecord) -> str:
    scores = ", ".join(f"{name} {value:g}" for name, value in record.scores.items())
    answer = f"**error:** {record.error}" if record.error else record.answer or "*(empty answer)*"
    system = f"**system:** {record.system_prompt}\n\n" if record.system_prompt else ""
    return f"{system}**prompt ({record.category}):** {record.prompt}\n\n**answer:** {answer}\n\n**scores:** {scores}"


def category_scalars(records: list[VibeRecord]) -> dict[str, float]:
    """Per category, the mean primary score of the answers that were generated (errors are left out)."""
    scalars = {}
    for category in CATEGORIES:
        values = [r.scores[PRIMARY_SCORE[category]] for r in records if r.category == category and r.error is None]
        if values:
            scalars[f"vibes/{category}/{CATEGORY_METRIC[category]}"] = sum(values) / len(values)
    return scalars


class VibeChecker:
    """Answers and scores a fixed prompt set for one run (`stage` and `output_dir` go into every record)."""

    def __init__(
        self,
        prompts: list[VibePrompt],
        tokenizer: PreTrainedTokenizerBase,
        settings: VibeArguments,
        output_dir: str,
        stage: str,
    ):
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.settings = settings
        self.output_dir = output_dir
        self.stage = stage
        self.run_name = os.path.basename(os.path.normpath(output_dir))

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, VIBES_FILE)

    def system_prompt(self, prompt: VibePrompt) -> str | None:
        return prompt.system_prompt or self.settings.vibe_system_prompt

    def conversation(self, prompt: VibePrompt) -> list[dict[str, str]]:
        system = self.system_prompt(prompt)
        user = [{"role": "user", "content": prompt.prompt}]
        return ([{"role": "system", "content": system}] if system else []) + user

    def run(
        self, model: nn.Module, step: int, *, is_main: bool, every_rank: bool, engine: Any = None
    ) -> VibeCheckResult | None:
        """Check `model` at `step`. Generates on the main process, or on every rank when `every_rank` (partitioned
        weights, see `generation.needs_every_rank`); returns the result on the main process, None elsewhere.
        `engine` is the DeepSpeed engine training `model`, if any (see `generation.training_state_kept`)."""
        if not (is_main or every_rank):
            return None
        started = time.perf_counter()
        settings = self.settings
        with training_state_kept(model, engine):
            outputs = generate_answers(
                model,
                self.tokenizer,
                [self.conversation(prompt) for prompt in self.prompts],
                max_new_tokens=settings.vibe_max_new_tokens,
                do_sample=settings.vibe_do_sample,
                batch_size=settings.vibe_batch_size,
                synced_gpus=every_rank,
            )
        if not is_main:
            return None
        records = [self._record(prompt, answer, error, step) for prompt, (answer, error) in zip(self.prompts, outputs)]
        self._append(records)
        result = VibeCheckResult(step=step, records=records, scalars=category_scalars(records))
        logger.info(
            "vibe check at step %d: %d prompts in %.1f s; %s",
            step,
            len(records),
            time.perf_counter() - started,
            ", ".join(f"{name} {value:.2f}" for name, value in result.scalars.items()) or "no answers",
        )
        return result

    def _record(self, prompt: VibePrompt, answer: str, error: str | None, step: int) -> VibeRecord:
        system = self.system_prompt(prompt)
        if error is not None:
            logger.warning("vibe check at step %d: prompt %r failed: %s", step, prompt.id, error)
        return VibeRecord(
            step=step,
            prompt_id=prompt.id,
            category=prompt.category,
            prompt=prompt.prompt,
            answer=answer,
            scores={} if error is not None else score_answer(prompt, answer, system),
            system_prompt=system,
            stage=self.stage,
            run=self.run_name,
            error=error,
        )

    def _append(self, records: list[VibeRecord]) -> None:
        """One write per check. A file whose last line was cut short (a run killed mid-write, then resumed) gets its
        line ended first, so the new records stay whole lines and the report names the broken one."""
        os.makedirs(self.output_dir, exist_ok=True)
        text = "".join(record.to_json() + "\n" for record in records)
        with open(self.path, "ab") as handle:
            if handle.tell() > 0 and not _ends_with_newline(self.path):
                text = "\n" + text
            handle.write(text.encode("utf-8"))


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
