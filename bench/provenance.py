"""What every benchmark's JSON records beside its numbers, and how it is written.

bench/RESULTS.md promises that a later run by someone else reproduces each committed result; the device, the
library versions, command line and date in every file are what makes that possible. The scripts import this module as a
sibling (`python bench/NAME.py` puts bench/ on sys.path).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invocation() -> str:
    """The command line that ran this benchmark, as typed from the repository root: `python bench/NAME.py ARGS`."""
    return " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT), *sys.argv[1:]])


LIBRARIES = ("torch", "transformers", "peft", "trl", "deepspeed", "accelerate")
"""Recorded in every result: the numbers depend on each (kernels, DBRX modeling, LoRA layers, ZeRO-3)."""

KERNEL_LIBRARIES = ("liger-kernel", "torchao", "cut-cross-entropy", "bitsandbytes", "triton")
"""Recorded when installed: a benchmark that uses one of them depends on its version too."""


def versions() -> dict[str, str]:
    """Installed versions of `LIBRARIES` ("not installed" where absent) and of whichever `KERNEL_LIBRARIES` are."""
    found = {}
    for name in LIBRARIES + KERNEL_LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in LIBRARIES:
                found[name] = "not installed"
    return found


def provenance(gpu: str, command: str | None = None) -> dict[str, str]:
    """`gpu`, the library versions (`versions()`; `torch` among them), `command` (default: this process's
    `invocation()`) and `date` for a result file."""
    return {"gpu": gpu, **versions(), "command": command or invocation(), "date": datetime.date.today().isoformat()}


def write_result(path: str, result: dict) -> None:
    """Write `result` as indented JSON at `path`, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
