"""Two-process DeepSpeed runs on a CPU (gloo), as the distributed tests make them.

Each such test starts its own test file as the worker script under `torch.distributed.run` and reads back what the
ranks wrote. The launch, the worker's DeepSpeed start-up, the ZeRO-3 config a stage script fills from its recipe, and
the tiny DBRX the bare-engine workers train are the same everywhere, so they live here (imported as `gloo_ranks`:
pytest puts tests/ on sys.path, and a worker runs with tests/ as its script directory).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
VOCAB = 512  # the tiny DBRX of `tiny_config`: a small vocabulary keeps the 2-rank runs to seconds

# ZeRO-3 with every batch key left to the stage script's recipe, and no parameter kept whole: even the tiny model's
# small tensors are partitioned, as DBRX's are.
ZERO3_AUTO = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def start_gloo_deepspeed() -> None:
    """In a worker, before anything distributed: DeepSpeed's communicator over gloo.

    The shared-memory allreduce kernel is a JIT C++ build (minutes on 2 cores); plain gloo is enough here. With
    `use_cpu`, accelerate starts torch.distributed but not DeepSpeed's communicator, whose world size zero.Init reads
    for its batch-size check before starting it; on GPUs accelerate starts it itself.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def launch_two_ranks(
    script: str, args: list[str], *, port_offset: int, timeout: float, what: str
) -> subprocess.CompletedProcess:
    """Run `script args` on WORLD CPU processes and return the finished process; a hang or a failing rank fails the
    test with the ranks' output. `port_offset` keeps concurrently collected tests off each other's rendezvous port."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(29500 + os.getpid() % 1000 + port_offset),
        script,
        *args,
    ]
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-rank {what} hung (timeout): {str(err.stdout)[-3000:]} {str(err.stderr)[-3000:]}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def tiny_config():
    """A tiny DBRX config for bare DeepSpeed engines, with the router loss synced and the input jitter off."""
    from dbrx_tune.modeling.config import tiny_dbrx_config
    from dbrx_tune.modeling.moe_loss import sync_moe_config

    config = tiny_dbrx_config(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    # transformers' DbrxRouter jitters its input in place whenever moe_jitter_eps is not None (even 0.0), which
    # autograd forbids on ZeRO-3's hooked module inputs; None switches the jitter off.
    config.ffn_config.moe_jitter_eps = None
    return sync_moe_config(config)


def build_model():
    """The tiny DBRX with grouped experts, the same weights on every call (seeded)."""
    import torch
    from transformers import DbrxForCausalLM

    from dbrx_tune.modeling.experts import set_experts_implementation

    torch.manual_seed(0)
    return set_experts_implementation(DbrxForCausalLM(tiny_config()), "grouped")
