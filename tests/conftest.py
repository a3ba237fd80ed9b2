"""Shared fixtures: a tiny random DBRX and the offline DBRX tokenizer, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

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
