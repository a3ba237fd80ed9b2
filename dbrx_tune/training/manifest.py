"""A sha256 manifest of every file of a `checkpoint-N`, written last at save time and checked before a resume.

Resuming unpickles the checkpoint's optimizer, scheduler, RNG and ZeRO shard files (`torch.load(weights_only=False)`
in transformers, accelerate and DeepSpeed), so a file changed after the save can run code on every rank. The
manifest also marks a save as finished: it is written after everything else, so a checkpoint without one was
interrupted (or written elsewhere; `trust_checkpoint: true` resumes from such a checkpoint unchecked).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from accelerate import PartialState
from transformers import TrainerCallback

MANIFEST = "dbrx_tune_manifest.json"
CHUNK_BYTES = 16 * 1024 * 1024


class ManifestError(ValueError):
    """A checkpoint's files do not match its manifest, or it has none; the message names the file."""


def file_sha256(path: str) -> str:
    """Hex sha256 of a file read in chunks (checkpoint shards run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(checkpoint: str) -> list[str]:
    """Every file under `checkpoint` but the manifest, as sorted '/'-separated relative paths."""
    found = []
    for root, _, names in os.walk(checkpoint):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), checkpoint).replace(os.sep, "/")
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def has_manifest(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, MANIFEST))


def write_manifest(checkpoint: str) -> None:
    """Hash every file of `checkpoint` and write the manifest atomically, after everything else is in place."""
    files = {
        name: {
            "size": os.path.getsize(os.path.join(checkpoint, name)),
            "sha256": file_sha256(os.path.join(checkpoint, name)),
        }
        for name in checkpoint_files(checkpoint)
    }
    with tempfile.NamedTemporaryFile("w", dir=checkpoint, delete=False, suffix=".tmp") as handle:
        json.dump({"format": 1, "files": files}, handle, indent=1)
    os.replace(handle.name, os.path.join(checkpoint, MANIFEST))


def verify_manifest(checkpoint: str) -> None:
    """Raise `ManifestError` naming the first file of `checkpoint` that is missing, added, resized or changed."""
    path = os.path.join(checkpoint, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestError(
            f"{checkpoint} has no {MANIFEST} (its save was interrupted, or another tool wrote it): resume from "
            "another checkpoint, or set trust_checkpoint: true if you trust its files (they are unpickled)"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path} is not a readable manifest ({err})") from None
    present = checkpoint_files(checkpoint)
    for name in present:
        if name not in recorded:
            raise ManifestError(f"{checkpoint}/{name} is not in {MANIFEST}: added after the save")
    for name, entry in recorded.items():
        file = os.path.join(checkpoint, name)
        if name not in present:
            raise ManifestError(f"{file} is listed in {MANIFEST} but missing")
        if os.path.getsize(file) != entry["size"] or file_sha256(file) != entry["sha256"]:
            raise ManifestError(f"{file} does not match its sha256 in {MANIFEST}: changed after the save")


class ManifestCallback(TrainerCallback):
    """Writes the manifest of each `checkpoint-N` the trainer saves, on the main process once every rank is done.

    transformers' Trainer and the toolkit's PPO trainer call `on_save` on every rank after the checkpoint's files
    (per-rank RNG and ZeRO shards included) are written; the barrier waits for the slowest rank."""

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            write_manifest(checkpoint)
