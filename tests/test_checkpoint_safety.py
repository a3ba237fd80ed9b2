"""Checkpoints are hashed when saved and checked before a resume unpickles them; disk space is checked up front
and a full disk during a save is named."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from dbrx_tune.args import ModelArguments
from dbrx_tune.build import load_model_config
from dbrx_tune.training import manifest
from dbrx_tune.training.disk_space import checkpoint_bytes, parameter_shapes
from dbrx_tune.training.manifest import MANIFEST, ManifestCallback, ManifestError, verify_manifest, write_manifest
from dbrx_tune.training.stage import train_and_save

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DBRX = os.path.join(REPO_ROOT, "recipes", "tiny", "dbrx-tiny")


def test_files_are_hashed_in_chunks(tmp_path, monkeypatch):
    data = os.urandom(10_000)
    (tmp_path / "shard.pt").write_bytes(data)
    monkeypatch.setattr(manifest, "CHUNK_BYTES", 1024)
    assert manifest.file_sha256(str(tmp_path / "shard.pt")) == hashlib.sha256(data).hexdigest()


def test_the_callback_writes_the_manifest_of_the_saved_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    (checkpoint / "global_step6").mkdir(parents=True)
    (checkpoint / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"zero shard")
    (checkpoint / "trainer_state.json").write_text("{}")
    state = TrainerState(global_step=6, is_world_process_zero=True)
    ManifestCallback().on_save(SimpleNamespace(output_dir=str(tmp_path)), state, TrainerControl())
    recorded = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert sorted(recorded) == ["global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state.json"]
    assert recorded["trainer_state.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    verify_manifest(str(checkpoint))


def test_a_manifest_that_is_not_json_is_named(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    write_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match=f"{MANIFEST} is not a readable manifest"):
        verify_manifest(str(tmp_path))


def test_checkpoint_estimate_counts_weights_adam_and_master_for_full_and_only_the_adapter_for_lora():
    config = load_model_config(ModelArguments(model_name_or_path=TINY_DBRX))
    shapes = parameter_shapes(config)
    count = sum(torch.Size(shape).numel() for shape in shapes)
    full = ModelArguments(model_name_or_path=TINY_DBRX, dtype="bfloat16")
    assert checkpoint_bytes(shapes, full, deepspeed=False) == count * (2 + 8)
    assert checkpoint_bytes(shapes, full, deepspeed=True) == count * (2 + 8 + 4)  # fp32 master of bf16 weights
    lora = ModelArguments(model_name_or_path=TINY_DBRX, dtype="bfloat16", use_peft=True, lora_r=4)
    assert 0 < checkpoint_bytes(shapes, lora, deepspeed=True) < checkpoint_bytes(shapes, full, deepspeed=True) / 4


def test_parameter_shapes_need_no_weights_also_under_zero3():
    """Stage scripts estimate after the DeepSpeed config is live, where `from_config` would ZeRO-3-partition."""
    from transformers.integrations import HfDeepSpeedConfig

    config = load_model_config(ModelArguments(model_name_or_path=TINY_DBRX))
    expected = parameter_shapes(config)
    live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    try:
        assert parameter_shapes(config) == expected and expected
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


class _TrainerFillingTheDisk:
    """Just enough of a Trainer for `train_and_save`; its save fails as a full disk makes it fail."""

    def __init__(self, output_dir: str):
        self.args = SimpleNamespace(output_dir=output_dir)
        self.processing_class = None

    def is_world_process_zero(self) -> bool:
        return True

    def add_callback(self, callback) -> None:
        pass

    def train(self, resume_from_checkpoint=None):
        path = os.path.join(self.args.output_dir, "checkpoint-5", "optimizer.pt")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_no_space_left_during_a_save_is_one_line_naming_the_directory(tmp_path):
    recipe = SimpleNamespace(
        path="recipe.yaml",
        vibes=SimpleNamespace(enabled=False),
        training=SimpleNamespace(resume_from_checkpoint=None),
        model=SimpleNamespace(random_init=False),
    )
    with pytest.raises(SystemExit) as stop:
        train_and_save(_TrainerFillingTheDisk(str(tmp_path)), recipe, "sft")
    message = str(stop.value)
    assert message.startswith(f"error: no space left on device while writing to {tmp_path}")
    assert "checkpoint-5/optimizer.pt" in message and "\n" not in message
