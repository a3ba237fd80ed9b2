"""Shared fixtures: a tiny random DBRX and the offline DBRX tokenizer, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def dbrx_tokenizer():
    from dbrx_tune.tokenizer import build_dbrx_tokenizer

    return build_dbrx_tokenizer()
