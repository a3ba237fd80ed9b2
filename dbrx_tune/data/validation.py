"""Check a dataset's schema and lengths before any model is built, with errors that name the source and row.

TRL's trainers accept several dataset formats and fail late and obscurely (a KeyError deep in a map, a
template error on a GPU node, a silently empty loss mask) when a row does not fit. These checks run in
a second or two on the CPU first and report what is wrong and where:

    DatasetValidationError: data/train.jsonl: 2 invalid rows for SFT (row = 0-based index in the split):
      row 3: messages[1].role is 'bot'; allowed roles: system, user, assistant
      row 7: messages has no assistant turn; SFT needs at least one to learn from

Formats (TRL's names): `messages` (conversational), `text`, `prompt_completion`, `preference`
(`prompt`/`chosen`/`rejected`, or `chosen`/`rejected` with the prompt inside them) and `prompt_only`.
Each may be plain text or conversational (lists of {"role", "content"} messages), but one row's columns
must agree with each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ROWS = 5

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
}
SFT_FORMATS = ("messages", "text", "prompt_completion")
PREFERENCE_FORMATS = ("preference", "implicit_preference")

Row = dict[str, Any]


class DatasetValidationError(ValueError):
    """A dataset does not fit the stage that is about to train on it; the message names source and rows."""


def detect_format(dataset: Dataset) -> str:
    """Name the dataset's format from its columns (most specific first); raise if none fits."""
    columns = set(dataset.column_names)
    for name, required in FORMAT_COLUMNS.items():
        if columns.issuperset(required):
            return name
    expected = " | ".join("+".join(cols) for cols in FORMAT_COLUMNS.values())
    raise DatasetValidationError(f"no known dataset format: expected columns {expected}; found {sorted(columns)}")


# ---------------------------------------------------------------- per-value checks: return a problem or None


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(messages: Any, field: str) -> str | None:
    """Structure and roles of a message list; empty assistant turns are reported here too."""
    if not isinstance(messages, list) or not messages:
        return f"{field} must be a non-empty list of {{'role', 'content'}} messages, got {_describe(messages)}"
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            return f"{where} must be a {{'role', 'content'}} mapping, got {_describe(message)}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{where}.role is {role!r}; allowed roles: {', '.join(ROLES)}"
        if role == "system" and i > 0:
            return f"{where} is a system turn; a system message may only come first"
        if not isinstance(content, str):
            return f"{where}.content must be a string, got {_describe(content)}"
        if role == "assistant" and not content.strip():
            return f"{where} is an empty assistant turn"
    return None


def _check_text(value: Any, field: str) -> str | None:
    if not isinstance(value, str):
        return f"{field} must be a string, got {_describe(value)}"
    if not value.strip():
        return f"{field} is empty"
    return None


def _check_reply(value: Any, field: str, conversational: bool) -> str | None:
    """A completion, chosen or rejected answer: text, or assistant messages only."""
    if not conversational:
        return _check_text(value, field)
    if not _is_conversation(value):
        return f"{field} must be a list of messages like the prompt, got {_describe(value)}"
    problem = _check_messages(value, field)
    if problem is None and any(m["role"] != "assistant" for m in value):
        return f"{field} may only hold assistant messages, got roles {[m['role'] for m in value]}"
    return problem


def _check_prompt(value: Any, field: str, conversational: bool, *, for_generation: bool) -> str | None:
    if not conversational:
        return _check_text(value, field)
    if not _is_conversation(value):
        return f"{field} must be a list of messages like the answers, got {_describe(value)}"
    problem = _check_messages(value, field)
    if problem is None and for_generation and value[-1]["role"] == "assistant":
        return f"{field} ends with an assistant turn; the model generates the next assistant turn after a user turn"
    return problem


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# ---------------------------------------------------------------- per-row checks for each format


def _row_messages(row: Row) -> str | None:
    problem = _check_messages(row["messages"], "messages")
    if problem is None and not any(m["role"] == "assistant" for m in row["messages"]):
        return "messages has no assistant turn; SFT needs at least one to learn from"
    return problem


def _row_text(row: Row) -> str | None:
    return _check_text(row["text"], "text")


def _row_prompt_completion(row: Row) -> str | None:
    conversational = _is_conversation(row["prompt"])
    return _check_prompt(row["prompt"], "prompt", conversational, for_generation=True) or _check_reply(
        row["completion"], "completion", conversational
    )


def _row_preference(row: Row) -> str | None:
    conversational = _is_conversation(row["prompt"])
    problem = (
        _check_prompt(row["prompt"], "prompt", conversational, for_generation=True)
        or _check_reply(row["chosen"], "chosen", conversational)
        or _check_reply(row["rejected"], "rejected", conversational)
    )
    return problem or _check_distinct(row)


def _row_implicit_preference(row: Row) -> str | None:
    conversational = _is_conversation(row["chosen"])
    for field in ("chosen", "rejected"):
        value = row[field]
        if not conversational:
            problem = _check_text(value, field)
        elif not _is_conversation(value):
            problem = f"{field} must be a list of messages like chosen, got {_describe(value)}"
        else:
            problem = _check_messages(value, field)
            if problem is None and value[-1]["role"] != "assistant":
                problem = f"{field} must end with the assistant answer being compared, ends with {value[-1]['role']!r}"
        if problem:
            return problem
    return _check_distinct(row)


def _check_distinct(row: Row) -> str | None:
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are identical; the pair carries no preference"
    return None


def _row_prompt_only(row: Row) -> str | None:
    return _check_prompt(row["prompt"], "prompt", _is_conversation(row["prompt"]), for_generation=True)


ROW_CHECKS: dict[str, Callable[[Row], str | None]] = {
    "messages": _row_messages,
    "text": _row_text,
    "prompt_completion": _row_prompt_completion,
    "preference": _row_preference,
    "implicit_preference": _row_implicit_preference,
    "prompt_only": _row_prompt_only,
}

# ---------------------------------------------------------------- dataset-level entry points


def _rows(dataset: Dataset, columns: Iterable[str]) -> Iterator[Row]:
    """Rows restricted to `columns`, read column-wise from Arrow in one go (much faster than `dataset[i]`)."""
    data = dataset.select_columns(list(columns)).to_dict()
    names = list(data)
    for values in zip(*(data[name] for name in names)):
        yield dict(zip(names, values))


def _raise_for(problems: list[tuple[int, str]], total: int, source: str, stage: str) -> None:
    if not problems:
        return
    shown = "\n".join(f"  row {index}: {problem}" for index, problem in problems)
    more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
    raise DatasetValidationError(
        f"{source}: {total} invalid row{'s' if total != 1 else ''} for {stage} (row = 0-based index in the split):\n"
        f"{shown}{more}"
    )


def _validate(dataset: Dataset | DatasetDict, source: str, stage: str, allowed: tuple[str, ...]) -> str:
    if isinstance(dataset, DatasetDict):
        formats = {_validate(split, f"{source} [split {name}]", stage, allowed) for name, split in dataset.items()}
        if len(formats) > 1:
            raise DatasetValidationError(f"{source}: splits have different formats {sorted(formats)}")
        return formats.pop()
    try:
        fmt = detect_format(dataset)
    except DatasetValidationError as err:
        raise DatasetValidationError(f"{source}: {err}") from None
    if fmt not in allowed:
        wanted = " or ".join("+".join(FORMAT_COLUMNS[f]) for f in allowed)
        raise DatasetValidationError(
            f"{source}: {stage} needs columns {wanted}; found {sorted(dataset.column_names)} (looks like {fmt} data)"
        )
    if len(dataset) == 0:
        raise DatasetValidationError(f"{source}: has no rows")
    check = ROW_CHECKS[fmt]
    problems, total = [], 0
    for index, row in enumerate(_rows(dataset, FORMAT_COLUMNS[fmt])):
        problem = check(row)
        if problem is not None:
            total += 1
            if len(problems) < MAX_REPORTED_ROWS:
                problems.append((index, problem))
    _raise_for(problems, total, source, stage)
    return fmt


def validate_sft_dataset(dataset: Dataset | DatasetDict, source: str) -> str:
    """Check SFT data (`messages`, `text` or `prompt`/`completion`); return its format name."""
    return _validate(dataset, source, "SFT", SFT_FORMATS)


def check_assistant_only_loss(dataset: Dataset, source: str) -> None:
    """Refuse `assistant_only_loss: true` on data without assistant turns (TRL raises late, once the model is loaded).

    Only conversations (`messages`, or conversational `prompt`/`completion`) have assistant turns to keep."""
    fmt = detect_format(dataset)
    conversational = fmt == "messages" or (
        fmt == "prompt_completion" and len(dataset) > 0 and _is_conversation(dataset[0]["prompt"])
    )
    if not conversational:
        raise DatasetValidationError(
            f"{source}: assistant_only_loss: true needs conversations (a 'messages' column), but this is plain "
            f"{fmt} data with no assistant turns: set assistant_only_loss: false"
        )


def validate_preference_dataset(dataset: Dataset | DatasetDict, source: str) -> str:
    """Check preference data (reward model, DPO, ORPO); return `preference` or `implicit_preference`."""
    return _validate(dataset, source, "preference training", PREFERENCE_FORMATS)


def validate_prompt_dataset(dataset: Dataset | DatasetDict, source: str) -> str:
    """Check prompts for online generation (PPO); any dataset with a valid `prompt` column qualifies."""
    if isinstance(dataset, DatasetDict):
        for name, split in dataset.items():
            validate_prompt_dataset(split, f"{source} [split {name}]")
        return "prompt_only"
    if "prompt" not in dataset.column_names:
        raise DatasetValidationError(
            f"{source}: online training needs a 'prompt' column; found {sorted(dataset.column_names)}"
        )
    return _validate(dataset.select_columns(["prompt"]), source, "online training", ("prompt_only",))


# ---------------------------------------------------------------- token lengths


def _render(
    tokenizer: PreTrainedTokenizerBase, values: list[str | list[dict]], *, generation_prompt: bool = False
) -> list[str]:
    """Texts as the trainer sees them: plain text as is, conversations through the chat template (batched)."""
    conversations = [i for i, value in enumerate(values) if isinstance(value, list)]
    texts = list(values)
    if conversations:
        rendered = tokenizer.apply_chat_template(
            [values[i] for i in conversations], tokenize=False, add_generation_prompt=generation_prompt
        )
        for i, text in zip(conversations, rendered):
            texts[i] = text
    return texts


def _count_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Token counts of rendered texts in one batched call."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _reply_lengths(
    tokenizer: PreTrainedTokenizerBase, rows: list[Row], column: str, prompts: list[int] | None
) -> list[int]:
    """Full-sample lengths: a conversation is rendered whole (with its prompt); plain text is tokenised piecewise,
    as TRL does, plus the EOS TRL appends to it."""
    conversational = [isinstance(row[column], list) for row in rows]
    values = [
        (row.get("prompt") or []) + row[column] if conv else row[column] for row, conv in zip(rows, conversational)
    ]
    lengths = _count_tokens(tokenizer, _render(tokenizer, values))
    return [
        n if conv else n + 1 + (prompts[i] if prompts is not None else 0)
        for i, (n, conv) in enumerate(zip(lengths, conversational))
    ]


def check_lengths(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    source: str,
    *,
    allow_truncation: bool = False,
) -> int:
    """Tokenise every row as the trainer will (chat template for conversations) and return the longest length.

    Errors, naming the rows, when a full sample is longer than `max_length` and `allow_truncation` is off
    (the trainer would otherwise cut answers off silently), and always when a prompt leaves no room for a
    completion under `max_length` (preference, prompt/completion and prompt-only data).
    """
    fmt = detect_format(dataset)
    rows = list(_rows(dataset, FORMAT_COLUMNS[fmt]))
    if tokenizer.chat_template is None and any(isinstance(v, list) for row in rows for v in row.values()):
        raise DatasetValidationError(f"{source}: conversational data needs a tokenizer with a chat template")
    prompts = None
    if "prompt" in FORMAT_COLUMNS[fmt]:
        prompts = _count_tokens(tokenizer, _render(tokenizer, [r["prompt"] for r in rows], generation_prompt=True))
    fulls = [
        (column if prompts is None else f"prompt+{column}", _reply_lengths(tokenizer, rows, column, prompts))
        for column in FORMAT_COLUMNS[fmt]
        if column != "prompt"
    ]

    problems, total = [], 0
    for index in range(len(rows)):
        problem = None
        if prompts is not None and prompts[index] >= max_length:
            problem = (
                f"prompt is {prompts[index]} tokens, leaving no room for a completion under max_length={max_length}"
            )
        elif not allow_truncation:
            long = [f"{name} is {lengths[index]} tokens" for name, lengths in fulls if lengths[index] > max_length]
            if long:
                problem = (
                    f"{', '.join(long)} > max_length={max_length} (truncation is off; raise max_length or drop the row)"
                )
        if problem is not None:
            total += 1
            if len(problems) < MAX_REPORTED_ROWS:
                problems.append((index, problem))
    _raise_for(problems, total, source, f"max_length={max_length}")
    return max((max(lengths) for _, lengths in fulls), default=max(prompts or [0]))
