"""Recipes parse into TRL/transformers argument dataclasses; bad recipes fail early with the file and key."""

from __future__ import annotations

import glob
import os

import pytest
from trl import DPOConfig, RewardConfig, SFTConfig

from dbrx_tune.recipe import RecipeError, parse_recipe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_classes_for(recipe_path: str) -> tuple[type, type | None]:
    """(training class, stage-specific class) of the stage script a shipped recipe is for, by its file name."""
    name = os.path.basename(recipe_path)
    if "_grpo" in name or "_rloo" in name:
        from trl import GRPOConfig, RLOOConfig

        from dbrx_tune.args import OnlineRewardArguments

        return (GRPOConfig if "_grpo" in name else RLOOConfig), OnlineRewardArguments
    if "_ppo" in name:
        from dbrx_tune.training.ppo import PPOConfig

        return PPOConfig, None
    if "_orpo" in name:
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig, None
    if "_dpo" in name:
        return DPOConfig, None
    if "_rm" in name:
        return RewardConfig, None
    return SFTConfig, None


SHIPPED_RECIPES = sorted(
    glob.glob(os.path.join(REPO_ROOT, "recipes", "*.yaml"))
    + glob.glob(os.path.join(REPO_ROOT, "recipes", "tiny", "*.yaml"))
)


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=os.path.basename)
def test_every_shipped_recipe_parses(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name DeepSpeed configs relative to the repository root
    recipe = parse_recipe([path, "--use_cpu", "true", "--bf16", "false"], *stage_classes_for(path))
    assert recipe.model.model_name_or_path
    assert recipe.data.dataset_name
    assert recipe.training.output_dir


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


BASE = "model_name_or_path: m\ndataset_name: d\noutput_dir: out\nuse_cpu: true\nbf16: false\n"


def test_overrides_take_precedence_and_are_typed(tmp_path):
    path = write(tmp_path, BASE + "learning_rate: 1.0e-4\n")
    recipe = parse_recipe(
        [
            path,
            "--learning_rate",
            "3e-5",
            "--num_train_epochs",
            "2",
            "--packing",
            "true",
            "--eval_strategy",
            "no",
            "--experts_implementation=eager",
        ],
        SFTConfig,
    )
    assert recipe.training.learning_rate == pytest.approx(3e-5)
    assert recipe.training.num_train_epochs == 2
    assert recipe.training.packing is True
    assert recipe.training.eval_strategy == "no"
    assert recipe.model.experts_implementation == "eager"
    assert recipe.values["learning_rate"] == "3e-5"


def test_unknown_key_names_key_file_and_closest_valid_keys(tmp_path):
    path = write(tmp_path, BASE + "lerning_rate: 1.0e-4\n")
    with pytest.raises(RecipeError) as err:
        parse_recipe([path], SFTConfig)
    assert path in str(err.value) and "'lerning_rate'" in str(err.value) and "learning_rate" in str(err.value)


def test_unknown_override_is_rejected_too(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'moe_los_weight'.*moe_loss_weight"):
        parse_recipe([write(tmp_path, BASE), "--moe_los_weight", "0.1"], SFTConfig)


@pytest.mark.parametrize(
    ("line", "closest"),
    [
        ("use_dora: true\n", None),
        ("load_in_8bit: true\n", "load_in_4bit"),
        ("use_rslora: false\n", None),
        ("lora_modules_to_save: [score]\n", None),
        ("lora_task_type: SEQ_CLS\n", None),
        ("dataset_streaming: true\n", None),
    ],
)
def test_keys_trl_brings_but_the_toolkit_ignores_are_refused(tmp_path, line, closest):
    """TRL's ModelConfig / ScriptArguments accept these; nothing here acts on them, so a recipe setting them would
    silently train something else (whatever the value: `false` is refused too, the key does nothing)."""
    key = line.split(":")[0]
    with pytest.raises(RecipeError, match=f"key '{key}' is not used by this toolkit") as err:
        parse_recipe([write(tmp_path, BASE + line)], SFTConfig)
    if closest:
        assert closest in str(err.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("learning_rate: fast\n", "key 'learning_rate' expects float"),
        ("packing: maybe\n", "key 'packing' expects bool"),
        ("experts_implementation: fused\n", "key 'experts_implementation' expects 'grouped' | 'eager'"),
        ("eval_strategy: no\n", "quote the value"),
        ("per_device_train_batch_size: 2.5\n", "key 'per_device_train_batch_size' expects int"),
        ("vibe_steps: often\n", "key 'vibe_steps' expects int"),
        ("vibe_steps: 0\n", "invalid VibeArguments: vibe_steps must be >= 1"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, line, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([write(tmp_path, BASE + line)], SFTConfig)


def test_vibe_keys_parse_for_every_stage_and_are_off_unless_set(tmp_path):
    from dbrx_tune.training.ppo import PPOConfig

    recipe = parse_recipe([write(tmp_path, BASE), "--vibe_prompts", "default", "--vibe_steps", "25"], SFTConfig)
    assert recipe.vibes.enabled and (recipe.vibes.vibe_prompts, recipe.vibes.vibe_steps) == ("default", 25)
    assert not parse_recipe([write(tmp_path, BASE)], DPOConfig).vibes.enabled
    ppo = parse_recipe(
        [
            write(tmp_path, BASE + "reward_function: rule:contains_answer\n"),
            "--vibe_prompts",
            "default",
            "--vibe_max_new_tokens",
            "8",
        ],
        PPOConfig,
    )
    assert ppo.vibes.vibe_max_new_tokens == 8


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "model_name_or_path: [unclosed\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        parse_recipe([path], SFTConfig)


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        parse_recipe([write(tmp_path, "- a\n- b\n")], SFTConfig)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        parse_recipe([str(tmp_path / "nope.yaml")], SFTConfig)
