"""Check a local checkpoint's safetensors files before anything loads them: present, complete, readable.

At DBRX scale a load reads 264 GB; a truncated or corrupt shard otherwise fails deep inside it with safetensors' own
error, which names no file. Each shard's header is parsed (8-byte length + JSON) and the file must be as long as the
header says its last tensor ends: a cheap check that catches interrupted copies and downloads. A directory holding
only pickle `.bin` weights is refused: the toolkit loads safetensors only (a pickle can run code when unpickled).
Hub ids (not local directories) are left to `from_pretrained`, which asks for safetensors there too.
"""

from __future__ import annotations

import json
import os
import struct

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class WeightFileError(ValueError):
    """A checkpoint's weight files cannot be loaded; the message names the file and says why."""


def check_safetensors_file(path: str) -> None:
    """Refuse a safetensors file whose header does not parse or whose data is shorter than the header promises."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise WeightFileError(f"{path}: not a safetensors file or truncated (header of {header_len} bytes)")
            header = json.loads(handle.read(header_len))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightFileError(f"{path}: corrupt safetensors header ({err})") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise WeightFileError(
            f"{path}: truncated: {size} bytes, its header describes {expected} (an interrupted copy or download?)"
        )


def check_weight_files(model_path: str) -> None:
    """For a local checkpoint directory: safetensors weights exist (not only `.bin`) and every shard is complete."""
    if not os.path.isdir(model_path):
        return
    names = os.listdir(model_path)
    shards = sorted(name for name in names if name.endswith(".safetensors"))
    if not shards:
        pickles = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth")))
        if pickles:
            raise WeightFileError(
                f"{model_path}: holds only pickle weights ({', '.join(pickles[:3])}); the toolkit loads safetensors "
                "only. Convert them where you trust the files (transformers: from_pretrained, then "
                "save_pretrained(safe_serialization=True))"
            )
        return  # no weights at all: a config-only directory (random_init recipes) or the loader's own error
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            listed = set(json.load(handle).get("weight_map", {}).values())
        missing = sorted(listed - set(shards))
        if missing:
            raise WeightFileError(f"{model_path}: the shard index lists files that are missing: {', '.join(missing)}")
    for shard in shards:
        check_safetensors_file(os.path.join(model_path, shard))
