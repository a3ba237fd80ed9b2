"""Guarding the output directory: refuse before any work, never destroy what is already there.

transformers 5 dropped `overwrite_output_dir`, and its Trainer happily writes `checkpoint-N` over a directory
that holds someone else's files or an older run's checkpoints, and its checkpoint rotation deletes the oldest
`checkpoint-N` it finds, whoever wrote it. A run of this toolkit drops a marker file in its output directory; a
directory is usable when it is new, empty, or marked (a previous run of ours, which `resume_from_checkpoint` may
continue). `overwrite_output_dir: true` lets a run write beside foreign files, but never into a directory holding
checkpoints or a saved model (rotation would delete them, the final save would replace them): nothing is deleted.

A checkpoint is complete once its sha256 manifest is in it (`dbrx_tune.training.manifest`, written after
transformers' `trainer_state.json`, itself written after the weights, optimizer and RNG state), so a save interrupted by
kill -9, Ctrl-C or a full disk leaves a checkpoint without it. Resuming takes the newest complete checkpoint, says
which partial ones it passed over (left in place), and checks its files against the manifest before anything
unpickles them; `trust_checkpoint: true` resumes from a checkpoint without a manifest (written by another tool).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from dbrx_tune.training.manifest import MANIFEST, ManifestError, has_manifest, verify_manifest

logger = logging.getLogger(__name__)

RUN_MARKER = "dbrx_tune_run.json"


class OutputDirError(ValueError):
    """The output directory cannot be used for this run; the message names it and says what to do."""


TRAINER_STATE = "trainer_state.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
RESUME_LATEST = ("latest", "true", "True")
"""Values of `resume_from_checkpoint` that mean the newest complete checkpoint ("true": the HF command-line habit)."""


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The `checkpoint-N` directories of `output_dir`, newest (largest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name.removeprefix("checkpoint-")
        if step != name and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(step), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def is_complete_checkpoint(path: str, *, trust: bool = False) -> bool:
    """Whether a save of `path` finished: its manifest is there (with `trust`, transformers' trainer state)."""
    return os.path.isfile(os.path.join(path, TRAINER_STATE)) and (trust or has_manifest(path))


def saved_model_files(output_dir: str) -> list[str]:
    """Model weight files saved at the top of `output_dir` (a finished run's final model)."""
    return [name for name in MODEL_FILES if os.path.exists(os.path.join(output_dir, name))]


def check_output_dir(output_dir: str, *, overwrite: bool, resume: bool) -> None:
    """Raise `OutputDirError` unless `output_dir` can take this run's files without losing any. Creates nothing."""
    if not output_dir:
        raise OutputDirError("output_dir is required")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"output_dir {output_dir} exists and is not a directory")
    existing = os.path.isdir(output_dir)
    probe_dir = output_dir if existing else _nearest_existing_parent(output_dir)
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {output_dir} is not writable (checked {probe_dir})")
    if not existing or not os.listdir(output_dir):
        return
    checkpoints = [os.path.basename(path) for path in checkpoint_dirs(output_dir)]
    model_files = saved_model_files(output_dir)
    ours = os.path.isfile(os.path.join(output_dir, RUN_MARKER))
    if ours and resume and checkpoints:
        return
    if checkpoints or model_files:
        held = ", ".join(checkpoints[:3] + model_files) + (", ..." if len(checkpoints) > 3 else "")
        whose = "an earlier dbrx_tune run" if ours else "files this toolkit did not write"
        how = "pass --resume_from_checkpoint latest to continue it, or " if ours and checkpoints else ""
        raise OutputDirError(
            f"output_dir {output_dir} holds {whose} ({held}); training into it would delete or replace them "
            f"(checkpoint rotation, the final save), overwrite_output_dir or not: {how}choose another output_dir"
        )
    if not ours and not overwrite:
        entries = sorted(os.listdir(output_dir))
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirError(
            f"output_dir {output_dir} is not empty and was not written by a dbrx_tune run (holds: {shown}); "
            "choose another output_dir or set overwrite_output_dir: true (files are written beside these, "
            "none deleted)"
        )
    if not ours:
        logger.warning("overwrite_output_dir: writing beside the files in %s (nothing is deleted)", output_dir)


def _nearest_existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def mark_output_dir(output_dir: str, stage: str, recipe_path: str) -> None:
    """Create `output_dir` and record that it belongs to a dbrx_tune run (atomically written)."""
    os.makedirs(output_dir, exist_ok=True)
    marker = os.path.join(output_dir, RUN_MARKER)
    if os.path.isfile(marker):
        return
    with tempfile.NamedTemporaryFile("w", dir=output_dir, delete=False, suffix=".tmp") as handle:
        json.dump({"stage": stage, "recipe": os.path.abspath(recipe_path)}, handle)
    os.replace(handle.name, marker)


def latest_complete_checkpoint(output_dir: str, *, trust: bool = False) -> str | None:
    """The newest checkpoint of `output_dir` that a save finished; partial newer ones are named in a warning."""
    for path in checkpoint_dirs(output_dir):
        if is_complete_checkpoint(path, trust=trust):
            return path
        missing = TRAINER_STATE if trust or not os.path.isfile(os.path.join(path, TRAINER_STATE)) else MANIFEST
        logger.warning("resume: %s has no %s (a save was interrupted): skipped, left in place", path, missing)
    return None


def resolve_resume_checkpoint(output_dir: str, requested: str | None, *, trust: bool = False) -> str | None:
    """Turn `resume_from_checkpoint` ("latest"/"true" or a path) into a complete checkpoint, or None to start fresh.

    Refuses a path that is not a complete checkpoint, a checkpoint whose files do not match its manifest (unless
    `trust`), and a fresh start over a finished run's saved model or over checkpoints without a manifest."""
    if requested in (None, "", "false", "False"):
        return None
    if requested in RESUME_LATEST:
        last = latest_complete_checkpoint(output_dir, trust=trust)
        if last is not None:
            _verify(last, trust)
            logger.info("resume_from_checkpoint=%s: resuming from %s", requested, last)
            return last
        unverified = [path for path in checkpoint_dirs(output_dir) if is_complete_checkpoint(path, trust=True)]
        if unverified:
            raise OutputDirError(
                f"resume_from_checkpoint={requested}: no checkpoint in {output_dir} has a {MANIFEST} "
                f"({os.path.basename(unverified[0])} was saved by another tool or an older dbrx_tune); set "
                "trust_checkpoint: true to resume from it anyway (its files are unpickled) or choose another output_dir"
            )
        model_files = saved_model_files(output_dir) if os.path.isdir(output_dir) else []
        if model_files:
            raise OutputDirError(
                f"resume_from_checkpoint={requested}: {output_dir} has no complete checkpoint but holds a finished "
                f"run's model ({', '.join(model_files)}); starting from scratch would replace it: choose another "
                "output_dir"
            )
        logger.warning(
            "resume_from_checkpoint=%s: no complete checkpoint in %s, starting from scratch", requested, output_dir
        )
        return None
    if not os.path.isdir(requested):
        raise OutputDirError(f"resume_from_checkpoint: {requested} is not a checkpoint directory")
    if not os.path.isfile(os.path.join(requested, TRAINER_STATE)):
        raise OutputDirError(
            f"resume_from_checkpoint: {requested} has no {TRAINER_STATE}: its save did not finish; pass an earlier "
            "checkpoint or --resume_from_checkpoint latest (the newest complete one)"
        )
    _verify(requested, trust)
    return requested


def _verify(checkpoint: str, trust: bool) -> None:
    if trust:
        logger.warning("trust_checkpoint: resuming from %s without checking its files", checkpoint)
        return
    try:
        verify_manifest(checkpoint)
    except ManifestError as err:
        raise OutputDirError(f"resume_from_checkpoint: {err}") from None
