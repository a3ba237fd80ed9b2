"""Bad input to a stage script stops it with one line naming the file, key or row, and writes nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from sft.train import main as train_sft

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_sft.yaml")


def run_expecting_exit(tmp_path, *overrides: str) -> str:
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train_sft([RECIPE, "--output_dir", str(output_dir), "--report_to", "none", *overrides])
    assert not output_dir.exists(), "a refused run must not create its output directory"
    return str(stop.value)


def test_missing_model_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    message = run_expecting_exit(tmp_path, "--model_name_or_path", str(tmp_path / "no-such-model"))
    assert "no-such-model" in message


def test_dataset_row_with_wrong_role_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]})
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    message = run_expecting_exit(tmp_path, "--dataset_name", str(bad), "--dataset_test_split", "none")
    assert "bad.jsonl" in message and "row 3" in message and "robot" in message


def test_sample_longer_than_max_length_is_named_when_truncation_is_off(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    message = run_expecting_exit(tmp_path, "--max_length", "8")
    assert "bundled://sft [train]" in message and "row 0" in message and "max_length=8" in message


def test_lora_on_a_random_init_model_under_zero3_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    zero3 = os.path.join(REPO_ROOT, "recipes", "deepspeed", "zero3.json")
    message = run_expecting_exit(tmp_path, "--use_peft", "true", "--deepspeed", zero3)
    assert "random_init with use_peft under ZeRO-3" in message and "dbrx_sft.yaml" in message


def test_assistant_only_loss_on_text_data_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr("sft.train.load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    text = tmp_path / "plain.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain text number {i}"}) + "\n" for i in range(4)))
    message = run_expecting_exit(tmp_path, "--dataset_name", str(text), "--dataset_test_split", "none")
    assert "plain.jsonl [train]" in message and "assistant_only_loss: true" in message and "text data" in message


def test_output_file_system_too_small_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    real = shutil.disk_usage
    monkeypatch.setattr(
        "dbrx_tune.training.disk_space.shutil.disk_usage", lambda path: real(path)._replace(free=1_000_000)
    )
    message = run_expecting_exit(tmp_path)
    assert f"output_dir {tmp_path / 'out'}: 1.0 MB free on its file system, one checkpoint needs about" in message
