"""Shared fixtures: a tiny random DBRX and the offline DBRX tokenizer, built once per session."""

from __future__ import annotations

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spin-waits cost seconds."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def dbrx_tokenizer():
    from dbrx_tune.tokenizer import build_dbrx_tokenizer

    return build_dbrx_tokenizer()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped, with the reason, on a machine without one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
