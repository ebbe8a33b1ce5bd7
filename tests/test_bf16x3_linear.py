"""float32 linears as three bfloat16 products on AMX (model.bf16x3_linear): their precision,
row invariance, the start-up choice and its fall-backs. The kernels run only on CPUs with AMX;
the choice's fall-backs are tested everywhere."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_model
from model import bf16x3_linear, kernel_choice
from model.bf16x3_linear import Bf16x3Linear, Swap, bf16x3_unavailable, check_logits
from model.kernel_choice import KernelChoice, choose_bf16x3, use_fastest_float32_kernels
from model.loading import save_checkpoint
from model.native_decode import NativeUnavailable
from model.packed_linear import PackedLinear, packing_available
from model.weight_layout import is_column_major, linear_weights, set_column_major
from service.api.loader import load_engine
from service.api.settings import Settings
from service.api.startup_summary import has_packed_weights, linear_kernels_of


@pytest.fixture
def amx() -> None:
    reason = bf16x3_unavailable()
    if reason is not None:
        pytest.skip(reason)


def products_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What three bfloat16 products of 16 mantissa bits may lose: 2^-14 of sum |x||w|, far
    below one bfloat16 product's error (2^-8 of it), far above float32's (2^-23)."""
    return 2.0**-14 * (x.abs().double() @ weight.abs().double().T) + 1e-7


@pytest.mark.parametrize(
    ("out_features", "in_features", "rows"),
    [(2304, 768, 1), (2304, 768, 17), (768, 3072, 40), (100, 70, 33), (3, 5, 2), (50257, 64, 5)],
)
def test_products_are_float32_to_16_bits(
    amx: None, out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    layer = Bf16x3Linear.from_linear(linear, min_rows=1)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        got = layer(x).double()
        gelu = layer.forward_gelu(x).double()
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    bound = products_bound(x, linear.weight)
    assert ((got - exact).abs() <= bound).all()
    if in_features >= 64:  # not float32 kernels in disguise: 16 bits of products, not 24
        float32_error = (F.linear(x, linear.weight, linear.bias).double() - exact).abs().max()
        assert (got - exact).abs().max() > 4 * float32_error
    exact_gelu = F.gelu(exact, approximate="tanh")
    assert ((gelu - exact_gelu).abs() <= bound + 1e-6).all()  # the GELU's own float32 error


def test_a_row_has_the_same_bits_alone_and_anywhere_in_a_batch(amx: None) -> None:
    torch.manual_seed(1)
    layer = Bf16x3Linear.from_linear(nn.Linear(768, 2304), min_rows=1)
    rows = torch.randn(33, 768)
    with torch.inference_mode():
        alone = layer(rows[:1])[0]
        for count in (2, 16, 17, 32, 33):
            batch = rows[:count].clone()
            batch[count - 1] = rows[0]
            out = layer(batch)
            assert torch.equal(out[0], alone) and torch.equal(out[count - 1], alone)


def test_strided_rows_fewer_rows_and_training_take_the_right_path(amx: None) -> None:
    torch.manual_seed(2)
    linear = nn.Linear(64, 48)
    layer = Bf16x3Linear.from_linear(linear, min_rows=4)
    wide = torch.randn(6, 128)
    with torch.inference_mode():
        strided = wide[:, :64]  # rows 128 floats apart
        torch.testing.assert_close(layer(strided), layer(strided.contiguous()), rtol=0, atol=0)
        few = torch.randn(3, 64)
        assert torch.equal(layer(few), F.linear(few, linear.weight, linear.bias))
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).sum().backward()  # with gradients: torch's own layer
    assert x.grad is not None


def test_a_weight_changed_after_packing_is_packed_again(amx: None) -> None:
    torch.manual_seed(3)
    linear = nn.Linear(64, 32)
    layer = Bf16x3Linear.from_linear(linear, min_rows=1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        linear.weight.mul_(-2.0)
    with torch.inference_mode():
        got = layer(x)
    expected = F.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_a_swap_keeps_the_tied_head_and_goes_back(amx: None) -> None:
    model = make_model(seed=4)
    before = [type(m) for m in model.modules()]
    swap = Swap(model, min_rows=1)
    swap.put_in()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.lm_head, Bf16x3Linear)
    passed, difference = check_logits(model, 1)
    assert passed and 0 < difference < 1e-4
    swap.take_out()
    assert [type(m) for m in model.modules()] == before


def test_the_start_up_choice_takes_them_where_they_win(amx: None) -> None:
    if not packing_available():
        pytest.skip("torch without oneDNN")
    model = make_model(seed=4)
    idx = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        expected = model(idx)
    choice = use_fastest_float32_kernels(model, 8, "high")
    assert sorted(choice.bf16x3_timings) == [1, 2, 3, 4, 6, 8]
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if choice.bf16x3_min_rows is None:  # never faster here: the packed kernels as before
        assert not any(isinstance(m, Bf16x3Linear) for m in layers)
        return
    rows = choice.bf16x3_min_rows
    assert choice.bf16x3_timings[8] < min(choice.timings[8])  # faster than both at the most rows
    wins = {r: t for r, t in choice.bf16x3_timings.items() if r >= rows}
    assert all(t < choice.timings[r][0] for r, t in wins.items())  # and than MKL from `rows`
    assert all(isinstance(m, Bf16x3Linear) and m.min_rows == rows for m in layers)
    assert not any(isinstance(m, PackedLinear) for m in layers)  # no second packed copy
    assert "bf16x3 on AMX from" in choice.describe() or "every row count" in choice.describe()
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-4)


def test_the_choice_falls_back_where_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16x3_linear, "bf16x3_unavailable", lambda: "no AMX on this CPU")
    with pytest.raises(NativeUnavailable, match="no AMX"):
        Swap(make_model(), min_rows=1)
    model = make_model()
    choice = KernelChoice(4, timings={1: (1.0, 2.0), 4: (2.0, 1.0)})
    assert not choose_bf16x3(model, choice)
    assert choice.bf16x3_note == "no AMX on this CPU" and choice.bf16x3_min_rows is None
    assert not any(isinstance(m, Bf16x3Linear) for m in model.modules())
    if packing_available():  # the packed kernels as with "highest", where they win
        fallen_back = use_fastest_float32_kernels(model, 8, "high")
        assert fallen_back.bf16x3_min_rows is None and "no AMX" in fallen_back.bf16x3_note
        packed = any(isinstance(m, PackedLinear) for m in model.modules())
        assert packed == (fallen_back.packed_min_rows is not None)


def test_the_choice_refuses_them_when_the_logits_are_off(
    amx: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bf16x3_linear, "CHECK_ABSOLUTE", 0.0)  # any difference fails
    monkeypatch.setattr(bf16x3_linear, "CHECK_RELATIVE", 0.0)
    model = make_model(seed=4)
    before = [type(m) for m in model.modules()]
    slow = {r: (1e9, 1e9) for r in (1, 4, 8)}  # float32 kernels "lose" at every count
    choice = KernelChoice(None, timings=slow)
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        assert not choose_bf16x3(model, choice)
    assert "logits" in choice.bf16x3_note and "off float32" in caplog.text
    assert [type(m) for m in model.modules()] == before


# rows: (MKL, packed) ms; the packed kernel wins from 4 rows
FLOAT32_MS = {1: (1.0, 2.0), 2: (2.0, 3.0), 4: (4.0, 3.0), 8: (8.0, 5.0), 16: (16.0, 9.0)}


@pytest.mark.parametrize(
    ("amx_ms", "column_major", "min_rows", "still_column_major"),
    [
        # beats MKL from 4 rows (not at 2), both kernels at 16: from 4, the weights row-major
        ([5.0, 2.5, 3.5, 6.0, 7.0], True, 4, False),
        # beats MKL from 2 rows: MKL runs single rows only, column-major stays
        ([5.0, 1.5, 3.5, 6.0, 7.0], True, 2, True),
        ([5.0, 1.5, 3.5, 6.0, 7.0], False, 2, False),
        # slower than the packed kernel at 16 rows: not taken, whatever it does below
        ([0.5, 1.0, 2.0, 4.0, 9.5], True, None, True),
    ],
)
def test_the_choice_takes_them_from_where_they_keep_beating_mkl(
    amx: None,
    timings: list[float],
    amx_ms: list[float],
    column_major: bool,
    min_rows: int | None,
    still_column_major: bool,
) -> None:
    model = make_model(seed=4)
    set_column_major(model, column_major)
    choice = KernelChoice(4, timings=dict(FLOAT32_MS), column_major=column_major)
    timings += amx_ms
    assert choose_bf16x3(model, choice) == (min_rows is not None)
    assert choice.bf16x3_min_rows == min_rows
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(is_column_major(m.weight) == still_column_major for m in layers)
    assert choice.column_major == still_column_major
    if min_rows is None:
        assert not any(isinstance(m, Bf16x3Linear) for m in layers)
        assert "slower than float32 kernels at 16 rows" in choice.bf16x3_note
        return
    assert all(isinstance(m, Bf16x3Linear) and m.min_rows == min_rows for m in layers)
    mkl = "MKL on column-major weights" if still_column_major else "MKL"
    assert (
        choice.describe()
        == f"{mkl} below {min_rows} rows, float32 as bf16x3 on AMX from {min_rows}"
    )
    idx = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        expected = make_model(seed=4)(idx)
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-4)


def test_without_float32_timings_they_are_not_taken() -> None:
    model = make_model(seed=4)
    choice = KernelChoice(4)  # a forced or substituted choice: nothing to compare with
    assert not choose_bf16x3(model, choice)
    assert choice.bf16x3_note == "no float32 timings to compare them with"
    assert not any(isinstance(m, Bf16x3Linear) for m in model.modules())


@pytest.mark.parametrize("refused", [False, True])
def test_a_failing_check_leaves_the_model_as_it_was(
    amx: None, timings: list[float], monkeypatch: pytest.MonkeyPatch, refused: bool
) -> None:
    """An error in the check is raised after the model is restored; tiles refused to the
    process (NativeUnavailable) only mean the float32 kernels stay."""
    model = make_model(seed=4)
    set_column_major(model, True)
    before = [type(m) for m in model.modules()]

    def broken(model: nn.Module, min_rows: int) -> tuple[bool, float]:
        if refused:
            raise NativeUnavailable("the AMX tiles were refused to this process")
        raise RuntimeError("the probe failed")

    monkeypatch.setattr(kernel_choice, "check_logits", broken)
    timings += [5.0, 2.5, 3.5, 6.0, 7.0]
    choice = KernelChoice(4, timings=dict(FLOAT32_MS), column_major=True)
    if refused:
        assert not choose_bf16x3(model, choice)
        assert choice.bf16x3_note == "the AMX tiles were refused to this process"
    else:
        with pytest.raises(RuntimeError, match="the probe failed"):
            choose_bf16x3(model, choice)
    assert choice.bf16x3_min_rows is None
    assert [type(m) for m in model.modules()] == before
    assert all(is_column_major(w) for w in linear_weights(model))


def test_the_logit_check_leaves_the_row_count_it_was_given(amx: None) -> None:
    model = make_model(seed=4)
    Swap(model, min_rows=3).put_in()
    passed, _ = check_logits(model, 7)
    assert passed
    layers = [m for m in model.modules() if isinstance(m, Bf16x3Linear)]
    assert layers and all(m.min_rows == 7 for m in layers)


def test_the_start_up_line_counts_them_as_packed_weights(amx: None) -> None:
    model = make_model(seed=4)
    assert not has_packed_weights(model)
    Swap(model, min_rows=2).put_in()
    assert has_packed_weights(model)
    assert linear_kernels_of(model) == "MKL below 2 rows, float32 as bf16x3 on AMX from 2"


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_serve_takes_them_unless_told_highest(tmp_path: Path, precision: str) -> None:
    save_checkpoint(make_model(seed=4), tmp_path / "m")
    engine, _ = load_engine(
        Settings(model=str(tmp_path / "m"), device="cpu", float32_matmul_precision=precision)
    )
    model = engine.engine.model
    taken = any(isinstance(m, Bf16x3Linear) for m in model.modules())
    if precision == "highest" or bf16x3_unavailable() is not None:
        assert not taken and "bf16x3" not in linear_kernels_of(model)
    elif taken:  # where they were measured faster (they are, on the CPUs with AMX tried)
        assert "bf16x3 on AMX" in linear_kernels_of(model)
    idx = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        expected = make_model(seed=4)(idx)
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-4)
