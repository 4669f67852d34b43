"""Shared fixtures for the engine tests: tiny random LLaDA models and the independent reference implementation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cache_core.runtime import set_threads

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402

# One intra-op thread, as the engine's default on a small machine (cache_core.runtime): tiny-model forwards on a
# shared CPU box spin-wait with more. Subprocesses started by tests inherit it through BLOCKREUSE_THREADS.
os.environ.setdefault("BLOCKREUSE_THREADS", "1")
set_threads(1)


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(seed, n_kv_heads=None, head_gain=2.0, **config overrides) -> eval-mode LLaDAModel."""
    return helpers.tiny_model


@pytest.fixture
def reference_logits():
    return helpers.reference_logits
