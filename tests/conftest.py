"""Shared fixtures: tiny random-weight models for fast tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import kernel_choice
from model.config import GPTConfig
from model.gpt2 import GPT

# The compiled decode step (model.native_decode) is built once per test run, into a folder of its
# own (servers the tests start inherit it), not into the user's cache.
if "GPTSERVE_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="gptserve-test-cache-")
    os.environ["GPTSERVE_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

TINY = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, block_size=128)


def make_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    """A random-weight model in eval mode."""
    torch.manual_seed(seed)
    return GPT(config).init_weights(seed).eval()


def make_hf_model(config: GPTConfig = TINY, seed: int = 0) -> GPT2LMHeadModel:
    """A random `transformers` GPT-2, the reference: LayerNorms and biases random too, so a
    mixed-up weight mapping cannot hide behind HF's initial 1s and 0s."""
    torch.manual_seed(seed)
    hf_config = GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        bos_token_id=config.vocab_size - 1,
        eos_token_id=config.vocab_size - 1,
    )
    reference = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return reference


@pytest.fixture(autouse=True)
def _compiled_library_allowed() -> None:
    """`--native-decode off` turns the compiled library off for the process (the loader
    says so); every test starts with it allowed again, as a fresh server would."""
    from model.native_decode import set_enabled

    set_enabled(True)


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    return make_model()


@pytest.fixture
def timings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Replace model.kernel_choice's stopwatch: each timed probe takes the next of these (ms),
    and 10 ms once they run out."""
    queue: list[float] = []

    def fake_best_time(run: object) -> float:
        run()  # type: ignore[operator]
        return queue.pop(0) if queue else 10.0

    monkeypatch.setattr(kernel_choice, "_best_time", fake_best_time)
    yield queue
