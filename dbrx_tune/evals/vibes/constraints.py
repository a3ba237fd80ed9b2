"""The automatic checks a `constraint` vibe prompt lists: hard, mechanically checkable instructions.

A constraint row names its checks as a mapping, e.g.

    checks: {words_start_with: s, min_words: 3}

Each check is a pure function of the answer text and the row's argument. Words are runs of letters, digits and
underscores, joined by inner apostrophes or hyphens ("don't", "sun-soaked"); punctuation is not a word. An answer
without a single word fails every check (an empty answer obeys "no commas" only vacuously, and that is no pass).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text)


@dataclass(frozen=True)
class ConstraintCheck:
    """One named check: the argument type a prompt file must give it, and the test."""

    argument: type  # bool (the value must be true), int (>= 0), str (non-empty) or list (of non-empty strings)
    test: Callable[[str, Any], bool]
    help: str


def _every_word_starts_with(text: str, letters: str) -> bool:
    return all(word.lower().startswith(letters.lower()) for word in words(text))


def _includes_all(text: str, phrases: list[str]) -> bool:
    return all(phrase.lower() in text.lower() for phrase in phrases)


def _includes_none(text: str, phrases: list[str]) -> bool:
    return not any(phrase.lower() in text.lower() for phrase in phrases)


CHECKS: dict[str, ConstraintCheck] = {
    "words_start_with": ConstraintCheck(str, _every_word_starts_with, "every word starts with these letters"),
    "min_words": ConstraintCheck(int, lambda text, n: len(words(text)) >= n, "at least this many words"),
    "max_words": ConstraintCheck(int, lambda text, n: len(words(text)) <= n, "at most this many words"),
    "must_include": ConstraintCheck(list, _includes_all, "contains every phrase (case-insensitive)"),
    "must_not_include": ConstraintCheck(list, _includes_none, "contains none of the phrases (case-insensitive)"),
    "all_lowercase": ConstraintCheck(bool, lambda text, _: text == text.lower(), "no upper-case letter"),
    "all_uppercase": ConstraintCheck(bool, lambda text, _: text == text.upper(), "no lower-case letter"),
    "no_commas": ConstraintCheck(bool, lambda text, _: "," not in text, "no comma"),
}


def check_argument_problem(name: str, value: Any) -> str | None:
    """Why `value` is not a valid argument for check `name`, or None when it is."""
    if name not in CHECKS:
        return f"unknown check {name!r} (known: {', '.join(CHECKS)})"
    kind = CHECKS[name].argument
    if kind is bool and value is not True:
        return f"check {name!r} takes true (remove it to switch it off), got {value!r}"
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        return f"check {name!r} takes a whole number >= 0, got {value!r}"
    if kind is str and (not isinstance(value, str) or not value.strip()):
        return f"check {name!r} takes a non-empty string, got {value!r}"
    if kind is list and (
        not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value)
    ):
        return f"check {name!r} takes a non-empty list of non-empty strings, got {value!r}"
    return None


def run_checks(text: str, checks: dict[str, Any]) -> dict[str, bool]:
    """name -> passed, for every check of a constraint prompt (all False for an answer without words)."""
    if not words(text):
        return {name: False for name in checks}
    return {name: bool(CHECKS[name].test(text, argument)) for name, argument in checks.items()}
