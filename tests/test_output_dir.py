"""The output directory guard refuses before any work and never deletes what is there."""

from __future__ import annotations

import os
import shutil

import pytest

from dbrx_tune.training.manifest import MANIFEST, write_manifest
from dbrx_tune.training.output_dir import OutputDirError, check_output_dir, mark_output_dir, resolve_resume_checkpoint


def test_new_and_empty_directories_are_accepted(tmp_path):
    check_output_dir(str(tmp_path / "new" / "run"), overwrite=False, resume=False)
    check_output_dir(str(tmp_path), overwrite=False, resume=False)


def test_foreign_non_empty_directory_is_refused_and_left_intact(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not empty and was not written by a dbrx_tune run.*precious.txt"):
        check_output_dir(str(tmp_path), overwrite=False, resume=False)
    check_output_dir(str(tmp_path), overwrite=True, resume=False)  # written beside, never deleted
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _checkpoint(root, step: int, complete: bool = True, manifest: bool = True):
    path = root / f"checkpoint-{step}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "global_step" / "optim_states.pt").parent.mkdir()
    (path / "global_step" / "optim_states.pt").write_bytes(b"pickled optimizer")
    if complete:  # transformers' Trainer writes trainer_state.json last, the toolkit its manifest after it
        (path / "trainer_state.json").write_text("{}")
        if manifest:
            write_manifest(str(path))
    return path


def test_earlier_run_with_checkpoints_needs_resume_and_overwrite_cannot_destroy_them(tmp_path):
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    _checkpoint(tmp_path, 10)
    for overwrite in (False, True):  # rotation would delete checkpoint-10, a save would replace it in place
        with pytest.raises(OutputDirError, match="resume_from_checkpoint latest.*choose another output_dir"):
            check_output_dir(str(tmp_path), overwrite=overwrite, resume=False)
    check_output_dir(str(tmp_path), overwrite=False, resume=True)
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")
    assert resolve_resume_checkpoint(str(tmp_path), "true") == str(tmp_path / "checkpoint-10")  # the HF habit


def test_overwrite_never_touches_a_users_checkpoints_or_saved_model(tmp_path):
    """The data loss the issue reproduced: overwrite_output_dir let checkpoint rotation delete a user's checkpoint-1."""
    user_checkpoint = _checkpoint(tmp_path, 1)
    with pytest.raises(OutputDirError, match="files this toolkit did not write.*checkpoint-1"):
        check_output_dir(str(tmp_path), overwrite=True, resume=False)
    assert (user_checkpoint / "model.safetensors").read_bytes() == b"weights"
    shutil.rmtree(user_checkpoint)  # the user moves it away; a saved model alone is protected too
    (tmp_path / "model.safetensors").write_bytes(b"someone's model")
    with pytest.raises(OutputDirError, match="model.safetensors"):
        check_output_dir(str(tmp_path), overwrite=True, resume=False)
    assert (tmp_path / "model.safetensors").read_bytes() == b"someone's model"


def test_a_finished_runs_model_is_never_replaced_by_a_second_run_or_a_fresh_resume(tmp_path):
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    (tmp_path / "model.safetensors").write_bytes(b"final")  # save_strategy: no, so no checkpoints
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="an earlier dbrx_tune run.*model.safetensors"):
            check_output_dir(str(tmp_path), overwrite=overwrite, resume=False)
    with pytest.raises(OutputDirError, match="finished run's model"):
        resolve_resume_checkpoint(str(tmp_path), "latest")


def test_resume_takes_the_newest_complete_checkpoint_past_a_partial_one(tmp_path, caplog):
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8)
    partial = _checkpoint(tmp_path, 12, complete=False)  # killed during its save
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-8")
    assert "checkpoint-12 has no trainer_state.json" in caplog.text
    assert partial.exists()  # left in place for the user to inspect
    with pytest.raises(OutputDirError, match="checkpoint-12 has no trainer_state.json"):
        resolve_resume_checkpoint(str(tmp_path), str(partial))


def test_resume_passes_over_a_checkpoint_killed_before_its_manifest(tmp_path, caplog):
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    _checkpoint(tmp_path, 4)
    unfinished = _checkpoint(tmp_path, 8, manifest=False)  # trainer_state.json written, killed before the manifest
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-4")
    assert f"checkpoint-8 has no {MANIFEST}" in caplog.text
    with pytest.raises(OutputDirError, match=f"checkpoint-8 has no {MANIFEST}.*trust_checkpoint: true"):
        resolve_resume_checkpoint(str(tmp_path), str(unfinished))


@pytest.mark.parametrize("requested", ["latest", "path"])
def test_a_file_changed_after_the_save_is_named_and_refused(tmp_path, requested):
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    checkpoint = _checkpoint(tmp_path, 4)
    target = str(checkpoint) if requested == "path" else requested
    (checkpoint / "global_step" / "optim_states.pt").write_bytes(b"pickled payload!")  # same size, other bytes
    with pytest.raises(OutputDirError, match="global_step/optim_states.pt does not match its sha256"):
        resolve_resume_checkpoint(str(tmp_path), target)
    assert resolve_resume_checkpoint(str(tmp_path), target, trust=True) == str(checkpoint)


def test_a_file_added_or_removed_after_the_save_is_named_and_refused(tmp_path):
    checkpoint = _checkpoint(tmp_path, 4)
    (checkpoint / "rng_state_7.pth").write_bytes(b"pickled payload")
    with pytest.raises(OutputDirError, match="rng_state_7.pth is not in dbrx_tune_manifest.json"):
        resolve_resume_checkpoint(str(tmp_path), str(checkpoint))
    (checkpoint / "rng_state_7.pth").unlink()
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(OutputDirError, match="model.safetensors is listed in dbrx_tune_manifest.json but missing"):
        resolve_resume_checkpoint(str(tmp_path), str(checkpoint))


def test_checkpoints_without_manifest_need_trust_checkpoint(tmp_path):
    """Another tool's (or an older dbrx_tune's) checkpoints: refused, not silently restarted over."""
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    _checkpoint(tmp_path, 4, manifest=False)
    with pytest.raises(OutputDirError, match="no checkpoint .* has a dbrx_tune_manifest.json.*trust_checkpoint: true"):
        resolve_resume_checkpoint(str(tmp_path), "latest")
    assert resolve_resume_checkpoint(str(tmp_path), "latest", trust=True) == str(tmp_path / "checkpoint-4")


def test_latest_without_checkpoint_starts_fresh_and_bad_path_is_named(tmp_path):
    assert resolve_resume_checkpoint(str(tmp_path), "latest") is None
    with pytest.raises(OutputDirError, match="missing-checkpoint"):
        resolve_resume_checkpoint(str(tmp_path), str(tmp_path / "missing-checkpoint"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            check_output_dir(str(locked / "run"), overwrite=False, resume=False)
    finally:
        locked.chmod(0o700)


def test_file_in_place_of_directory_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        check_output_dir(str(target), overwrite=False, resume=False)
