"""Data layer: bundled samples, loading from files/directories/bundled names, schema and length validation."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dbrx_tune.data import (
    DatasetValidationError,
    bundled_path,
    check_lengths,
    detect_format,
    load_splits,
    samples_dir,
    validate_preference_dataset,
    validate_prompt_dataset,
    validate_sft_dataset,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = {
    "sft_train.jsonl": validate_sft_dataset,
    "sft_test.jsonl": validate_sft_dataset,
    "sft_prompt_completion_train.jsonl": validate_sft_dataset,
    "preference_train.jsonl": validate_preference_dataset,
    "preference_test.jsonl": validate_preference_dataset,
    "prompts_train.jsonl": validate_prompt_dataset,
    "prompts_test.jsonl": validate_prompt_dataset,
}
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompt_key(messages: list[dict]) -> str:
    return json.dumps([m for m in messages if m["role"] != "assistant"], sort_keys=True)


def n_tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> int:
    return len(tokenizer.tokenize(text))


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with a ChatML template: one token per word, so lengths are easy to reason
    about."""
    words = {f"w{i}" for i in range(64)} | {"system", "user", "assistant", "hello", "answer"}
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3}
    vocab.update({w: i + len(vocab) for i, w in enumerate(sorted(words))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]", chat_template=CHATML
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


# ---------------------------------------------------------------- bundled samples


def test_bundled_files_exist_and_stay_small():
    sizes = {name: bundled_path(name).stat().st_size for name in BUNDLED}
    assert all(size > 0 for size in sizes.values())
    assert sum(p.stat().st_size for p in samples_dir().iterdir()) < 1_000_000


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_file_validates_for_its_stage(name):
    dataset = load_splits(f"bundled://{name}")["train"]
    BUNDLED[name](dataset, name)
    assert len(dataset) >= 50


@pytest.mark.parametrize("stem,column", [("sft", "messages"), ("preference", "prompt"), ("prompts", "prompt")])
def test_bundled_test_prompts_never_occur_in_train(stem, column):
    train = read_jsonl(bundled_path(f"{stem}_train.jsonl"))
    test = read_jsonl(bundled_path(f"{stem}_test.jsonl"))
    train_keys = {prompt_key(row[column]) for row in train}
    assert not [row for row in test if prompt_key(row[column]) in train_keys]


def test_bundled_sft_mixes_system_turns_and_multi_turn_rows():
    rows = read_jsonl(bundled_path("sft_train.jsonl"))
    with_system = sum(row["messages"][0]["role"] == "system" for row in rows)
    multi_turn = sum(sum(m["role"] == "assistant" for m in row["messages"]) > 1 for row in rows)
    assert 0 < with_system < len(rows) and 0 < multi_turn < len(rows)


def test_bundled_prompt_answers_appear_in_the_reference_replies():
    """The rule reward (reply contains `answer`) must hold for the correct reply of the same task family."""
    sft_rows = read_jsonl(bundled_path("sft_train.jsonl")) + read_jsonl(bundled_path("sft_test.jsonl"))
    replies = {prompt_key(row["messages"][-2:-1]): row["messages"][-1]["content"] for row in sft_rows}
    prompts = read_jsonl(bundled_path("prompts_train.jsonl")) + read_jsonl(bundled_path("prompts_test.jsonl"))
    checked = [(replies[key], row["answer"]) for row in prompts if (key := prompt_key(row["prompt"][-1:])) in replies]
    assert len(checked) > 20
    assert all(answer in reply for reply, answer in checked)


def test_generator_reproduces_the_bundled_files():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = dict(module.generate(seed=0))
    assert set(generated) == set(BUNDLED)
    for name, rows in generated.items():
        assert rows == read_jsonl(bundled_path(name)), name


# ---------------------------------------------------------------- loading


ROWS = [{"messages": [user(f"w{i}"), assistant(f"w{i + 1}")]} for i in range(10)]


def test_loads_jsonl_json_and_parquet_files(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    as_json = tmp_path / "b.json"
    as_json.write_text(json.dumps(ROWS), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    Dataset.from_list(ROWS).to_parquet(str(parquet))
    for path in (jsonl, as_json, parquet):
        splits = load_splits(str(path))
        assert list(splits) == ["train"] and list(splits["train"]["messages"]) == [r["messages"] for r in ROWS]


def test_loads_directory_with_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "test.jsonl", ROWS[7:])
    splits = load_splits(str(tmp_path), test_split="test")
    assert (len(splits["train"]), len(splits["test"])) == (7, 3)


def test_loads_saved_dataset_directory(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS[:6]), "eval": Dataset.from_list(ROWS[6:])}).save_to_disk(
        str(tmp_path / "d")
    )
    splits = load_splits(str(tmp_path / "d"), test_split="eval")
    assert (len(splits["train"]), len(splits["test"])) == (6, 4)


def test_bundled_stem_maps_files_to_splits():
    splits = load_splits("bundled://sft", test_split="test")
    assert len(splits["train"]) == len(read_jsonl(bundled_path("sft_train.jsonl")))
    assert len(splits["test"]) == len(read_jsonl(bundled_path("sft_test.jsonl")))


def test_missing_file_names_the_path_without_a_hub_lookup(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_splits(str(missing))
    with pytest.raises(FileNotFoundError, match="available: .*sft_train.jsonl"):
        load_splits("bundled://nope.jsonl")


def test_default_test_split_is_optional_unless_required(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", ROWS))
    assert list(load_splits(path, test_split="test")) == ["train"]
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train'\]"):
        load_splits(path, test_split="test", require_test=True)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_splits(path, train_split="validation")


def test_eval_dataset_and_hold_out_and_sample_caps(tmp_path):
    train = str(write_jsonl(tmp_path / "train_rows.jsonl", ROWS))
    other = str(write_jsonl(tmp_path / "eval_rows.jsonl", ROWS[:4]))
    splits = load_splits(train, test_split="test", eval_dataset_name=other, max_train_samples=5, max_eval_samples=3)
    assert (len(splits["train"]), len(splits["test"])) == (5, 3)
    assert list(splits["train"]["messages"]) == [r["messages"] for r in ROWS[:5]]
    held = load_splits(train, test_split_size=0.3, seed=1)
    assert (len(held["train"]), len(held["test"])) == (7, 3)
    assert sorted(map(json.dumps, list(held["train"]["messages"]) + list(held["test"]["messages"]))) == sorted(
        json.dumps(r["messages"]) for r in ROWS
    )


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2"):
        load_splits(str(path))


# ---------------------------------------------------------------- schema validation

GOOD_SFT = {"messages": [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello")]}
GOOD_PC = {"prompt": [user("hi")], "completion": [assistant("hello")]}
GOOD_PREF = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")]}
GOOD_PROMPT = {"prompt": [user("hi")], "answer": "hello"}

BAD_ROWS = [
    (validate_sft_dataset, GOOD_SFT, {"messages": [user("hi"), {"role": "bot", "content": "x"}]}, "role is 'bot'"),
    (
        validate_sft_dataset,
        GOOD_SFT,
        {"messages": [user("hi"), {"role": "system", "content": "x"}, assistant("a")]},
        "system message may only come first",
    ),
    (validate_sft_dataset, GOOD_SFT, {"messages": [user("hi"), assistant("  ")]}, "empty assistant turn"),
    (validate_sft_dataset, GOOD_SFT, {"messages": [user("hi")]}, "no assistant turn"),
    (
        validate_sft_dataset,
        GOOD_SFT,
        {"messages": [user("hi"), {"role": "assistant", "content": 3}]},
        r"content must be a string, got int",
    ),
    (validate_sft_dataset, GOOD_SFT, {"messages": "hi there"}, "must be a non-empty list"),
    (
        validate_sft_dataset,
        GOOD_SFT,
        {"messages": [user("hi"), {"role": "assistant"}]},
        "content must be a string, got NoneType",
    ),
    (validate_sft_dataset, GOOD_PC, {"prompt": [user("hi")], "completion": [assistant("")]}, "empty assistant turn"),
    (validate_sft_dataset, GOOD_PC, {"prompt": "hi", "completion": [assistant("x")]}, "completion must be a string"),
    (
        validate_sft_dataset,
        GOOD_PC,
        {"prompt": [user("hi")], "completion": [user("x")]},
        "completion may only hold assistant messages",
    ),
    (validate_preference_dataset, GOOD_PREF, {**GOOD_PREF, "chosen": []}, "chosen must be a non-empty list"),
    (
        validate_preference_dataset,
        GOOD_PREF,
        {**GOOD_PREF, "rejected": GOOD_PREF["chosen"]},
        "chosen and rejected are identical",
    ),
    (
        validate_preference_dataset,
        GOOD_PREF,
        {**GOOD_PREF, "prompt": [user("hi"), assistant("x")]},
        "ends with an assistant turn",
    ),
    (validate_preference_dataset, GOOD_PREF, {**GOOD_PREF, "rejected": "go away"}, "rejected must be a list"),
    (
        validate_prompt_dataset,
        GOOD_PROMPT,
        {"prompt": [user("hi"), {"role": "tool", "content": "x"}], "answer": "a"},
        "role is 'tool'",
    ),
]


@pytest.mark.parametrize("validate,good,bad,problem", BAD_ROWS, ids=[case[3] for case in BAD_ROWS])
def test_bad_row_error_names_file_row_and_problem(tmp_path, validate, good, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    dataset = load_splits(str(path))["train"]
    with pytest.raises(DatasetValidationError, match=problem) as err:
        validate(dataset, str(path))
    message = str(err.value)
    assert str(path) in message and "1 invalid row " in message and "\n  row 2: " in message
    validate(load_splits(str(write_jsonl(tmp_path / "good.jsonl", [good, good])))["train"], "good.jsonl")


@pytest.mark.parametrize(
    "validate,row,expected",
    [
        (validate_sft_dataset, {"msgs": [user("hi")]}, "messages"),
        (validate_sft_dataset, GOOD_PREF, "messages"),
        (
            validate_preference_dataset,
            {"prompt": [user("hi")], "chosen": [assistant("a")]},
            "prompt\\+chosen\\+rejected",
        ),
        (validate_prompt_dataset, {"question": "hi"}, "'prompt'"),
    ],
)
def test_missing_columns_name_expected_and_present_columns(tmp_path, validate, row, expected):
    path = write_jsonl(tmp_path / "cols.jsonl", [row])
    with pytest.raises(DatasetValidationError, match=expected) as err:
        validate(load_splits(str(path))["train"], str(path))
    assert str(path) in str(err.value) and all(f"'{c}'" in str(err.value) for c in row)


def test_error_lists_a_few_rows_and_counts_the_rest():
    rows = [{"messages": [user("hi")]}] * 9
    with pytest.raises(DatasetValidationError) as err:
        validate_sft_dataset(Dataset.from_list(rows), "many.jsonl")
    message = str(err.value)
    assert "9 invalid rows" in message and "... and 4 more" in message and message.count("\n  row ") == 5


def test_detect_format_names_each_format():
    cases = {
        "messages": GOOD_SFT,
        "text": {"text": "hello"},
        "prompt_completion": GOOD_PC,
        "preference": GOOD_PREF,
        "implicit_preference": {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
        "prompt_only": GOOD_PROMPT,
    }
    assert {name: detect_format(Dataset.from_list([row])) for name, row in cases.items()} == {n: n for n in cases}
    with pytest.raises(DatasetValidationError, match="found \\['question'\\]"):
        detect_format(Dataset.from_list([{"question": "x"}]))


def test_validation_of_thousands_of_rows_is_fast():
    dataset = Dataset.from_list(read_jsonl(bundled_path("sft_train.jsonl")) * 5)
    start = time.perf_counter()
    validate_sft_dataset(dataset, "sft x5")
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- token lengths


def test_check_lengths_names_rows_longer_than_max_length(word_tokenizer):
    rows = [{"messages": [user(" ".join(f"w{j}" for j in range(n))), assistant("answer")]} for n in (2, 30, 3)]
    dataset = Dataset.from_list(rows)
    lengths = [
        n_tokens(word_tokenizer, word_tokenizer.apply_chat_template(r["messages"], tokenize=False)) for r in rows
    ]
    assert check_lengths(dataset, word_tokenizer, max(lengths), "ok.jsonl") == max(lengths)
    with pytest.raises(
        DatasetValidationError, match=rf"long.jsonl: 1 invalid row .*\n  row 1: messages is {lengths[1]} tokens"
    ):
        check_lengths(dataset, word_tokenizer, lengths[1] - 1, "long.jsonl")
    assert check_lengths(dataset, word_tokenizer, lengths[1] - 1, "long.jsonl", allow_truncation=True) == lengths[1]


def test_check_lengths_requires_room_for_a_completion_even_with_truncation(word_tokenizer):
    long_prompt = [user(" ".join(f"w{j}" for j in range(40)))]
    rows = [GOOD_PREF, {**GOOD_PREF, "prompt": long_prompt}]
    prompt_len = n_tokens(
        word_tokenizer, word_tokenizer.apply_chat_template(long_prompt, tokenize=False, add_generation_prompt=True)
    )
    with pytest.raises(DatasetValidationError, match=rf"row 1: prompt is {prompt_len} tokens, leaving no room"):
        check_lengths(Dataset.from_list(rows), word_tokenizer, prompt_len, "pref.jsonl", allow_truncation=True)
    check_lengths(Dataset.from_list(rows), word_tokenizer, prompt_len + 1, "pref.jsonl", allow_truncation=True)


def test_check_lengths_counts_plain_prompt_completion_and_the_appended_eos(word_tokenizer):
    dataset = Dataset.from_list([{"prompt": "w1 w2", "completion": "w3"}])
    expected = n_tokens(word_tokenizer, "w1 w2") + n_tokens(word_tokenizer, "w3") + 1
    assert check_lengths(dataset, word_tokenizer, expected, "plain.jsonl") == expected
    with pytest.raises(DatasetValidationError, match=f"prompt\\+completion is {expected} tokens"):
        check_lengths(dataset, word_tokenizer, expected - 1, "plain.jsonl")


def test_conversational_lengths_need_a_chat_template(word_tokenizer):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(DatasetValidationError, match="chat template"):
        check_lengths(Dataset.from_list([GOOD_SFT]), tokenizer, 64, "x.jsonl")


@pytest.mark.slow
def test_bundled_data_fits_the_tiny_recipe_length_with_the_dbrx_tokenizer():
    from dbrx_tune.tokenizer import build_dbrx_tokenizer

    tokenizer = build_dbrx_tokenizer()
    for name in BUNDLED:
        assert check_lengths(load_splits(f"bundled://{name}")["train"], tokenizer, 128, name) <= 128
