"""Guarding the output directory: refuse before any work, never destroy what is already there.

transformers 5 dropped `overwrite_output_dir`, and its Trainer happily writes `checkpoint-N` over a directory
that holds someone else's files or an older run's checkpoints. A run of this toolkit drops a marker file in its
output directory; a directory is usable when it is new, empty, or marked (a previous run of ours, which
`resume_from_checkpoint` may continue). Anything else needs `overwrite_output_dir: true`, and even then nothing
is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

RUN_MARKER = "dbrx_tune_run.json"


class OutputDirError(ValueError):
    """The output directory cannot be used for this run; the message names it and says what to do."""


def check_output_dir(output_dir: str, *, overwrite: bool, resume: bool) -> None:
    """Raise `OutputDirError` unless `output_dir` can take this run's files. Creates nothing."""
    if not output_dir:
        raise OutputDirError("output_dir is required")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"output_dir {output_dir} exists and is not a directory")
    existing = os.path.isdir(output_dir)
    probe_dir = output_dir if existing else _nearest_existing_parent(output_dir)
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {output_dir} is not writable (checked {probe_dir})")
    if not existing or not os.listdir(output_dir) or overwrite:
        if existing and os.listdir(output_dir) and overwrite:
            logger.warning("overwrite_output_dir: writing into non-empty %s (nothing is deleted)", output_dir)
        return
    if not os.path.isfile(os.path.join(output_dir, RUN_MARKER)):
        entries = sorted(os.listdir(output_dir))
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirError(
            f"output_dir {output_dir} is not empty and was not written by a dbrx_tune run (holds: {shown}); "
            "choose another output_dir or set overwrite_output_dir: true"
        )
    if get_last_checkpoint(output_dir) and not resume:
        raise OutputDirError(
            f"output_dir {output_dir} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest "
            "to continue it, or set overwrite_output_dir: true to train from scratch beside them"
        )


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


def resolve_resume_checkpoint(output_dir: str, requested: str | None) -> str | None:
    """Turn `resume_from_checkpoint` ("latest" or a path) into a checkpoint path, or None to start fresh."""
    if requested in (None, ""):
        return None
    if requested == "latest":
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            logger.warning("resume_from_checkpoint=latest: no checkpoint in %s, starting from scratch", output_dir)
        return last
    if not os.path.isdir(requested):
        raise OutputDirError(f"resume_from_checkpoint: {requested} is not a checkpoint directory")
    return requested
