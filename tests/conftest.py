"""Shared fixtures: tiny random-weight models for fast tests."""

from __future__ import annotations

import pytest
import torch

from model.config import GPTConfig
from model.gpt2 import GPT

TINY = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, block_size=128)


def make_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    """A random-weight model in eval mode."""
    torch.manual_seed(seed)
    return GPT(config).init_weights(seed).eval()


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    return make_model()
