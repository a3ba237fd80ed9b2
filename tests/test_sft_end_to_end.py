"""The tiny SFT recipe runs through `accelerate launch`, learns, saves a loadable checkpoint, and resumes (its vibe
checks too: the resumed run appends to vibes.jsonl)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from model_card_checks import check_model_card
from transformers import AutoModelForCausalLM, AutoTokenizer

from dbrx_tune.training.manifest import MANIFEST, verify_manifest
from dbrx_tune.training.output_dir import checkpoint_dirs

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or executes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx_sft.yaml")


def sft_command(output_dir: str, *overrides: str) -> tuple[list[str], dict[str, str]]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        os.path.join(REPO_ROOT, "sft", "train.py"),
        RECIPE,
        "--output_dir",
        output_dir,
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "5",
        "--save_steps",
        "15",
        "--report_to",
        "none",
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return command, env


def launch_sft(output_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    command, env = sft_command(output_dir, *overrides)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def train_losses(output_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("sft") / "run")
    result = launch_sft(output_dir, "--max_steps", "30")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir


def test_tiny_recipe_loss_falls(first_run):
    losses = train_losses(first_run)
    assert losses[-1][0] == 30
    first, last = losses[0][1], losses[-1][1]
    assert last < 0.7 * first, losses  # seen: 11.5 -> 7.1 over 30 steps


def test_output_is_plain_hf_checkpoint_that_generates(first_run):
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "recipe.yaml",
        "train_results.json",
    ):
        assert os.path.isfile(os.path.join(first_run, name)), name
    model = AutoModelForCausalLM.from_pretrained(first_run)
    tokenizer = AutoTokenizer.from_pretrained(first_run)
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    tokenizer.padding_side = "left"
    conversations = [
        [{"role": "user", "content": "What colour does a banana have?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat: cat dog"}],
    ]
    prompt = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
    )
    with torch.no_grad():
        # a padded batch and min_new_tokens force cached decoding steps, where a saved
        # `output_router_logits: true` made DBRX's forward fail on the attention mask
        generated = model.generate(**prompt, min_new_tokens=4, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] >= prompt["input_ids"].shape[1] + 4
    assert model.config.output_router_logits is False
    with open(os.path.join(first_run, "train_results.json")) as handle:
        final = json.load(handle)
    # random-init from the tiny config: a local path with no card, so no hub base model
    check_model_card(
        first_run, "sft", library="transformers", base_model=None, metrics={"train_loss": final["train_loss"]}
    )


def vibe_lines(output_dir: str) -> list[str]:
    with open(os.path.join(output_dir, "vibes.jsonl"), encoding="utf-8") as handle:
        return handle.readlines()


def test_resumed_run_continues_from_saved_step(first_run):
    before = vibe_lines(first_run)
    result = launch_sft(first_run, "--max_steps", "35", "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [step for step, _ in train_losses(first_run)]
    assert steps[-1] == 35
    # transformers reports the restored trainer state; a fresh start would say global step 0
    assert "Resuming training from checkpoint with epoch 0 and global step 30" in result.stdout + result.stderr
    # vibe checks: baseline and each save of the first run kept, no second baseline, the new last step appended
    after = vibe_lines(first_run)
    assert after[: len(before)] == before
    checked = [json.loads(line)["step"] for line in after]
    assert sorted(set(checked[: len(before)])) == [0, 15, 30] and set(checked[len(before) :]) == {35}


def test_rerun_into_used_output_dir_without_resume_is_refused(first_run):
    result = launch_sft(first_run, "--max_steps", "5")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "holds an earlier dbrx_tune run" in output and "--resume_from_checkpoint latest" in output


def kill_during_a_save(output_dir: str, *overrides: str) -> str:
    """Run training and SIGKILL it while a checkpoint is being written; return that checkpoint.

    A real race made deterministic: the moment a new `checkpoint-N` directory appears the run is frozen (SIGSTOP);
    if its manifest is not there yet the save is unfinished and the run is killed, else it is let go (SIGCONT) and
    the next save is tried. An earlier complete checkpoint is required first, for the resume to find."""
    command, env = sft_command(output_dir, *overrides)
    # accelerate launch trains in a child process: its own session, so the whole group is frozen and killed
    run = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    seen: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        while run.poll() is None and time.monotonic() < deadline:
            new = [path for path in checkpoint_dirs(output_dir) if path not in seen]
            if not new:
                time.sleep(0.001)
                continue
            os.killpg(run.pid, signal.SIGSTOP)
            newest = new[0]
            seen.update(new)
            if len(seen) > 1 and not os.path.exists(os.path.join(newest, MANIFEST)):
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
                return newest
            os.killpg(run.pid, signal.SIGCONT)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    raise AssertionError(f"the run ended (exit {run.returncode}) before a save could be interrupted: {sorted(seen)}")


def test_a_run_killed_during_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path):
    output_dir = str(tmp_path / "run")
    overrides = ("--max_steps", "12", "--save_steps", "3", "--save_total_limit", "10", "--vibe_prompts", "null")
    partial = kill_during_a_save(output_dir, *overrides)
    assert not os.path.exists(os.path.join(partial, MANIFEST))
    complete = [path for path in checkpoint_dirs(output_dir) if os.path.exists(os.path.join(path, MANIFEST))]
    for path in complete:
        verify_manifest(path)  # every finished save's files are as recorded
    newest_complete = complete[0]
    assert int(newest_complete.rsplit("-", 1)[1]) < int(partial.rsplit("-", 1)[1])

    result = launch_sft(output_dir, *overrides, "--resume_from_checkpoint", "latest")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"resuming from {newest_complete}" in output
    assert f"{partial} has no " in output  # the interrupted save is named and passed over
    step = int(newest_complete.rsplit("-", 1)[1])
    assert f"and global step {step}" in output  # transformers restored the trainer state
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        assert json.load(handle)["global_step"] == 12  # the resumed run finished
    for path in checkpoint_dirs(output_dir):  # the interrupted checkpoint was saved again, whole
        verify_manifest(path)
