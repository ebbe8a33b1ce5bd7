"""The compiled decode step: the torch step's logits and cache writes, its choice at start-up,
and the torch step wherever it cannot be built or does not apply."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import make_model
from model import native_decode, native_prebuild
from model.config import GPTConfig
from model.decode import DecodeStep
from model.gpt2 import GPT
from model.kernel_choice import choose_native_decode
from model.kv_cache import BatchLayout, KVCache
from model.loading import save_checkpoint
from model.native_decode import (
    PORTABLE_TARGETS,
    KVStore,
    NativeDecode,
    NativeRoute,
    NativeUnavailable,
    attach_route,
    build_library,
    build_portable,
    compiled_gelu,
    find_prebuilt,
    prebuilt_path,
    route_of,
)
from model.packed_linear import pack_linears, packing_available
from model.quantize import quantize_int8
from model.sampling_params import SamplingParams
from model.weight_layout import set_column_major
from service.api.loader import load_engine
from service.api.settings import Settings
from service.api.startup_summary import decode_step_of
from service.engine.params import StopParams

# Odd sizes on purpose: 36 features split unevenly over the threads and into steps of eight,
# 101 outputs of the head, 3 heads of 12.
ODD = GPTConfig(n_layer=2, n_head=3, n_embd=36, vocab_size=101, block_size=64)


def native_or_skip(model: GPT) -> NativeDecode:
    try:
        return NativeDecode(model)
    except NativeUnavailable as exc:  # no C compiler on this machine
        pytest.skip(f"the compiled decode step is unavailable: {exc}")


def odd_model(seed: int = 0, layout: str = "row-major") -> GPT:
    model = make_model(ODD, seed)
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0, so a mix-up shows, and
        for name, param in model.named_parameters():  # activations of order 1 (GELU's curve)
            if "ln_" in name or name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif param.dim() == 2:
                param.normal_(0.0, 0.2)
    if layout == "column-major":
        set_column_major(model, True)
    return model


def prefilled(model: GPT, prompts: list[list[int]], slots: int | None = None) -> KVCache:
    """A cache whose slot i holds prompts[i], filled by the model's general forward."""
    config = model.config
    cache = KVCache(config, slots or len(prompts), config.block_size)
    width = max(len(p) for p in prompts)
    layout = BatchLayout.build(
        list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts], config.block_size
    )
    with torch.inference_mode():
        model.forward_cached(
            torch.tensor([p + [0] * (width - len(p)) for p in prompts]), cache, layout
        )
    return cache


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("threads", [1, 2])
def test_logits_and_cache_writes_match_the_torch_step(layout: str, threads: int) -> None:
    model = odd_model(seed=1, layout=layout)
    native = native_or_skip(model)
    reference = DecodeStep(model)
    assert reference.native is None  # no route attached: the torch step
    prompts = [[(7 * i + j) % 101 for j in range(3 + 2 * i)] for i in range(17)]
    ours, theirs = prefilled(model, prompts), prefilled(model, prompts)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # one row, a few in any order, and the most the step takes (16 of 17 slots)
        for rows in ([0], [4, 2, 9], list(range(1, 17))):
            tokens = [(3 * row + 1) % 101 for row in rows]
            positions = [len(prompts[row]) for row in rows]
            with torch.inference_mode():
                expected = reference(theirs, tokens, rows, positions)
                got = native(ours, tokens, rows, positions)
            assert got.shape == (len(rows), ODD.vocab_size)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
            for row, token in zip(rows, tokens, strict=True):
                prompts[row].append(token)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(ours.k, theirs.k, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.v, theirs.v, rtol=0, atol=1e-5)


def test_token_by_token_gives_the_full_forward_logits() -> None:
    """Against the model's plain forward (no cache): every position's logits."""
    model = make_model(seed=3)  # gpt2's vocabulary, 64 wide
    native = native_or_skip(model)
    tokens = [50256, 464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]
    cache = KVCache(model.config, 2, model.config.block_size)
    with torch.inference_mode():
        expected = model(torch.tensor([tokens]))[0]
        got = torch.cat([native(cache, [t], [1], [i]) for i, t in enumerate(tokens)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_rows_of_one_slot_attend_causally_as_a_speculative_check() -> None:
    model = odd_model(seed=2, layout="column-major")
    native = native_or_skip(model)
    reference = DecodeStep(model)
    prompt = [1, 2, 3, 4, 5]
    ours, theirs = prefilled(model, [prompt, [9]]), prefilled(model, [prompt, [9]])
    guesses = [6, 7, 8, 9]
    with torch.inference_mode():
        expected = reference.several(theirs, guesses, 0, len(prompt))
        got = native(ours, guesses, [0] * 4, list(range(len(prompt), len(prompt) + 4)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.k, theirs.k, rtol=0, atol=1e-5)


def test_decode_step_takes_the_route_up_to_its_rows_and_torch_beyond() -> None:
    model = odd_model(seed=4)
    native = native_or_skip(model)
    calls: list[int] = []

    class Counting(NativeDecode):
        def __call__(self, cache, token_ids, slots, positions):  # type: ignore[no-untyped-def]
            calls.append(len(token_ids))
            return super().__call__(cache, token_ids, slots, positions)

    counting = Counting(model)
    attach_route(model, NativeRoute(counting, max_rows=2))
    step = DecodeStep(model)
    assert step.native is not None and step.native.step is counting
    cache = prefilled(model, [[1, 2], [3, 4], [5, 6]])
    plain = prefilled(model, [[1, 2], [3, 4], [5, 6]])
    with torch.inference_mode():
        one = step(cache, [7], [0], [2])
        two = step(cache, [8, 9], [1, 2], [2, 2])
        three = step(cache, [10, 11, 12], [0, 1, 2], [3, 3, 3])
        torch_step = DecodeStep(make_model(ODD, 0))  # another model: only to show no route
        assert torch_step.native is None
    assert calls == [1, 2]  # the three-row step went to torch
    reference = DecodeStep(model)
    reference.native = None
    with torch.inference_mode():
        expected = [
            reference(plain, [7], [0], [2]),
            reference(plain, [8, 9], [1, 2], [2, 2]),
            reference(plain, [10, 11, 12], [0, 1, 2], [3, 3, 3]),
        ]
    for got, want in zip((one, two, three), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert native.max_rows == 16


def test_a_float16_cache_goes_to_torch() -> None:
    model = odd_model(seed=5)
    native_or_skip(model)
    attach_route(model, NativeRoute(NativeDecode(model), max_rows=16))
    step = DecodeStep(model)
    cache = KVCache(ODD, 1, ODD.block_size, dtype=torch.float16)
    plain_cache = KVCache(ODD, 1, ODD.block_size, dtype=torch.float16)
    assert step.native is not None and not step.native.step.supports(cache)
    plain = DecodeStep(model)
    plain.native = None
    with torch.inference_mode():
        logits = step(cache, [3], [0], [0])
        expected = plain(plain_cache, [3], [0], [0])  # the torch step, in the cache's dtype
    assert torch.equal(logits, expected) and torch.equal(cache.k, plain_cache.k)


def test_bad_calls_are_refused_before_the_c_code_runs() -> None:
    model = odd_model(seed=6)
    native = native_or_skip(model)
    cache = KVCache(ODD, 2, 8)
    with torch.inference_mode():
        for tokens, slots, positions, message in (
            ([1] * 17, list(range(17)), [0] * 17, "1 to 16 rows"),
            ([], [], [], "1 to 16 rows"),
            ([1, 2], [0], [0], "same length"),
            ([101], [0], [0], "out of range"),
            ([1], [2], [0], "out of range"),
            ([1], [0], [8], "outside the cache"),
            ([1], [0], [-1], "outside the cache"),
        ):
            with pytest.raises(ValueError, match=message):
                native(cache, tokens, slots, positions)
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            native(KVCache(ODD, 1, 8, dtype=torch.float16), [1], [0], [0])


def test_models_it_does_not_cover_are_refused() -> None:
    native_or_skip(odd_model())
    with pytest.raises(NativeUnavailable, match="float32"):
        NativeDecode(odd_model().to(torch.bfloat16))
    wrapped = odd_model()
    wrapped.transformer.h[0].mlp.c_fc = torch.nn.Sequential(wrapped.transformer.h[0].mlp.c_fc)
    with pytest.raises(NativeUnavailable, match="not a plain or int8 linear layer"):
        NativeDecode(wrapped)


def test_a_changed_layout_detaches_the_route(caplog: pytest.LogCaptureFixture) -> None:
    model = odd_model(seed=7)
    native_or_skip(model)
    attach_route(model, NativeRoute(NativeDecode(model), max_rows=4))
    assert route_of(model) is not None
    set_column_major(model, True)  # the weights move: the step would read the old ones
    with caplog.at_level(logging.WARNING):
        assert route_of(model) is None
        assert DecodeStep(model).native is None
    assert "weights changed" in caplog.text


def test_the_library_is_built_once_and_then_found(tmp_path: Path) -> None:
    try:
        first = build_library(folder=tmp_path)
    except NativeUnavailable as exc:
        pytest.skip(str(exc))
    built = first.stat().st_ino
    assert build_library(folder=tmp_path) == first
    assert first.stat().st_ino == built  # not compiled again (a build replaces the file)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_a_new_build_removes_builds_unused_for_a_week(tmp_path: Path) -> None:
    try:
        build_library(folder=tmp_path / "probe")
    except NativeUnavailable as exc:
        pytest.skip(str(exc))
    stale, recent = tmp_path / "decode_step-0000000000000000.so", tmp_path / "decode_step-1.so"
    for path, days in ((stale, 8), (recent, 6)):
        path.write_bytes(b"an older build")
        old = time.time() - days * 24 * 3600
        os.utime(path, (old, old))
    built = build_library(folder=tmp_path)
    assert built.is_file() and recent.is_file() and not stale.exists()
    os.utime(built, (0, 0))
    assert build_library(folder=tmp_path) == built  # found, not built again: marked as used
    assert built.stat().st_mtime > time.time() - 60


def test_a_source_that_does_not_compile_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        build_library(folder=tmp_path / "ok")
    except NativeUnavailable as exc:
        pytest.skip(str(exc))
    broken = tmp_path / "broken.c"
    broken.write_text("int gptserve_native_abi(void) { return 1 }\n")
    monkeypatch.setattr(native_decode, "SOURCES", (broken,))
    with pytest.raises(NativeUnavailable, match="compiling the decode step failed"):
        build_library(folder=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.so"))


def test_without_a_compiler_the_reason_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        build_library()


@pytest.fixture
def fresh_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The package's prebuilt folder moved to a temporary one, and the library loaded afresh
    by the test (and again after it, as it was)."""
    monkeypatch.setattr(native_decode, "PREBUILT", tmp_path / "prebuilt")
    monkeypatch.setattr(native_decode, "_origin", native_decode.library_origin())
    native_decode._load_cached.cache_clear()
    yield tmp_path / "prebuilt"
    native_decode._load_cached.cache_clear()


def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")


def test_without_a_compiler_a_prebuilt_portable_build_runs(
    fresh_load: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = set(native_decode._cpu_flags().split())
    runnable = [t for t, needs in PORTABLE_TARGETS.items() if flags.issuperset(needs)]
    if not runnable:
        pytest.skip("this CPU runs none of the portable levels")
    target = runnable[0]
    try:
        built = build_portable(target)
    except NativeUnavailable as exc:
        pytest.skip(str(exc))
    assert built.parent == fresh_load
    no_compiler(monkeypatch)
    assert native_decode.library_path() == (built, f"prebuilt for {target}")
    model = odd_model(seed=9)
    native = NativeDecode(model)
    assert native_decode.library_origin() == f"prebuilt for {target}"
    reference = DecodeStep(model)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    ours, theirs = prefilled(model, prompts), prefilled(model, prompts)
    with torch.inference_mode():
        expected = reference(theirs, [10, 11, 12], [0, 1, 2], [3, 2, 4])
        got = native(ours, [10, 11, 12], [0, 1, 2], [3, 2, 4])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    described = NativeRoute(native, 4).describe()
    assert described == f"compiled prebuilt for {target} up to 4 rows, torch beyond"


def test_prebuilt_builds_a_cpu_cannot_run_or_of_another_source_are_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v4, v3 = (prebuilt_path(target, tmp_path) for target in ("x86-64-v4", "x86-64-v3"))
    for path in (v4, v3):
        path.write_bytes(b"not loaded: only found")

    def cpu(*flags: str) -> None:
        monkeypatch.setattr(native_decode, "_cpu_flags", lambda: " ".join(flags))

    cpu(*PORTABLE_TARGETS["x86-64-v4-vnni"], "sse4_2")
    assert find_prebuilt(tmp_path) == ("x86-64-v4", v4)  # no VNNI build there: the next best
    vnni = prebuilt_path("x86-64-v4-vnni", tmp_path)
    vnni.write_bytes(b"not loaded: only found")
    assert find_prebuilt(tmp_path) == ("x86-64-v4-vnni", vnni)
    cpu(*PORTABLE_TARGETS["x86-64-v4"], "sse4_2")
    assert find_prebuilt(tmp_path) == ("x86-64-v4", v4)
    cpu(*PORTABLE_TARGETS["x86-64-v3"], "avx512f")  # AVX-512 without the rest of level 4
    assert find_prebuilt(tmp_path) == ("x86-64-v3", v3)
    cpu("sse2", "sse4_2", "avx")
    assert find_prebuilt(tmp_path) is None
    v3.unlink()
    cpu(*PORTABLE_TARGETS["x86-64-v3"])
    assert find_prebuilt(tmp_path) is None
    cpu(*PORTABLE_TARGETS["x86-64-v4"])
    other = tmp_path / "other.c"
    other.write_text("/* another version of the source */\n")
    monkeypatch.setattr(native_decode, "SOURCES", (other,))
    assert find_prebuilt(tmp_path) is None


def test_without_a_compiler_or_a_prebuilt_build_the_reason_is_given(
    fresh_load: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_compiler(monkeypatch)
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        native_decode.library_path()
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        NativeDecode(odd_model())


def test_the_prebuild_command_builds_each_level_or_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert native_prebuild.main(["--folder", str(tmp_path)]) == 1
        return
    try:
        native_decode._compiler()
    except NativeUnavailable as exc:
        pytest.skip(str(exc))
    assert native_prebuild.main(["--folder", str(tmp_path), "--target", "x86-64-v3"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [prebuilt_path("x86-64-v3", tmp_path).name]
    assert "x86-64-v3: " in capsys.readouterr().out
    no_compiler(monkeypatch)
    assert native_prebuild.main(["--folder", str(tmp_path / "none")]) == 1
    assert "no C compiler" in capsys.readouterr().err


def test_the_prebuild_command_skips_a_level_its_compiler_cannot_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older gcc without AMX fails on the first level; the others are still built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("portable builds are for x86-64")
    try:
        native_decode._compiler()
    except NativeUnavailable as exc:
        pytest.skip(str(exc))
    real = native_prebuild.build_portable

    def old_gcc(target: str, folder: Path | None = None) -> Path:
        if target == "x86-64-v4-amx":
            raise NativeUnavailable("compiling the decode step failed: unrecognized -mamx-tile")
        return real(target, folder)

    monkeypatch.setattr(native_prebuild, "build_portable", old_gcc)
    targets = ["--target", "x86-64-v4-amx", "--target", "x86-64-v3"]
    assert native_prebuild.main(["--folder", str(tmp_path), *targets]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [prebuilt_path("x86-64-v3", tmp_path).name]
    printed = capsys.readouterr()
    assert "x86-64-v4-amx: not built: compiling the decode step failed" in printed.err
    assert "x86-64-v3: " in printed.out
    assert native_prebuild.main(["--folder", str(tmp_path), "--target", "x86-64-v4-amx"]) == 1


def test_start_up_choice_falls_back_to_torch_without_the_compiled_step(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = odd_model(seed=8)

    def unavailable() -> None:
        raise NativeUnavailable("no C compiler found (cc, gcc)")

    monkeypatch.setattr(native_decode, "load_library", unavailable)
    with caplog.at_level(logging.INFO, logger="model.kernel_choice"):
        assert choose_native_decode(model, max_rows=8) is None
    assert "decode step: torch (the compiled one is unavailable: no C compiler" in caplog.text
    assert route_of(model) is None and DecodeStep(model).native is None
    assert not DecodeStep(model).compiled_attention


def test_start_up_choice_is_measured_and_takes_the_winning_row_counts() -> None:
    model = make_model(seed=9)
    native_or_skip(model)
    if packing_available():
        pack_linears(model)
    route = choose_native_decode(model, max_rows=4)
    if route is None:  # the torch step won at one row on this machine: nothing attached
        assert route_of(model) is None
        return
    assert route_of(model) is route
    assert set(route.timings) <= {1, 2, 3, 4} and 1 in route.timings
    wins = [r for r, (torch_ms, native_ms) in route.timings.items() if native_ms < torch_ms]
    if not wins:  # only the batched attention won
        assert route.max_rows == 0 and route.attention
        return
    assert route.max_rows in wins and all(r in wins for r in route.timings if r <= route.max_rows)
    assert route.describe().startswith(f"compiled for this CPU up to {route.max_rows} row")


def test_forced_takes_every_row_count_it_can() -> None:
    model = odd_model(seed=10)
    native_or_skip(model)
    route = choose_native_decode(model, max_rows=32, force=True)
    assert route is not None and route.max_rows == 16 and route.timings == {}


def serve_tokens(settings: Settings, prompt: list[int]) -> tuple[list[int], list[float], str]:
    """A greedy request through the engine that `settings` builds: tokens, their logprobs and
    the decode step the start-up chose."""
    engine, _ = load_engine(settings)
    llm = engine.engine
    params = SamplingParams(temperature=0.0, logprobs=0)
    request = llm.add_request(prompt, params, StopParams(max_new_tokens=12, ignore_eos=True))
    logprobs: list[float] = []
    while llm.has_work():
        for _, event in llm.step():
            logprobs += [t.logprob for t in event.tokens if t.logprob is not None]
    return request.output_token_ids, logprobs, decode_step_of(llm.runner)


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_served_tokens_are_those_of_the_torch_step(tmp_path: Path, mode: str) -> None:
    save_checkpoint(make_model(seed=11), tmp_path / "m")
    prompt = [464, 2068, 7586, 21831]
    base = Settings(model=str(tmp_path / "m"), device="cpu")
    off_tokens, off_logprobs, off_step = serve_tokens(
        base.model_copy(update={"native_decode": "off"}), prompt
    )
    tokens, logprobs, step = serve_tokens(base.model_copy(update={"native_decode": mode}), prompt)
    assert off_step == "torch"
    if mode == "on":
        assert (
            step == "compiled for this CPU up to 16 rows, torch beyond, batched attention compiled"
        )
    assert tokens == off_tokens and len(tokens) == 12
    torch.testing.assert_close(
        torch.tensor(logprobs), torch.tensor(off_logprobs), rtol=0, atol=1e-4
    )


def dequantized(model: GPT) -> GPT:
    """A float32 copy of an int8 model (model.quantize) whose linear weights are its int8
    weights times their scales: what the compiled step computes with them."""
    reference = make_model(model.config)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    reference.load_state_dict(
        {k: v for k, v in state.items() if k in reference.state_dict()}, strict=False
    )
    with torch.no_grad():
        for name, module in model.named_modules():
            packed = getattr(module, "_packed_params", None)
            if isinstance(packed, torch.nn.Module):
                weight, bias = packed._weight_bias()
                target = reference.get_submodule(name)
                # the head gets its own weight: the embedding stays float32, untied from it
                target.weight = torch.nn.Parameter(weight.dequantize())
                if bias is not None:
                    target.bias.copy_(bias)
    return reference


class EightBitRows(torch.nn.Module):
    """An int8 layer as the int8 dot products compute it: each row of activations rounded to
    8 bits on its own scale (max|x| / 127), exact integer sums, then the step, the weights'
    scales and the bias, in that order, in float32."""

    def __init__(self, integers: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.integers, self.scales, self.bias = integers.double(), scales.float(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = x.abs().amax(dim=-1, keepdim=True)
        inverse = torch.where(top > 0, top.new_tensor(127.0) / top, torch.zeros_like(top))
        q = torch.round(x * inverse)  # one rounding for 127 / top, as in C
        y = (q.double() @ self.integers.t()).float() * (top / 127.0) * self.scales
        return y if self.bias is None else y + self.bias


def eight_bit_reference(model: GPT) -> GPT:
    """A float32 copy of an int8 model whose linear layers compute as EightBitRows."""
    reference = dequantized(model)
    for name, module in model.named_modules():
        packed = getattr(module, "_packed_params", None)
        if isinstance(packed, torch.nn.Module):
            weight, bias = packed._weight_bias()
            parent, _, child = name.rpartition(".")
            layer = EightBitRows(weight.int_repr(), weight.q_per_channel_scales(), bias)
            setattr(reference.get_submodule(parent) if parent else reference, child, layer)
    return reference


def test_int8_dot_products_round_each_row_of_activations_to_8_bits() -> None:
    """With the CPU's int8 dot products (AVX512-VNNI): the logits of the same int8 layers with
    each row's activations rounded to 8 bits on its own scale, whatever the other rows hold.
    The activations reaching each layer differ from torch's at float32 rounding, which can move
    one of them to the neighbouring 8-bit step (a logit moves by ~1e-3 then): hence a tolerance
    of a few steps, and the rows' independence checked bit for bit."""
    model = quantize_int8(odd_model(seed=12))
    native_or_skip(model)
    if not native_decode.load_library().gptserve_int8_dot():
        pytest.skip("this build has no int8 dot products (AVX512-VNNI)")
    native = NativeDecode(model, int8_dot=True)
    reference = DecodeStep(eight_bit_reference(model))
    prompts = [[(5 * i + j) % 101 for j in range(2 + 3 * i)] for i in range(5)]
    ours = prefilled(dequantized(model), prompts)
    theirs = prefilled(dequantized(model), prompts)
    alone = None
    for rows in ([0], [1, 3, 4], [0, 1, 2, 3, 4]):
        tokens = [(11 * row + 2) % 101 for row in rows]
        positions = [len(prompts[row]) for row in rows]
        with torch.inference_mode():
            expected = reference(theirs, tokens, rows, positions)
            got = native(ours, tokens, rows, positions)
            if rows == [1, 3, 4]:  # the same rows, one at a time, from the same cache
                for index, row in enumerate(rows):
                    copy = KVCache(ODD, ours.num_slots, ours.max_seq_len, dtype=ours.k.dtype)
                    copy.k.copy_(ours.k), copy.v.copy_(ours.v)
                    single = native(copy, [tokens[index]], [row], [positions[index]])
                    assert torch.equal(single[0], got[index])
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
        assert (got - expected).abs().median() < 1e-3
        if rows == [0]:
            alone = got[0]
        for row, token in zip(rows, tokens, strict=True):
            prompts[row].append(token)
    assert alone is not None
    far = (dequantized(model)(torch.tensor([prompts[0][:-1]]))[0, -1] - alone).abs().max()
    assert 1e-4 < far < 0.5  # the activations' rounding shows, and stays small


def test_int8_weights_are_computed_as_their_float_values() -> None:
    """int8 layers without the int8 dot products: the stored integers times their scales, in
    float32 (no activation quantization), so the logits are those of the dequantized float
    model."""
    model = quantize_int8(odd_model(seed=12))
    native_or_skip(model)
    native = NativeDecode(model, int8_dot=False)
    reference = DecodeStep(dequantized(model))
    prompts = [[(5 * i + j) % 101 for j in range(2 + 3 * i)] for i in range(5)]
    ours = prefilled(dequantized(model), prompts)
    theirs = prefilled(dequantized(model), prompts)
    for rows in ([0], [1, 3, 4], [0, 1, 2, 3, 4]):
        tokens = [(11 * row + 2) % 101 for row in rows]
        positions = [len(prompts[row]) for row in rows]
        with torch.inference_mode():
            expected = reference(theirs, tokens, rows, positions)
            got = native(ours, tokens, rows, positions)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        for row, token in zip(rows, tokens, strict=True):
            prompts[row].append(token)
    torch.testing.assert_close(ours.k, theirs.k, rtol=0, atol=1e-5)


def test_a_bfloat16_cache_is_written_rounded_and_read() -> None:
    model = odd_model(seed=13)
    native = native_or_skip(model)
    reference = DecodeStep(model)
    config = model.config
    ours = KVCache(config, 3, config.block_size, dtype=torch.bfloat16)
    theirs = KVCache(config, 3, config.block_size, dtype=torch.bfloat16)
    for position in range(6):  # token by token: every key read back from the bfloat16 cache
        tokens, slots = [position + 1, 2 * position + 3], [0, 2]
        with torch.inference_mode():
            expected = reference(theirs, tokens, slots, [position] * 2)
            got = native(ours, tokens, slots, [position] * 2)
        # torch's attention runs in bfloat16 (its query rounded too), this one in float32
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-2)
    # The first layer's keys and values come from the same float32 numbers in both, rounded to
    # nearest even (a float32 difference may round apart by one step); later layers' differ as
    # the attention before them did.
    for ours_kv, theirs_kv in ((ours.k, theirs.k), (ours.v, theirs.v)):
        torch.testing.assert_close(ours_kv[0].float(), theirs_kv[0].float(), rtol=2**-7, atol=1e-6)
        assert (ours_kv[0] != theirs_kv[0]).float().mean() < 0.01  # rounded as torch rounds
        torch.testing.assert_close(ours_kv.float(), theirs_kv.float(), rtol=0, atol=2e-2)
    assert ours.k[:, 1].abs().sum() == 0  # the slot no row used is untouched


def test_compiled_gelu_is_torchs_tanh_gelu() -> None:
    gelu = compiled_gelu()
    if gelu is None:
        pytest.skip("the compiled library is unavailable")
    x = torch.cat([torch.randn(3, 1000) * 4, torch.linspace(-120, 120, 3001)[None, :1000]])
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    got = gelu(x.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    strided = x.t()  # not contiguous: torch's GELU, not in place
    torch_gelu = torch.nn.functional.gelu(strided, approximate="tanh")
    torch.testing.assert_close(gelu(strided), torch_gelu, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(strided, x.t(), rtol=0, atol=0, equal_nan=True)  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_key_value_writes_are_torchs_bytes(dtype: torch.dtype) -> None:
    model = odd_model(seed=14)
    native_or_skip(model)
    step = DecodeStep(model)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    ours = KVCache(ODD, 4, ODD.block_size, dtype=dtype)
    theirs = KVCache(ODD, 4, ODD.block_size, dtype=dtype)
    for cache in (ours, theirs):
        for slot, prompt in enumerate(prompts):
            with torch.inference_mode():
                for position, token in enumerate(prompt):
                    step(cache, [token], [slot], [position])
    rows, positions = [3, 0, 2], [2, 3, 5]
    with torch.inference_mode():
        step.compiled_writes = True
        got = step(ours, [12, 13, 14], rows, positions)
        step.compiled_writes = False
        expected = step(theirs, [12, 13, 14], rows, positions)
    assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="outside the cache"):
        KVStore.for_step(ours, [4], [0])
    store = KVStore.for_step(ours, [0, 1], [1, 1])
    assert store is not None
    with pytest.raises(ValueError, match="float32"):
        store(torch.zeros(2, 3 * ODD.n_embd, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="layer 2 outside"):
        store(torch.zeros(2, 3 * ODD.n_embd), 2)
    assert KVStore.for_step(KVCache(ODD, 1, 8, dtype=torch.float16), [0], [0]) is None


def test_a_failed_build_is_not_tried_again_on_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched steps ask for the library each time: where it cannot be built, the first
    failure is the answer for the rest of the process, not a compiler run per step."""
    attempts: list[int] = []

    def failing() -> None:
        attempts.append(1)
        raise OSError("read-only file system: broken")  # not only NativeUnavailable

    monkeypatch.setattr(native_decode, "_load", failing)
    native_decode._load_cached.cache_clear()
    try:
        for _ in range(3):
            with pytest.raises(NativeUnavailable, match="broken"):
                native_decode.load_library()
        assert native_decode.compiled_gelu() is None
        assert KVStore.for_step(KVCache(ODD, 2, 8), [0, 1], [0, 0]) is None
        assert attempts == [1]
    finally:
        native_decode._load_cached.cache_clear()  # the real library again for the other tests


def test_a_bfloat16_model_on_the_cpu_keeps_torchs_batched_steps() -> None:
    model = odd_model(seed=15).to(torch.bfloat16)
    native_or_skip(odd_model())  # the library builds here
    step = DecodeStep(model)
    assert not step.compiled_writes and step.native is None
    cache = KVCache(ODD, 2, ODD.block_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = step(cache, [1, 2], [0, 1], [0, 0])
    assert logits.shape == (2, ODD.vocab_size) and torch.isfinite(logits.float()).all()


def test_off_means_nothing_compiled(tmp_path: Path) -> None:
    native_or_skip(odd_model())
    save_checkpoint(make_model(seed=16), tmp_path / "m")
    load_engine(Settings(model=str(tmp_path / "m"), device="cpu", native_decode="off"))
    with pytest.raises(NativeUnavailable, match="turned off"):
        native_decode.load_library()
    assert compiled_gelu() is None
    assert KVStore.for_step(KVCache(ODD, 2, 8), [0, 1], [0, 0]) is None
    load_engine(Settings(model=str(tmp_path / "m"), device="cpu", native_decode="auto"))
    assert compiled_gelu() is not None  # allowed again


def test_a_cache_of_another_shape_is_not_taken() -> None:
    model = odd_model(seed=17)
    native = native_or_skip(model)
    assert native.supports(KVCache(ODD, 2, 8))
    other = GPTConfig(n_layer=3, n_head=3, n_embd=36, vocab_size=101, block_size=64)
    assert not native.supports(KVCache(other, 2, 8))  # a layer more: the C code would overrun
    wider = GPTConfig(n_layer=2, n_head=4, n_embd=48, vocab_size=101, block_size=64)
    assert not native.supports(KVCache(wider, 2, 8))
    with pytest.raises(ValueError, match="KV cache"):
        native(KVCache(other, 2, 8), [1], [0], [0])


# Head sizes of the compiled attention's vector cases (64 as in every GPT-2; 32, 96, 128) and
# of its plain loop (ODD's 12).
WIDE = GPTConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=101, block_size=256)
NARROW = GPTConfig(n_layer=2, n_head=3, n_embd=96, vocab_size=101, block_size=256)
HEAD96 = GPTConfig(n_layer=1, n_head=2, n_embd=192, vocab_size=101, block_size=256)
HEAD128 = GPTConfig(n_layer=1, n_head=2, n_embd=256, vocab_size=101, block_size=256)
HEADS = [WIDE, NARROW, HEAD96, HEAD128]
HEAD_IDS = ["head64", "head32", "head96", "head128"]


def counting_attention(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record each KVStore.attend call (True: with shared-prefix groups)."""
    calls: list[bool] = []
    attend = KVStore.attend

    def counted(self: KVStore, qkv: torch.Tensor, layer: int) -> torch.Tensor:
        calls.append(bool(self._groups))
        return attend(self, qkv, layer)

    monkeypatch.setattr(KVStore, "attend", counted)
    return calls


def float32_attention(qkv: torch.Tensor, cache: KVCache, layer: int, slots, positions):  # type: ignore[no-untyped-def]
    """Each row's attention over its own slot's first positions[r] + 1 keys, in float64 over
    the cache's values as stored (a bfloat16 cache's widened), as (rows, C)."""
    config_heads, head_dim = cache.k.shape[2], cache.k.shape[4]
    rows = []
    for row, (slot, position) in enumerate(zip(slots, positions, strict=True)):
        query = qkv[row, : config_heads * head_dim].double().view(config_heads, 1, head_dim)
        keys = cache.k[layer, slot, :, : position + 1].double()
        values = cache.v[layer, slot, :, : position + 1].double()
        weights = torch.softmax(query @ keys.mT / head_dim**0.5, dim=-1)
        rows.append((weights @ values).reshape(-1))
    return torch.stack(rows).float()


@pytest.mark.parametrize("config", [*HEADS, ODD], ids=[*HEAD_IDS, "head12"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_attention_is_each_rows_attention_over_its_own_keys(
    config: GPTConfig, dtype: torch.dtype
) -> None:
    model = make_model(config, seed=15)
    native_or_skip(model)
    generator = torch.Generator().manual_seed(15)
    cache = KVCache(config, 5, config.block_size, dtype=dtype)
    for tensor in (cache.k, cache.v):  # keys far apart, so the softmax is not near uniform
        tensor.copy_(3 * torch.randn(tensor.shape, generator=generator))
    # lengths below, at and across the 16-key blocks, rows in slots out of order
    slots, positions = [4, 0, 2, 1, 3], [0, 15, 16, 37, config.block_size - 1]
    store = KVStore.for_step(cache, slots, positions)
    assert store is not None
    qkv = torch.randn(len(slots), 3 * config.n_embd, generator=generator)
    for layer in range(config.n_layer):
        got = store.attend(qkv, layer)
        want = float32_attention(qkv, cache, layer, slots, positions)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="layer 2 outside"):
        store.attend(qkv, 2)
    with pytest.raises(ValueError, match="float32"):
        store.attend(qkv.double(), 0)


@pytest.mark.parametrize("config", [WIDE, ODD], ids=["head64", "head12"])
def test_batched_steps_with_compiled_attention_give_the_torch_steps_logits(
    config: GPTConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(config, seed=16)
    native_or_skip(model)
    calls = counting_attention(monkeypatch)
    prompts = [list(range(1, 40)), [5, 6], list(range(10, 27)), list(range(50, 66))]
    ours, theirs = prefilled(model, prompts, slots=5), prefilled(model, prompts, slots=5)
    compiled, reference = DecodeStep(model), DecodeStep(model)
    compiled.compiled_attention, reference.compiled_attention = True, False
    rows, positions = [2, 0, 1, 3], [len(prompts[r]) for r in (2, 0, 1, 3)]
    with torch.inference_mode():
        for extra in range(3):  # a few steps: each reads the keys the last one wrote
            where = [p + extra for p in positions]
            got = compiled(ours, [7, 8, 9, 10], rows, where)
            assert len(calls) == config.n_layer * (extra + 1)  # the library attended
            expected = reference(theirs, [7, 8, 9, 10], rows, where)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert len(calls) == 3 * config.n_layer  # the reference step did not
    torch.testing.assert_close(ours.k, theirs.k, rtol=0, atol=1e-5)


def test_compiled_attention_over_a_bfloat16_cache_in_batched_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The int8 setup's cache: keys and values rounded to bfloat16. Torch's attention rounds
    the queries too, the compiled one keeps them in float32, so the logits agree to that."""
    model = make_model(WIDE, seed=20)
    native_or_skip(model)
    calls = counting_attention(monkeypatch)
    prompts = [list(range(1, 90)), [5, 6, 7], list(range(10, 27))]
    caches = [KVCache(WIDE, 3, WIDE.block_size, dtype=torch.bfloat16) for _ in range(2)]
    for cache in caches:
        for slot, prompt in enumerate(prompts):
            with torch.inference_mode():
                DecodeStep(model).several(cache, prompt, slot, 0)  # the prompt, in one pass
    compiled, reference = DecodeStep(model), DecodeStep(model)
    compiled.compiled_attention, reference.compiled_attention = True, False
    positions = [len(p) for p in prompts]
    with torch.inference_mode():
        got = compiled(caches[0], [7, 8, 9], [0, 1, 2], positions)
        expected = reference(caches[1], [7, 8, 9], [0, 1, 2], positions)
    assert calls == [False] * WIDE.n_layer
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3)
    assert (got - expected).abs().max() > 0  # the queries' rounding differs: not the same path


def test_start_up_choice_times_the_batched_attention() -> None:
    model = make_model(WIDE, seed=17)
    native_or_skip(model)
    route = choose_native_decode(model, max_rows=4)
    step = DecodeStep(model)
    if route is None:  # neither the step nor the attention won on this machine
        assert not step.compiled_attention
        return
    assert route.attention_timings is not None
    torch_ms, compiled_ms = route.attention_timings
    assert route.attention == (compiled_ms < torch_ms) == step.compiled_attention
    assert route.describe().endswith("batched attention compiled") == route.attention
    one_row = choose_native_decode(model, max_rows=1)  # no batched steps: not timed
    assert one_row is None or one_row.attention_timings is None


def test_a_route_names_what_it_compiles() -> None:
    model = odd_model(seed=18)
    native = native_or_skip(model)
    assert NativeRoute(native, 0, attention=True).describe() == "torch, batched attention compiled"
    assert NativeRoute(native, 4).describe() == "compiled for this CPU up to 4 rows, torch beyond"
    assert NativeRoute(native, 1).describe() == "compiled for this CPU up to 1 row, torch beyond"
    assert NativeRoute(native, 4, attention=True).describe() == (
        "compiled for this CPU up to 4 rows, torch beyond, batched attention compiled"
    )
    forced = choose_native_decode(model, max_rows=32, force=True)
    assert forced is not None and forced.attention and DecodeStep(model).compiled_attention


@pytest.mark.parametrize("config", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [37, 130])  # within the first block of prefix keys, or three
def test_compiled_shared_prefix_attention_reads_the_prefix_from_the_groups_slot(
    config: GPTConfig, dtype: torch.dtype, length: int
) -> None:
    model = make_model(config, seed=19)
    native_or_skip(model)
    generator = torch.Generator().manual_seed(19)
    cache = KVCache(config, 40, config.block_size, dtype=dtype)
    for tensor in (cache.k, cache.v):  # every slot different, its prefix part included
        tensor.copy_(3 * torch.randn(tensor.shape, generator=generator))
    # 35 grouped rows (two chunks of the kernel's 32) after two rows in no group
    slots = [0, 1] + [5 + i for i in range(35)]
    prefix = 7  # the group reads its first keys from slot 7 (its row 4)
    positions = [20, 60] + [length + (i * 7) % 50 for i in range(35)]
    group = tuple(range(2, 37))
    store = KVStore.for_step(cache, slots, positions, [(group, prefix, length)])
    assert store is not None and store.attends_shared()
    qkv = torch.randn(len(slots), 3 * config.n_embd, generator=generator)
    for layer in range(config.n_layer):
        got = store.attend(qkv, layer)
        # what the rows would read with the prefix copied into their own slots
        expected_cache = KVCache(config, 40, config.block_size, dtype=dtype)
        expected_cache.k.copy_(cache.k)
        expected_cache.v.copy_(cache.v)
        for row in group:
            for kv in (expected_cache.k, expected_cache.v):
                kv[:, slots[row], :, :length] = kv[:, prefix, :, :length]
        want = float32_attention(qkv, expected_cache, layer, slots, positions)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    for bad, message in (
        (((2,), prefix, length), "two or more"),
        (((2, 3), 99, length), "not rows of this step"),
        (((2, 3), 5, length + 1), "past a row's position"),
        (((2, 40), 5, 3), "not rows of this step"),
    ):
        with pytest.raises(ValueError, match=message):
            KVStore.for_step(cache, slots, positions, [bad])
    narrow_heads = KVCache(ODD, 3, ODD.block_size)
    odd_store = KVStore.for_step(narrow_heads, [0, 1, 2], [5, 5, 5], [((0, 1), 0, 4)])
    assert odd_store is not None and not odd_store.attends_shared()
    with pytest.raises(ValueError, match="no compiled shared-prefix attention"):
        odd_store.attend(torch.zeros(3, 3 * ODD.n_embd), 0)


@pytest.mark.parametrize("config", [WIDE, HEAD96], ids=["head64", "head96"])
def test_the_compiled_steps_attention_over_heads_of_its_vector_cases(config: GPTConfig) -> None:
    """The compiled step attends through the same vector kernel as the batched steps where the
    head size has a case (GPT-2's 64): its logits are still the torch step's."""
    model = make_model(config, seed=21)
    native = native_or_skip(model)
    prompts = [list(range(1, 45)), list(range(60, 77)), [3, 4]]
    ours, theirs = prefilled(model, prompts), prefilled(model, prompts)
    reference = DecodeStep(model)
    reference.compiled_attention = False
    rows, positions = [1, 0, 2], [len(prompts[r]) for r in (1, 0, 2)]
    with torch.inference_mode():
        for extra in range(2):
            where = [p + extra for p in positions]
            got = native(ours, [9, 8, 7], rows, where)
            expected = reference(theirs, [9, 8, 7], rows, where)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.k, theirs.k, rtol=0, atol=1e-5)


def test_without_the_compiled_attention_the_batched_steps_keep_torchs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model(WIDE, seed=22)
    native_or_skip(model)
    monkeypatch.setattr(KVStore, "for_step", classmethod(lambda cls, *args: None))
    with caplog.at_level(logging.INFO, logger="model.kernel_choice"):
        route = choose_native_decode(model, max_rows=4)
    assert "batched attention: torch (the compiled attention does not take" in caplog.text
    assert route is None or (route.attention_timings is None and not route.attention)
    assert not DecodeStep(model).compiled_attention
