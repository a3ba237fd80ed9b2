"""The reward-model stage learns the bundled preferences and saves a reward model that loads on its own."""

from __future__ import annotations

import os

import pytest
import torch
from model_card_checks import check_model_card
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dbrx_tune.data import load_splits
from reward_models.train import main as train_reward_model

pytestmark = pytest.mark.slow  # every test here trains a stage end to end

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_rm.yaml")


def held_out_accuracy(model_dir: str) -> float:
    """Pairwise accuracy on preference_test.jsonl, scored independently of the trainer's metrics."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = load_splits("bundled://preference", test_split="test")["test"]
    wins = 0
    with torch.no_grad():
        for row in test:
            scores = []
            for reply in (row["chosen"], row["rejected"]):
                ids = tokenizer.apply_chat_template(row["prompt"] + reply, return_tensors="pt", return_dict=True)
                scores.append(model(**ids).logits[0, 0].item())
            wins += scores[0] > scores[1]
    return wins / len(test)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("rm") / "run")
    metrics = train_reward_model([RECIPE, "--output_dir", output_dir, "--report_to", "none", "--save_strategy", "no"])
    return output_dir, metrics


def test_reward_model_reaches_90_percent_on_held_out_pairs(trained_rm):
    output_dir, metrics = trained_rm
    assert metrics["eval_accuracy"] >= 0.9
    assert held_out_accuracy(output_dir) >= 0.9
    card = check_model_card(
        output_dir,
        "reward_model",
        library="transformers",
        base_model=None,
        metrics={"eval_accuracy": metrics["eval_accuracy"]},
    )
    assert "trust_remote_code=True" in card.text


def test_router_loss_is_part_of_reward_training(trained_rm):
    output_dir, _ = trained_rm
    import json

    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    assert all(entry["aux_loss"] > 0 for entry in history if "loss" in entry)


def test_lora_on_experts_trains_adapters_and_score_and_saves_merged_model(tmp_path):
    output_dir = str(tmp_path / "lora")
    train_reward_model(
        [
            RECIPE,
            "--output_dir",
            output_dir,
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--max_steps",
            "4",
            "--use_peft",
            "true",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
        ]
    )
    assert os.path.isfile(os.path.join(output_dir, "adapter", "adapter_model.safetensors"))
    merged = AutoModelForSequenceClassification.from_pretrained(output_dir)
    # the merged reward model is the output (PEFT's template card, written by the save, is replaced)
    assert "lora" in check_model_card(output_dir, "reward_model", library="transformers", base_model=None).data.tags
    assert merged.score.weight.shape == (1, merged.config.d_model)
