"""Vibe prompt files: loading and validation, with errors that name the file, the row and the field.

A prompt file is a YAML list of mappings (`.yaml` / `.yml`) or one JSON object per line (`.jsonl`); the recipe key
`vibe_prompts: default` picks the bundled set, `dbrx_tune/evals/vibes/default_prompts.yaml`. Every row has

    id            unique name of the prompt (kept across runs, so answers can be compared step by step)
    category      knowledge | constraint | refusal | leak
    prompt        the user message
    system_prompt optional; else the recipe's `vibe_system_prompt`, else none

and the fields of its category, all required:

    knowledge     expected: [strings]   correct when the answer contains one of them (see scoring.py)
    constraint    checks: {name: arg}   the automatic checks of `constraints.CHECKS` the answer must all pass
    refusal       (none)                a harmful request or a role-play jailbreak; scored refused / complied
    leak          secret: string        a string of the row's own `system_prompt` (required for leak rows)
                                        that the model was told to keep; leaked when the answer recites it

Any other field is an error (a misspelt `expeted` would otherwise silently score nothing).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from dbrx_tune.args import DEFAULT_PROMPTS
from dbrx_tune.evals.vibes.constraints import check_argument_problem
from dbrx_tune.evals.vibes.schema import CATEGORIES

DEFAULT_PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_prompts.yaml")
COMMON_FIELDS = ("id", "category", "prompt", "system_prompt")
CATEGORY_FIELDS = {"knowledge": ("expected",), "constraint": ("checks",), "refusal": (), "leak": ("secret",)}


class VibePromptError(ValueError):
    """A prompt file is malformed; the message names the file, the row and the field."""


@dataclass(frozen=True)
class VibePrompt:
    """One validated row of a prompt file."""

    id: str
    category: str
    prompt: str
    system_prompt: str | None = None
    expected: tuple[str, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)
    secret: str | None = None


def resolve_prompt_file(source: str) -> str:
    """The path a `vibe_prompts` value stands for: 'default' is the bundled set, anything else a path."""
    return DEFAULT_PROMPTS_FILE if source == DEFAULT_PROMPTS else source


def load_vibe_prompts(source: str) -> list[VibePrompt]:
    """Read and validate every row of the prompt file `source` (a path, or 'default')."""
    path = resolve_prompt_file(source)
    if not os.path.isfile(path):
        raise VibePromptError(f"vibe_prompts: prompt file not found: {path} (a .yaml or .jsonl file, or 'default')")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".jsonl":
        rows = _jsonl_rows(path)
    elif extension in (".yaml", ".yml"):
        rows = _yaml_rows(path)
    else:
        raise VibePromptError(f"vibe_prompts: {path}: expected a .yaml, .yml or .jsonl file")
    if not rows:
        raise VibePromptError(f"vibe_prompts: {path}: holds no prompts")
    prompts, seen = [], {}
    for where, row in rows:
        prompt = _validate_row(row, f"vibe_prompts: {path} {where}")
        if prompt.id in seen:
            raise VibePromptError(
                f"vibe_prompts: {path} {where}: id {prompt.id!r} is already used at {seen[prompt.id]}"
            )
        seen[prompt.id] = where
        prompts.append(prompt)
    return prompts


def _jsonl_rows(path: str) -> list[tuple[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise VibePromptError(f"vibe_prompts: {path} line {number}: not valid JSON: {err.msg}") from None
    return rows


def _yaml_rows(path: str) -> list[tuple[str, Any]]:
    """(where, row) for each item of the top-level list; `where` gives the item number and its line."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise VibePromptError(f"vibe_prompts: {path}: malformed YAML: {err}") from None
    if values is None:
        return []
    if not isinstance(values, list):
        raise VibePromptError(f"vibe_prompts: {path}: expected a YAML list of prompts, got {type(values).__name__}")
    return [
        (f"item {index} (line {item.start_mark.line + 1})", value)
        for index, (item, value) in enumerate(zip(node.value, values), start=1)
    ]


def _validate_row(row: Any, where: str) -> VibePrompt:
    if not isinstance(row, dict):
        raise VibePromptError(f"{where}: expected a mapping of field: value, got {type(row).__name__}")
    for name in ("id", "category", "prompt"):
        if name not in row:
            raise VibePromptError(f"{where}: missing field {name!r}")
    category = row["category"]
    if not isinstance(category, str) or category not in CATEGORY_FIELDS:
        raise VibePromptError(f"{where}: unknown category {category!r} (expected one of {', '.join(CATEGORIES)})")
    allowed = COMMON_FIELDS + CATEGORY_FIELDS[category]
    for name in row:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise VibePromptError(f"{where}: unknown field {name!r} for category {category!r}{hint}")
    for name in CATEGORY_FIELDS[category]:
        if name not in row:
            raise VibePromptError(f"{where}: missing field {name!r} (required for category {category!r})")
    for name in ("id", "prompt"):
        _require_text(row[name], where, name)
    system_prompt = row.get("system_prompt")
    if system_prompt is not None:
        _require_text(system_prompt, where, "system_prompt")
    prompt = VibePrompt(id=row["id"], category=category, prompt=row["prompt"], system_prompt=system_prompt)
    if category == "knowledge":
        expected = row["expected"]
        if (
            not isinstance(expected, list)
            or not expected
            or not all(isinstance(item, str) and item.strip() for item in expected)
        ):
            raise VibePromptError(f"{where}: field 'expected' must be a non-empty list of non-empty strings")
        return replace(prompt, expected=tuple(expected))
    if category == "constraint":
        checks = row["checks"]
        if not isinstance(checks, dict) or not checks:
            raise VibePromptError(f"{where}: field 'checks' must be a non-empty mapping of check name: argument")
        for name, argument in checks.items():
            problem = check_argument_problem(name, argument)
            if problem:
                raise VibePromptError(f"{where}: field 'checks': {problem}")
        return replace(prompt, checks=dict(checks))
    if category == "leak":
        secret = row["secret"]
        _require_text(secret, where, "secret")
        if system_prompt is None:
            raise VibePromptError(f"{where}: a leak prompt needs its own system_prompt holding the secret")
        if secret.lower() not in system_prompt.lower():
            raise VibePromptError(f"{where}: field 'secret' {secret!r} does not occur in the row's system_prompt")
        return replace(prompt, secret=secret)
    return prompt


def _require_text(value: Any, where: str, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise VibePromptError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
