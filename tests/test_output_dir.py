"""The output directory guard refuses before any work and never deletes what is there."""

from __future__ import annotations

import os

import pytest

from dbrx_tune.training.output_dir import OutputDirError, check_output_dir, mark_output_dir, resolve_resume_checkpoint


def test_new_and_empty_directories_are_accepted(tmp_path):
    check_output_dir(str(tmp_path / "new" / "run"), overwrite=False, resume=False)
    check_output_dir(str(tmp_path), overwrite=False, resume=False)


def test_foreign_non_empty_directory_is_refused_and_left_intact(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not empty and was not written by a dbrx_tune run.*precious.txt"):
        check_output_dir(str(tmp_path), overwrite=False, resume=False)
    check_output_dir(str(tmp_path), overwrite=True, resume=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_earlier_run_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    mark_output_dir(str(tmp_path), "sft", "recipe.yaml")
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(OutputDirError, match="resume_from_checkpoint latest"):
        check_output_dir(str(tmp_path), overwrite=False, resume=False)
    check_output_dir(str(tmp_path), overwrite=False, resume=True)
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")


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
