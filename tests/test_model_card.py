"""The model card every output directory gets: hub front matter that `huggingface_hub` parses, the stage's recipe,
data and final metrics, and how to load that kind of output; never over a README.md someone else wrote.

The end-to-end stage tests check the card of their real runs with `check_model_card` (tests/model_card_checks.py);
here each stage's card is built from a run directory laid out as `train_and_save` leaves it."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from model_card_checks import check_model_card

from dbrx_tune.training import trainers
from dbrx_tune.training.model_card import build_model_card, may_write_card, write_model_card
from dbrx_tune.training.output_dir import mark_output_dir

HUB_BASE = "databricks/dbrx-base"
HUB_DATA = "trl-lib/ultrafeedback_binarized"

# stage, model files at the top of its output, (final metrics, last training log), the loading text it must show
STAGES = [
    (
        "sft",
        ["config.json"],
        ({"train_loss": 1.25, "eval_loss": 1.5}, {"loss": 1.125, "step": 30}),
        "AutoModelForCausalLM",
    ),
    (
        "reward_model",
        ["config.json"],
        ({"train_loss": 0.5, "eval_accuracy": 0.875, "eval_margin": 2.5}, {"loss": 0.375, "accuracy": 0.75, "step": 9}),
        "trust_remote_code=True",
    ),
    (
        "dpo",
        ["config.json"],
        ({"train_loss": 0.625, "eval_rewards/margins": 3.25}, {"rewards/margins": 2.75, "loss": 0.5, "step": 12}),
        "AutoModelForCausalLM",
    ),
    (
        "orpo",
        ["adapter_config.json"],
        ({"train_loss": 0.75, "eval_rewards/accuracies": 0.625}, {"loss": 0.75, "step": 8}),
        "dbrx-merge --base",
    ),
    (
        "ppo",
        ["config.json"],
        ({"objective/scores": 0.4375, "objective/kl": 0.03125}, {"objective/scores": 0.4375, "step": 4}),
        "value_model/",
    ),
    (
        "grpo",
        ["adapter_config.json"],
        ({"train_loss": 0.0625}, {"reward": 0.8125, "kl": 0.01, "step": 6}),
        "load_expert_adapter",
    ),
    ("rloo", ["config.json"], ({"train_loss": 0.125}, {"reward": 0.3125, "step": 6}), "AutoModelForCausalLM"),
]


def fake_run(directory, stage: str, model_files: list[str], metrics: dict, last_log: dict, **recipe) -> str:
    """A run directory as `train_and_save` leaves it: marker, recipe.yaml, metrics, trainer state, model files."""
    directory = str(directory)
    mark_output_dir(directory, stage, "recipes/dbrx_x.yaml")
    values = {"model_name_or_path": HUB_BASE, "dataset_name": HUB_DATA, "learning_rate": 5.0e-7, **recipe}
    with open(os.path.join(directory, "recipe.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle)
    with open(os.path.join(directory, "train_results.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle)
    summary = {"train_runtime": 1.0, "step": last_log["step"]}
    with open(os.path.join(directory, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump({"log_history": [{"loss": 9.0, "step": 1}, last_log, summary]}, handle)
    for name in model_files:
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            handle.write("{}")
    return directory


@pytest.mark.parametrize("stage, model_files, logged, loader", STAGES, ids=[row[0] for row in STAGES])
def test_each_stage_card_has_hub_metadata_recipe_data_metrics_and_loading(tmp_path, stage, model_files, logged, loader):
    metrics, last_log = logged
    run = fake_run(
        tmp_path / stage, stage, model_files, metrics, last_log, use_peft="adapter_config.json" in model_files
    )
    write_model_card(build_model_card(run, dbrx=True), run)
    adapter = "adapter_config.json" in model_files
    library = "peft" if adapter else "transformers"
    card = check_model_card(run, stage, library=library, base_model=HUB_BASE, metrics={**last_log, **metrics})
    assert card.data.datasets == [HUB_DATA]
    assert card.data.license == "other" and card.data.license_name == "databricks-open-model-license"
    assert ("lora" in card.data.tags) == adapter
    assert "learning_rate: 5.0e-07" in card.text  # the recipe, as YAML
    assert f"`{HUB_DATA}`, split `train`" in card.text
    assert loader in card.text


def test_a_run_on_a_local_checkpoint_traces_its_base_and_licence_through_that_checkpoints_card(tmp_path):
    sft = fake_run(tmp_path / "sft", "sft", ["config.json"], {"train_loss": 1.0}, {"loss": 1.0, "step": 1})
    write_model_card(build_model_card(sft, dbrx=True), sft)
    dpo = fake_run(
        tmp_path / "dpo", "dpo", ["config.json"], {"train_loss": 0.5}, {"loss": 0.5, "step": 1}, model_name_or_path=sft
    )
    write_model_card(build_model_card(dpo, dbrx=True), dpo)
    card = check_model_card(dpo, "dpo", library="transformers", base_model=HUB_BASE)
    assert card.data.license_name == "databricks-open-model-license"
    assert f"`{sft}`, itself fine-tuned from [{HUB_BASE}]" in card.text


def test_a_local_base_without_a_card_and_a_local_dataset_stay_out_of_the_front_matter(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    run = fake_run(
        tmp_path / "run",
        "sft",
        ["config.json"],
        {"train_loss": 1.0},
        {"loss": 1.0, "step": 1},
        model_name_or_path=str(base),
        dataset_name=str(data),
    )
    write_model_card(build_model_card(run, dbrx=False), run)
    card = check_model_card(run, "sft", library="transformers", base_model=None, dbrx=False)
    assert card.data.datasets is None and card.data.license is None
    assert f"`{data}`, split `train`" in card.text


def test_the_merged_model_card_carries_the_adapter_run_and_loads_as_a_full_model(tmp_path):
    adapter = fake_run(
        tmp_path / "adapter", "sft", ["adapter_config.json"], {"train_loss": 0.25}, {"loss": 0.25, "step": 3}
    )
    write_model_card(build_model_card(adapter, dbrx=True), adapter)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    card = build_model_card(adapter, dbrx=True, merged_base=HUB_BASE, output_dir=str(merged))
    write_model_card(card, str(merged))
    card = check_model_card(str(merged), "sft", library="transformers", base_model=HUB_BASE, merged=True)
    assert "| `train_loss` | 0.25 |" in card.text and "AutoModelForCausalLM" in card.text
    assert "dbrx-merge --base" not in card.text  # already merged: the adapter's instructions do not apply


def test_a_readme_the_toolkit_did_not_write_is_never_replaced(tmp_path):
    assert may_write_card(str(tmp_path))  # nothing there yet
    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    assert not may_write_card(str(tmp_path))
    readme.write_text("---\ntags:\n- mine\n---\n# my model\n")
    assert not may_write_card(str(tmp_path))
    run = fake_run(tmp_path / "run", "sft", ["config.json"], {"train_loss": 1.0}, {"loss": 1.0, "step": 1})
    write_model_card(build_model_card(run, dbrx=True), run)
    assert may_write_card(run)  # ours: a resumed run rewrites it


@pytest.mark.parametrize(
    "trainer_class",
    [getattr(trainers, name) for name in sorted(dir(trainers)) if name.startswith("Dbrx") and name.endswith("Trainer")],
)
def test_stage_trainers_write_no_trl_model_card(trainer_class, tmp_path):
    # TRL's create_model_card (called at every intermediate save and by push_to_hub) would write README.md
    # into args.output_dir, naming no base for a local path and showing text generation for a reward model
    class Args:
        output_dir = str(tmp_path)

    class Stub(trainer_class):
        def __init__(self):
            self.args = Args()

        def is_world_process_zero(self):
            return True

    Stub().create_model_card(model_name="run")
    assert not os.path.exists(tmp_path / "README.md")
