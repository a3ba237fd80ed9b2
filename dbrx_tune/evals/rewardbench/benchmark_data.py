"""Loading and checking RewardBench-format datasets (v1 pairs, v2 best-of-n, prior preference sets).

Accepts local `.json`/`.jsonl`/`.parquet` files (or a directory saved with `datasets.save_to_disk`) and, for users
online, hub ids (allenai/reward-bench split `filtered`, allenai/reward-bench-2 split `test`,
allenai/pref-test-sets with one split per set). Every row is checked before any model is loaded, and an error names
the file, the column and the row.

Schemas (the hub datasets' columns):
- v1: `prompt` (str, or a list of chat messages), `chosen` (str), `rejected` (str), `subset`, `id`; `chosen_model`
  and `rejected_model` are carried if present but not needed.
- v2: `prompt`, `chosen` (list of str), `rejected` (list of str), `subset`, `id`; `num_correct` and
  `total_completions`, when present, must agree with the list lengths.
- prior sets: `prompt` (str or messages), `chosen`, `rejected`; the set name comes from a `subset` column, else
  from the hub split or the file name.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

logger = logging.getLogger(__name__)

Schema = Literal["v1", "v2"]
Messages = list[dict[str, str]]

V1_COLUMNS = ("prompt", "chosen", "rejected", "subset", "id")
V2_COLUMNS = ("prompt", "chosen", "rejected", "subset", "id")
PRIOR_COLUMNS = ("prompt", "chosen", "rejected")
HUB_SPLITS = {"v1": "filtered", "v2": "test"}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class PairExample:
    """One v1 or prior-set comparison: a conversation prefix and two candidate assistant replies."""

    id: str
    subset: str
    prompt: Messages
    chosen: str
    rejected: str


@dataclass(frozen=True)
class BestOfNExample:
    """One RewardBench 2 prompt: `completions[:num_correct]` are correct, the rest incorrect."""

    id: str
    subset: str
    prompt: Messages
    completions: list[str]
    num_correct: int


def _load_table(source: str, hub_split: str | None) -> dict[str, datasets.Dataset]:
    """Rows of a local file/directory or a hub dataset, as {split or file stem: Dataset}."""
    path = Path(source)
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{source}: unsupported file type {path.suffix!r}; use .json, .jsonl or .parquet")
        if path.suffix.lower() == ".jsonl":
            _check_json_lines(path)
        return {path.stem: datasets.load_dataset(builder, data_files=str(path), split="train")}
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return dict(loaded)
        return {path.name: loaded}
    if path.suffix.lower() in LOCAL_BUILDERS or source.startswith((".", os.sep, "~")):
        raise FileNotFoundError(f"{source}: no such file or directory")
    logger.info("%s is not a local path; loading it from the Hugging Face hub", source)
    loaded = datasets.load_dataset(source, split=hub_split)
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {hub_split or "train": loaded}


def _check_json_lines(path: Path) -> None:
    """Name the first line of a JSONL file that is not a JSON object (`datasets` reports a byte position, no file)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object (one row)")


def _require_columns(table: datasets.Dataset, required: tuple[str, ...], where: str) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {table.column_names}")


def _as_messages(prompt: Any, where: str) -> Messages:
    """A prompt as chat messages ending with a user turn (plain strings become one user message)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: empty prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        # RewardBench ignores stored roles and alternates user/assistant starting with user; do the same so
        # scores agree with the official runner.
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": str(m["content"])} for i, m in enumerate(prompt)
        ]
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: prompt has {len(messages)} turns; it must end with a user turn")
        return messages
    raise ValueError(
        f"{where}: prompt must be a string or a non-empty list of {{role, content}} messages, "
        f"got {type(prompt).__name__}"
    )


def _as_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _as_text_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a non-empty list of strings, got {type(value).__name__}")
    return value


def detect_schema(table: datasets.Dataset, source: str) -> Schema:
    """v2 when `chosen` holds lists of completions, v1 when it holds one string."""
    _require_columns(table, ("chosen",), source)
    if len(table) == 0:
        raise ValueError(f"{source}: dataset has no rows")
    first = table[0]["chosen"]
    if isinstance(first, list):
        return "v2"
    if isinstance(first, str):
        return "v1"
    raise ValueError(f"{source}: column 'chosen' holds {type(first).__name__}; expected str (v1) or list (v2)")


def load_benchmark(
    source: str, schema: Schema | Literal["auto"] = "auto"
) -> tuple[Schema, list[PairExample] | list[BestOfNExample]]:
    """Load a RewardBench v1 or v2 dataset and check every row."""
    hub_split = HUB_SPLITS.get(schema) if schema != "auto" else None
    if hub_split is None and not Path(source).exists():
        hub_split = HUB_SPLITS["v2"] if "reward-bench-2" in source else HUB_SPLITS["v1"]
    tables = _load_table(source, hub_split)
    if len(tables) != 1:
        raise ValueError(f"{source}: holds {len(tables)} splits {sorted(tables)}; pass one file or split")
    table = next(iter(tables.values()))
    found = detect_schema(table, source)
    if schema != "auto" and found != schema:
        raise ValueError(f"{source}: --schema {schema} given but column 'chosen' has the {found} layout")
    if found == "v1":
        return found, _pairs(table, source, V1_COLUMNS, default_subset=None)
    return found, _best_of_n(table, source)


def load_prior_sets(sources: list[str]) -> list[PairExample]:
    """Prior preference sets (Anthropic HH, SHP, Summarize, ...) from files or a hub id (one split per set)."""
    examples: list[PairExample] = []
    for source in sources:
        tables = _load_table(source, None)
        for name, table in tables.items():
            if len(tables) > 1:
                # One split per set (allenai/pref-test-sets): the split names the set, and a `subset` column inside
                # it is a finer grouping that RewardBench does not score by.
                examples.extend(
                    _pairs(table, f"{source}[{name}]", PRIOR_COLUMNS, default_subset=name, split_names_subset=True)
                )
            else:
                examples.extend(_pairs(table, source, PRIOR_COLUMNS, default_subset=name))
    return examples


def _pairs(
    table: datasets.Dataset,
    source: str,
    required: tuple[str, ...],
    default_subset: str | None,
    split_names_subset: bool = False,
) -> list[PairExample]:
    _require_columns(table, required, source)
    examples = []
    for index, row in enumerate(table):
        row_id = str(row.get("id", index))
        where = f"{source} row {index} (id={row_id})"
        subset = default_subset if split_names_subset else (row.get("subset") or default_subset)
        if not isinstance(subset, str) or not subset:
            raise ValueError(f"{where}: column 'subset' is empty")
        examples.append(
            PairExample(
                id=row_id,
                subset=subset,
                prompt=_as_messages(row["prompt"], f"{where}, column 'prompt'"),
                chosen=_as_text(row["chosen"], f"{where}, column 'chosen'"),
                rejected=_as_text(row["rejected"], f"{where}, column 'rejected'"),
            )
        )
    return examples


def _best_of_n(table: datasets.Dataset, source: str) -> list[BestOfNExample]:
    _require_columns(table, V2_COLUMNS, source)
    examples = []
    for index, row in enumerate(table):
        row_id = str(row["id"])
        where = f"{source} row {index} (id={row_id})"
        chosen = _as_text_list(row["chosen"], f"{where}, column 'chosen'")
        rejected = _as_text_list(row["rejected"], f"{where}, column 'rejected'")
        if row.get("num_correct") is not None and row["num_correct"] != len(chosen):
            raise ValueError(f"{where}: num_correct={row['num_correct']} but 'chosen' has {len(chosen)} completions")
        total = row.get("total_completions")
        if total is not None and total != len(chosen) + len(rejected):
            raise ValueError(
                f"{where}: total_completions={total} but chosen + rejected hold "
                f"{len(chosen) + len(rejected)} completions"
            )
        if not isinstance(row["subset"], str) or not row["subset"]:
            raise ValueError(f"{where}: column 'subset' is empty")
        examples.append(
            BestOfNExample(
                id=row_id,
                subset=row["subset"],
                prompt=_as_messages(row["prompt"], f"{where}, column 'prompt'"),
                completions=chosen + rejected,
                num_correct=len(chosen),
            )
        )
    return examples
