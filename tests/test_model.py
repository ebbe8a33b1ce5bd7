"""The architecture against `transformers`' GPT-2, and the KV-cache batching."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import make_hf_model
from model.config import ConfigError, GPTConfig
from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.loading import load_model

TOLERANCE = 1e-4


def make_reference(config: GPTConfig, tmp_path, seed: int = 0) -> tuple[GPT2LMHeadModel, GPT]:
    """A random HF GPT-2 and ours loaded from its saved folder."""
    reference = make_hf_model(config, seed)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path).model
    return reference, ours


CONFIGS = [
    GPTConfig(n_layer=1, n_head=1, n_embd=16, vocab_size=50257, block_size=32),
    GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, block_size=64),
    GPTConfig(n_layer=3, n_head=5, n_embd=80, vocab_size=1000, block_size=48),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}H{c.n_head}C{c.n_embd}")
def test_match_transformers_logits_full_and_cached(config: GPTConfig, tmp_path) -> None:
    reference, ours = make_reference(config, tmp_path)
    torch.manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    with torch.no_grad():
        expected = reference(idx).logits  # (B, T, V)
        full = ours(idx)
        assert (full - expected).abs().max().item() <= TOLERANCE

        # Prefill half of each sequence, then decode the rest one token at a time.
        cache = KVCache(config, num_slots=2)
        half = config.block_size // 2
        layout = BatchLayout.build([0, 1], [0, 0], [half, half], config.block_size)
        prefill = ours.forward_cached(idx[:, :half], cache, layout, all_logits=True)
        assert (prefill - expected[:, :half]).abs().max().item() <= TOLERANCE
        for pos in range(half, config.block_size):
            layout = BatchLayout.build([0, 1], [pos, pos], [1, 1], config.block_size)
            step = ours.forward_cached(idx[:, pos : pos + 1], cache, layout)
            assert (step - expected[:, pos]).abs().max().item() <= TOLERANCE


def test_match_transformers_logits_gpt2_size(tmp_path) -> None:
    config = GPTConfig.from_preset("gpt2")
    reference, ours = make_reference(config, tmp_path)
    idx = torch.randint(0, config.vocab_size, (1, 48))
    with torch.no_grad():
        expected = reference(idx).logits
        assert (ours(idx) - expected).abs().max().item() <= TOLERANCE
        cache = KVCache(config, num_slots=1, max_seq_len=64)
        layout = BatchLayout.build([0], [0], [40], 64)
        last = ours.forward_cached(idx[:, :40], cache, layout)
        assert (last[0] - expected[0, 39]).abs().max().item() <= TOLERANCE
        for pos in range(40, 48):
            layout = BatchLayout.build([0], [pos], [1], 64)
            step = ours.forward_cached(idx[:, pos : pos + 1], cache, layout)
            assert (step[0] - expected[0, pos]).abs().max().item() <= TOLERANCE


def run_alone(model: GPT, tokens: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, without a cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


@pytest.mark.parametrize("slots", [[3, 0, 5, 1], [1, 2, 3, 4]], ids=["scattered", "consecutive"])
def test_batch_rows_of_different_lengths_match_each_row_alone(tiny_model: GPT, slots) -> None:
    config = tiny_model.config
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 17, 1, 30]
    seqs = [torch.randint(0, 50257, (n + 6,), generator=generator).tolist() for n in lengths]
    cache = KVCache(config, num_slots=6, max_seq_len=64)
    width = max(lengths)
    idx = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        idx[row, :n] = torch.tensor(seq[:n])
    with torch.no_grad():
        layout = BatchLayout.build(slots, [0] * 4, lengths, 64)
        prefill = tiny_model.forward_cached(idx, cache, layout)
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            torch.testing.assert_close(prefill[row], run_alone(tiny_model, seq[:n])[-1])
        # Decode steps where the rows sit at different positions.
        for step in range(6):
            positions = [n + step for n in lengths]
            idx = torch.tensor([[seq[p]] for seq, p in zip(seqs, positions, strict=True)])
            layout = BatchLayout.build(slots, positions, [1] * 4, 64)
            logits = tiny_model.forward_cached(idx, cache, layout)
            for row, (seq, p) in enumerate(zip(seqs, positions, strict=True)):
                torch.testing.assert_close(logits[row], run_alone(tiny_model, seq[: p + 1])[-1])


def test_prefill_mixed_with_continuing_rows(tiny_model: GPT) -> None:
    """A chunked prompt continuing at its own position next to a fresh prompt."""
    config = tiny_model.config
    seq_a = list(range(100, 140))
    seq_b = list(range(500, 512))
    cache = KVCache(config, num_slots=2, max_seq_len=64)
    with torch.no_grad():
        layout = BatchLayout.build([0], [0], [25], 64)
        tiny_model.forward_cached(torch.tensor([seq_a[:25]]), cache, layout)
        idx = torch.zeros(2, 15, dtype=torch.long)
        idx[0] = torch.tensor(seq_a[25:40])
        idx[1, :12] = torch.tensor(seq_b)
        layout = BatchLayout.build([0, 1], [25, 0], [15, 12], 64)
        logits = tiny_model.forward_cached(idx, cache, layout)
    torch.testing.assert_close(logits[0], run_alone(tiny_model, seq_a)[-1])
    torch.testing.assert_close(logits[1], run_alone(tiny_model, seq_b)[-1])


def test_reject_invalid_config() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ConfigError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ConfigError, match="layer_norm_epsilon"):
        GPTConfig(layer_norm_epsilon=0.0)
    with pytest.raises(ConfigError, match="unknown model preset"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ConfigError, match="unknown config keys: n_ctx"):
        GPTConfig.from_dict({"n_ctx": 5})


def test_presets_have_published_sizes() -> None:
    sizes = {
        name: (c.n_layer, c.n_head, c.n_embd)
        for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
        for c in [GPTConfig.from_preset(name)]
    }
    assert sizes == {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    # 124M parameters for the small model, as published.
    assert GPTConfig.from_preset("gpt2").num_parameters == sum(
        p.numel() for p in GPT(GPTConfig(n_layer=12)).parameters()
    )


def test_reject_batch_layout_that_overflows_cache() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        BatchLayout.build([0], [60], [5], 64)
    with pytest.raises(ValueError, match="only once"):
        BatchLayout.build([1, 1], [0, 0], [1, 1], 64)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(GPTConfig(block_size=32), num_slots=1, max_seq_len=64)


def test_head_is_tied_to_token_embedding(tiny_model: GPT) -> None:
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight
