"""Shared fixtures for the engine tests: tiny random LLaDA models and the independent reference implementation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402

# One intra-op thread: on a small shared CPU box OpenMP spin-waiting makes tiny-model forwards ~100x slower.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(seed, n_kv_heads=None, head_gain=2.0, **config overrides) -> eval-mode LLaDAModel."""
    return helpers.tiny_model


@pytest.fixture
def reference_logits():
    return helpers.reference_logits
