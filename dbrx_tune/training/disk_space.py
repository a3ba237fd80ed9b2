"""Refuse a run whose output file system cannot hold one checkpoint, and name the directory when a save fills it.

A full-fine-tuning checkpoint of DBRX is about 1.8 TB (weights plus Adam state); finding out at the first save,
hours in, wastes the run, and the `OSError: [Errno 28]` transformers then raises does not say which disk filled.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from dbrx_tune.args import ModelArguments
from dbrx_tune.build import resolve_dtype

ADAM_BYTES = 8  # two fp32 moments per trained parameter
MASTER_BYTES = 4  # the fp32 master copy DeepSpeed keeps of 16-bit weights
ADAPTER_BYTES = 4  # PEFT keeps LoRA adapters in fp32


class DiskSpaceError(OSError):
    """The output file system cannot take a checkpoint; the message names the directory and the numbers."""


def parameter_shapes(config: PretrainedConfig) -> list[torch.Size]:
    """The shapes of the model's parameters, built on the meta device (no memory, any size).

    The class is called directly: `from_config` under ZeRO-3 would partition the meta model and fail to init it.
    A config without a causal-LM class gives no shapes (no estimate, nothing refused)."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return []
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    return [param.shape for param in model.parameters()]


def checkpoint_bytes(shapes: list[torch.Size], model_args: ModelArguments, deepspeed: bool) -> int:
    """A lower-bound estimate of one checkpoint's size.

    Full fine-tuning: the weights in the recipe's dtype, two fp32 Adam moments and, under DeepSpeed with 16-bit
    weights, the fp32 master copy. LoRA: the adapter and its Adam moments only, counted as a rank-`lora_r` pair on
    every weight matrix (an upper bound of the adapter; it is small beside the disk either way)."""
    if model_args.use_peft:
        rank = model_args.lora_r
        adapter = sum(math.prod(shape[:-2]) * rank * (shape[-1] + shape[-2]) for shape in shapes if len(shape) >= 2)
        return adapter * (ADAPTER_BYTES + ADAM_BYTES)
    count = sum(math.prod(shape) for shape in shapes)
    dtype = resolve_dtype(model_args.dtype)
    weight_bytes = dtype.itemsize if isinstance(dtype, torch.dtype) else 2  # "auto": published DBRX is bf16
    master = MASTER_BYTES if deepspeed and weight_bytes < 4 else 0
    return count * (weight_bytes + ADAM_BYTES + master)


def check_free_space(output_dir: str, needed: int) -> None:
    """Raise `DiskSpaceError` unless the file system of `output_dir` (or its nearest existing parent) has `needed`."""
    probe = os.path.abspath(output_dir)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(
            f"output_dir {output_dir}: {_size(free)} free on its file system, one checkpoint needs about "
            f"{_size(needed)}: free space or choose another output_dir"
        )


def _size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


@contextmanager
def naming_a_full_disk(output_dir: str) -> Iterator[None]:
    """Turn `OSError: [Errno 28] No space left on device` inside the block into one line naming `output_dir`."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise SystemExit(
            f"error: no space left on device while writing to {output_dir} ({err.filename or 'a checkpoint'}): "
            "free space, then resume with --resume_from_checkpoint latest"
        ) from None
