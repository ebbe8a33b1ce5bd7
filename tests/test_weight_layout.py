"""Column-major linear weights: same values, same ties, same logits; chosen by measurement."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from model.decode import DecodeStep
from model.kernel_choice import choose_weight_layout, use_fastest_float32_kernels
from model.kv_cache import KVCache
from model.packed_linear import PackedLinear, packing_available
from model.weight_layout import is_column_major, linear_weights, set_column_major
from service.api.startup_summary import linear_kernels_of

IDX = torch.tensor([[5, 6, 7, 8, 9, 10]])


def test_column_major_keeps_values_ties_and_logits() -> None:
    model = make_model(seed=2)
    with torch.inference_mode():
        reference = model(IDX)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    moved = set_column_major(model)
    assert moved == len(linear_weights(model)) > 0
    assert all(is_column_major(weight) for weight in linear_weights(model))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert is_column_major(model.transformer.wte.weight)  # the embedding reads the same tensor
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with torch.inference_mode():
        torch.testing.assert_close(model(IDX), reference, rtol=0, atol=1e-5)
    assert set_column_major(model) == 0  # already laid out
    assert set_column_major(model, False) == moved
    assert all(weight.is_contiguous() for weight in linear_weights(model))


def test_the_lean_decode_step_on_column_major_weights() -> None:
    model = make_model(seed=3)
    with torch.inference_mode():
        reference = model(IDX)[0, -1]
    set_column_major(model)
    cache = KVCache(model.config, 2, 64)
    step = DecodeStep(model)
    with torch.inference_mode():
        for position, token in enumerate(IDX[0].tolist()):
            logits = step(cache, [token], [1], [position])[0]
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("row_ms", "column_ms", "expected"), [(2.0, 1.0, True), (1.0, 2.0, False)])
def test_the_faster_layout_is_kept(
    timings: list[float], row_ms: float, column_ms: float, expected: bool
) -> None:
    model = make_model()
    timings += [row_ms, column_ms]
    assert choose_weight_layout(model) == (expected, row_ms, column_ms)
    assert all(is_column_major(w) == expected for w in linear_weights(model))


@pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")
def test_column_major_with_packing_from_two_rows(timings: list[float]) -> None:
    model = make_model(seed=4)
    with torch.inference_mode():
        reference = model(IDX)
    # one row: row-major 2 ms, column-major 1 ms; then (MKL, packed) from 1 row up: packed wins
    # from 2 rows on
    timings += [2.0, 1.0, 1.0, 5.0, 9.0, 3.0, 9.0, 3.0]
    with torch.inference_mode():  # as a caller might be: the parameters stay plain tensors
        choice = use_fastest_float32_kernels(model, max_rows=3)
    assert choice.column_major and choice.packed_min_rows == 2
    assert not any(parameter.is_inference() for parameter in model.parameters())
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.min_rows == 2 and is_column_major(m.weight) for m in packed)
    # packed after the layout moved: no layer will pack again on its first step
    assert all(m._packed_from == m._weight_state() for m in packed)
    assert linear_kernels_of(model) == (
        "MKL on column-major weights below 2 rows, oneDNN packed from 2"
    )
    with torch.inference_mode():  # 6 rows: the packed kernel; 1 row: MKL, column-major
        torch.testing.assert_close(model(IDX), reference, rtol=0, atol=1e-4)
        torch.testing.assert_close(model(IDX[:, :1]), reference[:, :1], rtol=0, atol=1e-4)


@pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")
def test_column_major_is_undone_when_packing_never_wins(timings: list[float]) -> None:
    model = make_model()
    # column-major wins one row, but MKL beats packed at every count: MKL, row-major, everywhere
    timings += [2.0, 1.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0]
    choice = use_fastest_float32_kernels(model, max_rows=3)
    assert choice.packed_min_rows is None and not choice.column_major
    assert all(w.is_contiguous() for w in linear_weights(model))
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")
def test_column_major_is_undone_when_packing_takes_every_row(timings: list[float]) -> None:
    model = make_model()
    # column-major wins one row, but packed beats MKL from 1 row: MKL never runs, so the
    # embedding need not read a strided table
    timings += [2.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0]
    choice = use_fastest_float32_kernels(model, max_rows=3)
    assert choice.packed_min_rows == 1 and not choice.column_major
    assert all(w.is_contiguous() for w in linear_weights(model))


def test_other_dtypes_are_left_alone() -> None:
    model = make_model().to(torch.bfloat16)
    choice = use_fastest_float32_kernels(model, max_rows=3)
    assert choice.packed_min_rows is None and "float32" in choice.reason
    assert all(w.is_contiguous() for w in linear_weights(model))
