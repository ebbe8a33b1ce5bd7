"""The lean decode step computes what forward_cached computes, for every weight path."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_model
from model.config import GPTConfig
from model.decode import DecodeStep, SharedPrefix
from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.native_decode import KVStore
from model.packed_linear import pack_linears, packing_available
from model.quantize import quantize_int8
from service.engine.shared_prefix import find_shared_prefixes


def prefilled(model: GPT, prompts: list[list[int]]) -> KVCache:
    """A cache whose slot i holds prompts[i]."""
    config = model.config
    cache = KVCache(config, len(prompts), config.block_size)
    width = max(len(p) for p in prompts)
    layout = BatchLayout.build(
        list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts], config.block_size
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


# heads of 32: the compiled attention's shared-prefix kernel takes them (TINY's 16 go to torch)
HEADS_OF_32 = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, block_size=128)


@pytest.mark.parametrize(
    ("weights", "attention"),
    [("plain", "torch"), ("packed", "torch"), ("plain", "compiled"), ("packed", "compiled")],
)
def test_shared_prefix_attention_matches_plain_attention(
    weights: str, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows reading a common prefix from one slot give the logits of rows reading their own,
    in torch's attention and in the compiled one (model.native_decode.KVStore.attend)."""
    if weights == "packed" and not packing_available():
        pytest.skip("torch without oneDNN")
    model = make_model(HEADS_OF_32 if attention == "compiled" else TINY, seed=3)
    if weights == "packed":
        pack_linears(model)
    header = list(range(100, 140))
    prompts = [
        header + [1, 2],
        [7] * 9,  # in no group
        header + [3, 4, 5, 6],
        header[:30] + [9],  # shares 30 tokens: a group of its own with row 4
        header[:30] + [8, 8],
        header + [1, 2],  # the same prompt as row 0
    ]
    plain, shared = prefilled(model, prompts), prefilled(model, prompts)
    step = DecodeStep(model)
    if attention == "compiled":
        if KVStore.for_step(shared, [0, 1], [0, 0]) is None:
            pytest.skip("the compiled library is unavailable here")
        step.compiled_attention = True
    grouped_calls: list[int] = []  # KVStore.attend calls, by their shared-prefix groups
    attend = KVStore.attend

    def counted(self: KVStore, qkv: torch.Tensor, layer: int) -> torch.Tensor:
        grouped_calls.append(len(self._groups))
        return attend(self, qkv, layer)

    monkeypatch.setattr(KVStore, "attend", counted)
    reference = DecodeStep(model)  # torch's attention, each row over its own slot
    reference.compiled_attention = False
    groups = [SharedPrefix((0, 2, 5), slot=2, length=40), SharedPrefix((3, 4), slot=4, length=30)]
    for _ in range(3):  # the prefix stays, each row's own part grows
        rows = [5, 0, 1, 2, 4, 3]  # slots in any order
        tokens = [11 + row for row in rows]
        positions = [len(prompts[row]) for row in rows]
        # the groups name batch indices: map the row numbers above to where they sit
        batch = [
            SharedPrefix(tuple(sorted(rows.index(r) for r in g.rows)), g.slot, g.length)
            for g in groups
        ]
        with torch.inference_mode():
            expected = reference(plain, tokens, rows, positions)
            got = step(shared, tokens, rows, positions, batch)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        for row in rows:
            prompts[row] = prompts[row] + [11 + row]
    torch.testing.assert_close(shared.k, plain.k, rtol=0, atol=1e-6)
    # the compiled variant attended through the library, both groups each time; torch's never
    assert grouped_calls == ([2] * 3 * model.config.n_layer if attention == "compiled" else [])


def test_find_shared_prefixes_groups_rows_with_long_common_prompts() -> None:
    header = list(range(1000, 1300))
    prompts = [
        header + [1],
        [5] * 400,
        header + [2, 3],
        header[:200] + [9],
        [5] * 400,
        header + [4],
    ]
    slots = [10, 11, 12, 13, 14, 15]
    positions = [len(p) for p in prompts]
    groups = find_shared_prefixes(prompts, slots, positions, min_saved_tokens=300)
    by_rows = {g.rows: g for g in groups}
    # rows 0, 2, 5 share 300 tokens; row 3 shares only 200 with them, which would shorten the
    # run, so it stays out of their group or the group takes the shorter prefix.
    assert set(by_rows) in ({(0, 2, 5), (1, 4)}, {(0, 2, 3, 5), (1, 4)})
    assert by_rows[(1, 4)].length == 400 and by_rows[(1, 4)].slot in (11, 14)
    group = next(g for rows, g in by_rows.items() if 0 in rows)
    assert group.length == (300 if 3 not in group.rows else 200)
    assert group.slot in {slots[row] for row in group.rows}
    # a prefix never reaches past a row's position, and small savings are not grouped
    capped = find_shared_prefixes([[1] * 500, [1] * 500], [0, 1], [450, 500], 128, 100)
    assert capped == [SharedPrefix((0, 1), capped[0].slot, 450)]
    assert find_shared_prefixes([[1] * 500, [1] * 500], [0, 1], [500, 500], 128, 1000) == []
    assert find_shared_prefixes([[1] * 100, [1] * 100], [0, 1], [100, 100], 128, 1) == []
