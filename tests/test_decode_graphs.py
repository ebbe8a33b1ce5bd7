"""The fast decode path: bucketed shapes, padding rows in a scratch slot, CUDA graphs on CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_model
from model.generate import generate
from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.engine.decode_graphs import (
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    context_buckets,
)
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams
from service.engine.request import Request


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert context_buckets(1024) == [64, 128, 256, 512, 1024]
    assert context_buckets(100) == [64, 100]
    assert context_buckets(40) == [40]
    assert context_buckets(128, smallest=16) == [16, 32, 64, 128]
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="larger than the largest bucket 8"):
        bucket_for(9, [1, 2, 4, 8])


def greedy_cases(seed: int) -> list[tuple[list[int], int]]:
    """Prompts and lengths whose contexts start below 64 keys and cross into the next bucket."""
    rng = random.Random(seed)
    lengths = [(3, 8), (20, 12), (40, 30), (55, 20), (1, 5), (60, 25), (10, 3)]
    return [([rng.randrange(50257) for _ in range(p)], n) for p, n in lengths]


def run_engine(model: GPT, tokenizer: Tokenizer, cases, shapes=None, **config):  # type: ignore[no-untyped-def]
    """Greedy outputs of `cases` through an engine; `shapes` collects the fast path's
    (rows, padded batch, context bucket) per decode step."""
    engine = LLMEngine(model, tokenizer, EngineConfig(**config))
    engine.warm_up()
    graphs = engine.runner.decode_graphs
    if graphs is not None and shapes is not None:
        fill = graphs._fill

        def spy(token_ids, slots, positions, batch):  # type: ignore[no-untyped-def]
            context = bucket_for(max(positions) + 1, graphs.context_lens)
            shapes.add((len(token_ids), batch, context))
            return fill(token_ids, slots, positions, batch)

        graphs._fill = spy  # type: ignore[method-assign]
    requests: list[Request] = [
        engine.add_request(prompt, SamplingParams(temperature=0.0), StopParams(n, ignore_eos=True))
        for prompt, n in cases
    ]
    while engine.has_work():
        engine.step()
    return engine, [r.output_token_ids for r in requests]


def test_padded_buckets_give_the_eager_greedy_tokens(tiny_model: GPT, tokenizer) -> None:  # type: ignore[no-untyped-def]
    cases = greedy_cases(5)
    # Batches of 4, then 3 (padded to 4), 2 and 1 as requests finish; contexts up to ~90 keys.
    _, eager = run_engine(tiny_model, tokenizer, cases, max_batch_size=4)
    shapes: set[tuple[int, int, int]] = set()
    engine, fast = run_engine(
        tiny_model, tokenizer, cases, shapes, max_batch_size=4, fast_decode=True
    )
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.is_active and graphs.num_graphs == 0  # CPU: no graphs
    assert graphs.context_lens == [64, 128] and graphs.batch_sizes == [1, 2, 4]
    assert {(3, 4), (4, 4), (1, 1)} <= {(rows, batch) for rows, batch, _ in shapes}
    assert {context for _, _, context in shapes} == {64, 128}
    assert fast == eager
    for (prompt, n), tokens in zip(cases, fast, strict=True):
        assert tokens == generate(tiny_model, prompt, n)


def test_padding_rows_write_only_the_scratch_slot(tiny_model: GPT) -> None:
    cache = KVCache(tiny_model.config, num_slots=5, max_seq_len=32)
    graphs = DecodeGraphs(tiny_model, cache, scratch_slot=4, max_batch_size=4, max_model_len=32)
    logits = graphs([11, 12, 13], [2, 0, 3], [5, 0, 7])  # 3 rows padded to 4
    # The same rows through the plain eager step on a fresh cache: the same logits.
    eager_cache = KVCache(tiny_model.config, num_slots=5, max_seq_len=32)
    layout = BatchLayout.build([2, 0, 3], [5, 0, 7], [1, 1, 1], 32)
    with torch.inference_mode():
        expected = tiny_model.forward_cached(torch.tensor([[11], [12], [13]]), eager_cache, layout)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    written = cache.k.abs().sum(dim=(0, 2, 4)) != 0  # (slot, position) holding a key
    expected = torch.zeros_like(written)
    for slot, position in ((2, 5), (0, 0), (3, 7), (4, 0)):  # slot 1 untouched
        expected[slot, position] = True
    assert torch.equal(written, expected)


def test_rows_must_own_distinct_real_slots(tiny_model: GPT) -> None:
    cache = KVCache(tiny_model.config, num_slots=3, max_seq_len=32)
    graphs = DecodeGraphs(tiny_model, cache, scratch_slot=2, max_batch_size=2, max_model_len=32)
    with pytest.raises(ValueError, match="distinct slots"):
        graphs([1, 2], [0, 0], [3, 4])
    with pytest.raises(ValueError, match="other than the scratch one"):
        graphs([1], [2], [3])


def test_failed_capture_falls_back_to_the_eager_step(tiny_model: GPT, tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(tiny_model, tokenizer, EngineConfig(max_batch_size=2, fast_decode=True))
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    graphs.use_cuda_graphs = True  # on a CPU, capturing raises: the path turns itself off
    engine.warm_up()
    assert not graphs.is_active and graphs.num_graphs == 0
    request = engine.add_request([1, 2, 3], SamplingParams(temperature=0.0), StopParams(6))
    while engine.has_work():
        engine.step()
    assert request.output_token_ids == generate(tiny_model, [1, 2, 3], 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_greedy_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_model().to("cuda")
    cases = greedy_cases(7)
    _, eager = run_engine(model, tokenizer, cases, max_batch_size=4)
    engine, fast = run_engine(model, tokenizer, cases, max_batch_size=4, fast_decode=True)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.is_active
    assert graphs.num_graphs == len(graphs.batch_sizes) * len(graphs.context_lens)
    assert fast == eager
