"""Values that would fail only after a 264 GB load, refused while the recipe is parsed: one line naming the key."""

from __future__ import annotations

import pytest
from trl import DPOConfig, SFTConfig

from dbrx_tune.recipe import RecipeError, parse_recipe

TINY_SFT = "recipes/tiny/dbrx_sft.yaml"
BASE = ["--use_cpu", "true", "--bf16", "false"]


@pytest.mark.parametrize(
    "override, message",
    [
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be at least 1, got 0"),
        (["--learning_rate", "-1e-5"], "learning_rate must not be negative"),
        (["--num_train_epochs", "0"], "no training steps"),
        (["--max_steps", "0"], "no training steps"),
        (["--max_length", "-5"], "max_length must be positive, got -5"),
        (["--use_peft", "true", "--lora_r", "0"], "lora_r must be at least 1, got 0"),
        (["--load_in_4bit", "true", "--use_peft", "false"], "load_in_4bit freezes the base weights"),
        (["--report_to", "not_a_tracker"], r"report_to \['not_a_tracker'\]: not installed here"),
    ],
)
def test_bad_values_are_refused_at_parse_time_naming_the_key(override, message):
    with pytest.raises(RecipeError, match=message) as err:
        parse_recipe([TINY_SFT, *BASE, *override], SFTConfig)
    assert str(err.value).startswith(TINY_SFT) and "\n" not in str(err.value)


def test_the_checks_hold_for_a_preference_stage_too():
    with pytest.raises(RecipeError, match="per_device_train_batch_size must be at least 1"):
        parse_recipe(["recipes/tiny/dbrx_dpo.yaml", *BASE, "--per_device_train_batch_size", "0"], DPOConfig)


def test_a_key_given_twice_is_named_with_both_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("model_name_or_path: a\nlearning_rate: 1.0e-5\noutput_dir: out\nlearning_rate: 2.0e-5\n")
    with pytest.raises(RecipeError, match=r"key 'learning_rate' appears twice \(lines 2 and 4\)"):
        parse_recipe([str(recipe)], SFTConfig)


def test_a_recipe_that_is_not_utf8_is_named(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model_name_or_path: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1.yaml: not UTF-8 text"):
        parse_recipe([str(recipe)], SFTConfig)


def test_an_empty_or_non_utf8_data_file_is_named_with_its_line(tmp_path):
    from dbrx_tune.data import load_splits

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the file is empty"):
        load_splits(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok", "completion": "ok"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(ValueError, match="latin.jsonl: line 2 is not UTF-8"):
        load_splits(str(latin))
