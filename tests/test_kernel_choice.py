"""The start-up kernel choice: measured, logged, forced by a flag, and plain without oneDNN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_model
from model import kernel_choice
from model.kernel_choice import (
    Int8Choice,
    KernelChoice,
    choose_int8_engines,
    choose_packed_min_rows,
)
from model.loading import save_checkpoint
from model.packed_linear import PackedLinear, packing_available
from service.api import loader
from service.api.loader import load_engine
from service.api.settings import Settings
from service.api.startup_summary import linear_kernels_of


def test_choice_comes_from_timings_of_the_models_layers() -> None:
    if not packing_available():
        pytest.skip("torch without oneDNN")
    choice = choose_packed_min_rows(make_model(), max_rows=8)
    assert sorted(choice.timings) == [1, 2, 3, 4, 6, 8]  # probed up to the batch size
    assert all(mkl > 0 and packed > 0 for mkl, packed in choice.timings.values())
    if choice.packed_min_rows is not None:  # packed wins from there on, at every count probed
        wins = [r for r, (m, p) in choice.timings.items() if r >= choice.packed_min_rows]
        assert all(choice.timings[r][1] < choice.timings[r][0] for r in wins)


def test_describe_the_choice() -> None:
    assert KernelChoice(4).describe() == "MKL below 4 rows, oneDNN packed from 4"
    assert KernelChoice(1).describe() == "oneDNN packed for every row count"
    assert (
        KernelChoice(None, reason="no oneDNN").describe() == "MKL for every row count (no oneDNN)"
    )


def reference_logits() -> torch.Tensor:
    model = make_model(seed=4)
    with torch.inference_mode():
        return model(torch.tensor([[5, 6, 7, 8]]))


def served_logits(settings: Settings) -> tuple[torch.Tensor, str]:
    engine, _ = load_engine(settings)
    model = engine.engine.model
    with torch.inference_mode():
        return model(torch.tensor([[5, 6, 7, 8]])), linear_kernels_of(model)


def test_fall_back_to_the_plain_path_without_onednn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(make_model(seed=4), tmp_path / "m")
    monkeypatch.setattr(kernel_choice, "packing_available", lambda: False)
    monkeypatch.setattr(loader, "packing_available", lambda: False)
    logits, kernels = served_logits(Settings(model=str(tmp_path / "m"), device="cpu"))
    assert kernels == "MKL"
    torch.testing.assert_close(logits, reference_logits(), rtol=0, atol=1e-5)


def test_flag_forces_the_row_count(tmp_path: Path) -> None:
    if not packing_available():
        pytest.skip("torch without oneDNN")
    save_checkpoint(make_model(seed=4), tmp_path / "m")
    settings = Settings(model=str(tmp_path / "m"), device="cpu", packed_min_rows=2)
    logits, kernels = served_logits(settings)
    engine, _ = load_engine(settings)
    packed = [m for m in engine.engine.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.min_rows == 2 for m in packed)
    assert all(m.weight.is_contiguous() for m in packed)  # forced: row-major, as always
    assert kernels == "MKL below 2 rows, oneDNN packed from 2"
    torch.testing.assert_close(logits, reference_logits(), rtol=0, atol=1e-4)


def test_int8_engines_are_ones_torch_has_and_timed_on_the_models_layers() -> None:
    before = torch.backends.quantized.engine
    choice = choose_int8_engines(make_model(), max_rows=8)
    assert torch.backends.quantized.engine == before  # probing leaves the engine as it was
    if choice is None:  # fewer than two engines in this build
        return
    supported = torch.backends.quantized.supported_engines
    assert choice.few_rows in supported and set(choice.timings) <= set(supported)
    assert all(sorted(t) == [1, 4, 8] for t in choice.timings.values())  # up to the batch size
    assert choice.timings[choice.few_rows][1] == min(t[1] for t in choice.timings.values())
    if choice.many_rows is not None:
        assert choice.min_rows is not None and choice.many_rows in supported
        wins = [r for r in (1, 4, 8) if r >= choice.min_rows]
        assert all(
            choice.timings[choice.many_rows][r] < choice.timings[choice.few_rows][r] for r in wins
        )


def test_int8_engines_follow_the_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    supported = torch.backends.quantized.supported_engines
    if not {"x86", "onednn"} <= set(supported):
        pytest.skip("needs torch's x86 and oneDNN int8 engines")
    # per engine in probing order, rows 1, 4, 8, 16, 32: x86 wins up to 8, oneDNN from 16
    fake = {"x86": [1.0, 2.0, 3.0, 9.0, 12.0], "onednn": [2.0, 3.0, 4.0, 5.0, 6.0]}
    queue = [
        t for e in ("x86", "fbgemm", "onednn") if e in supported for t in fake.get(e, [50.0] * 5)
    ]
    monkeypatch.setattr(kernel_choice, "_best_time", lambda run: queue.pop(0))
    choice = choose_int8_engines(make_model(), max_rows=32)
    assert choice is not None
    assert (choice.few_rows, choice.many_rows, choice.min_rows) == ("x86", "onednn", 16)
    assert choice.describe() == "int8 x86 below 16 rows, onednn from 16"
    assert Int8Choice("x86").describe() == "int8 x86"
