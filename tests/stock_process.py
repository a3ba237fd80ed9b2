"""Run a script in a fresh Python that cannot import dbrx_tune: what a user with only transformers and PEFT sees."""

from __future__ import annotations

import os
import subprocess
import sys

# The editable install would otherwise make the package importable.
BLOCK_DBRX_TUNE = """
import sys
class BlockDbrxTune:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dbrx_tune":
            raise ImportError("dbrx_tune is blocked in this process")
sys.meta_path.insert(0, BlockDbrxTune())
"""


def run_stock(script: str) -> subprocess.CompletedProcess:
    """Run `script` (which may end by asserting `dbrx_tune` never got into `sys.modules`) from `/`."""
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_DBRX_TUNE + script], capture_output=True, text=True, cwd="/", env=env
    )
