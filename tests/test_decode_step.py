"""The lean decode step computes what forward_cached computes, for every weight path."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_model
from model.decode import DecodeStep
from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.packed_linear import pack_linears, packing_available
from model.quantize import quantize_int8


def prefilled(model: GPT, prompts: list[list[int]]) -> KVCache:
    """A cache whose slot i holds prompts[i]."""
    cache = KVCache(TINY, len(prompts), TINY.block_size)
    width = max(len(p) for p in prompts)
    layout = BatchLayout.build(
        list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts], TINY.block_size
    )
    idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        model.forward_cached(idx, cache, layout)
    return cache


@pytest.mark.parametrize("weights", ["plain", "packed", "int8"])
def test_decode_step_matches_forward_cached(weights: str) -> None:
    if weights == "packed" and not packing_available():
        pytest.skip("torch without oneDNN")
    model = make_model(seed=2)
    if weights == "packed":
        pack_linears(model)
    elif weights == "int8":
        model = quantize_int8(model)
    prompts = [[5, 6, 7], [8] * 20, [9, 10], list(range(40))]
    general, lean = prefilled(model, prompts), prefilled(model, prompts)
    step = DecodeStep(model)
    for rows in ([0], [2], [0, 1, 2, 3], [3, 1], [1, 2, 3]):  # one row alone, several, any order
        tokens = [11 + row for row in rows]
        positions = [len(prompts[row]) for row in rows]
        layout = BatchLayout.build(rows, positions, [1] * len(rows), TINY.block_size)
        with torch.inference_mode():
            expected = model.forward_cached(torch.tensor([[t] for t in tokens]), general, layout)
            got = step(lean, tokens, rows, positions)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        for row in rows:
            prompts[row] = prompts[row] + [11 + row]
    torch.testing.assert_close(lean.k, general.k, rtol=0, atol=1e-6)  # the same cache writes
