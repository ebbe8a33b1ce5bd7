"""A 16-bit KV cache under a float32 model: keys and values stored rounded, attention in the
cache's dtype, every decode path agreeing, logits close to the float32 cache's."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_model
from model import kernel_choice
from model.batch_invariant import make_batch_invariant
from model.decode import DecodeStep, SharedPrefix
from model.gpt2 import GPT
from model.kernel_choice import KVCacheChoice, choose_kv_cache_dtype
from model.kv_cache import BatchLayout, KVCache, resolve_kv_cache_dtype
from model.loading import save_checkpoint
from model.packed_linear import pack_linears, packing_available
from model.quantize import quantize_int8
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.api.loader import ServeConfigError, load_engine
from service.api.settings import Settings
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams

PROMPTS = [[5, 6, 7], [8] * 20, [9, 10], list(range(40))]


def prefilled(
    model: GPT, prompts: list[list[int]], dtype: torch.dtype
) -> tuple[KVCache, torch.Tensor]:
    """A cache of `dtype` whose slot i holds prompts[i], and the prompts' last logits."""
    cache = KVCache(TINY, len(prompts), TINY.block_size, dtype=dtype)
    width = max(len(p) for p in prompts)
    layout = BatchLayout.build(
        list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts], TINY.block_size
    )
    idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        logits = model.forward_cached(idx, cache, layout)
    return cache, logits


def test_kv_cache_dtype_names() -> None:
    assert resolve_kv_cache_dtype("auto", torch.float32) is torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) is torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32) is torch.float16
    assert resolve_kv_cache_dtype("bfloat16", torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="own dtype"):
        resolve_kv_cache_dtype("float16", torch.bfloat16)
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'"):
        resolve_kv_cache_dtype("fp8", torch.float32)
    assert resolve_kv_cache_dtype("float32", torch.float32) is torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        EngineConfig(kv_cache_dtype="float32x")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prompt_keys_are_stored_rounded_and_logits_stay_close(dtype: torch.dtype) -> None:
    model = make_model(seed=2)
    full, full_logits = prefilled(model, PROMPTS, torch.float32)
    half, half_logits = prefilled(model, PROMPTS, dtype)
    assert half.k.dtype == half.v.dtype == dtype
    assert half.num_bytes * 2 == full.num_bytes
    # the first layer's keys and values are the float32 ones, rounded (later layers' inputs
    # have been through a 16-bit attention already)
    assert torch.equal(half.k[0], full.k[0].to(dtype))
    assert torch.equal(half.v[0], full.v[0].to(dtype))
    assert half_logits.dtype == torch.float32
    assert not torch.equal(half_logits, full_logits)  # the 16-bit path did run
    torch.testing.assert_close(half_logits, full_logits, rtol=0, atol=1e-2)


@pytest.mark.parametrize("weights", ["plain", "packed"])
def test_decode_paths_agree_on_a_bfloat16_cache(weights: str) -> None:
    """The lean step, the cached forward, the speculative check and shared-prefix attention
    all attend over the rounded keys the same way."""
    if weights == "packed" and not packing_available():
        pytest.skip("torch without oneDNN")
    model = make_model(seed=2)
    if weights == "packed":
        pack_linears(model)
    step = DecodeStep(model)
    general, _ = prefilled(model, PROMPTS, torch.bfloat16)
    lean, _ = prefilled(model, PROMPTS, torch.bfloat16)
    full, _ = prefilled(model, PROMPTS, torch.float32)
    rows, tokens = [0, 1, 2, 3], [11, 12, 13, 14]
    positions = [len(p) for p in PROMPTS]
    layout = BatchLayout.build(rows, positions, [1] * 4, TINY.block_size)
    with torch.inference_mode():
        expected = model.forward_cached(torch.tensor([[t] for t in tokens]), general, layout)
        got = step(lean, tokens, rows, positions)
        assert torch.equal(lean.k, general.k) and torch.equal(lean.v, general.v)  # same writes
        reference = step(full, tokens, rows, positions)
        alone = step(lean, [15], [1], [positions[1] + 1])
        # the speculative check feeds 12 (again) and 15 after slot 1's prompt in one pass
        checked = step.several(lean, [12, 15], 1, positions[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-2)
    torch.testing.assert_close(checked[1], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(checked[0], got[1], rtol=0, atol=1e-5)


def test_shared_prefix_attention_on_a_bfloat16_cache() -> None:
    model = make_model(seed=3)
    header = list(range(100, 140))
    prompts = [header + [1, 2], [7] * 9, header + [3, 4, 5, 6], header + [1, 2]]
    plain, _ = prefilled(model, prompts, torch.bfloat16)
    shared, _ = prefilled(model, prompts, torch.bfloat16)
    step = DecodeStep(model)
    rows, tokens = [0, 1, 2, 3], [11, 12, 13, 14]
    positions = [len(p) for p in prompts]
    with torch.inference_mode():
        expected = step(plain, tokens, rows, positions)
        got = step(shared, tokens, rows, positions, [SharedPrefix((0, 2, 3), 2, 40)])
    # the shared part widens the rounded keys to float32; the plain one attends in bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert torch.equal(shared.k[0], plain.k[0])  # the first layer writes the same keys


def test_engine_serves_from_a_bfloat16_cache() -> None:
    model = make_model(seed=4)
    tokenizer = Tokenizer.default()
    engines = {
        name: LLMEngine(model, tokenizer, EngineConfig(max_batch_size=3, kv_cache_dtype=name))
        for name in ("auto", "bfloat16")
    }
    half = engines["bfloat16"].runner.cache
    assert half.k.dtype == torch.bfloat16
    assert half.num_bytes * 2 == engines["auto"].runner.cache.num_bytes
    prompts = [[1, 2, 3, 4, 5], list(range(200, 230)), [42] * 12]
    # each step's six most likely tokens, not only the greedy one (this tiny model repeats it)
    steps: dict[str, list[list[tuple[int, list[int], list[float]]]]] = {}
    for name, engine in engines.items():
        ids = [
            engine.add_request(
                p, SamplingParams(temperature=0.0, logprobs=6), StopParams(8)
            ).request_id
            for p in prompts
        ]
        chosen: dict[str, list[tuple[int, list[int], list[float]]]] = {i: [] for i in ids}
        while engine.has_work():
            for request, event in engine.step():
                for t in event.tokens:
                    assert t.top_logprobs is not None
                    top = t.top_logprobs
                    chosen[request.request_id].append((t.token_id, top.token_ids, top.logprobs))
        steps[name] = [chosen[i] for i in ids]
    tolerance = 2e-3  # bfloat16 keys and values move these log-probabilities by ~3e-4 here
    checked = 0
    for exact, half_ in zip(steps["auto"], steps["bfloat16"], strict=True):
        assert len(exact) == 8
        for (token, top_ids, top_lps), (token_h, top_ids_h, top_lps_h) in zip(
            exact, half_, strict=True
        ):
            assert token_h == token  # the same greedy tokens
            # each of the five most likely keeps its rank unless a neighbour is within twice
            # the tolerance (then the two may swap) ...
            for rank in range(5):
                gaps = [top_lps[rank] - top_lps[rank + 1]]
                if rank:
                    gaps.append(top_lps[rank - 1] - top_lps[rank])
                if min(gaps) > 2 * tolerance:
                    assert top_ids_h[rank] == top_ids[rank]
                    checked += 1
            # ... and every candidate both list has its log-probability within the tolerance
            by_id = dict(zip(top_ids_h, top_lps_h, strict=True))
            common = [(by_id[i], lp) for i, lp in zip(top_ids, top_lps, strict=True) if i in by_id]
            assert len(common) >= 5
            assert all(abs(a - b) < tolerance for a, b in common)
            assert top_lps != top_lps_h  # rounded keys and values: not the same bits
    assert checked >= 60  # of 24 steps x 5 ranks: the ranks are really compared


def test_int8_model_decodes_from_a_bfloat16_cache() -> None:
    """The combination the start-up picks by itself: int8 weights, bfloat16 keys and values,
    through prompts, batched decode steps and prompt lookup's checks. Each greedy token is the
    best one, up to the cache's rounding, of the same model computed without a cache."""
    tokenizer = Tokenizer.default()
    prompts = [[1, 2, 3, 4, 5] * 4, list(range(200, 230)), [42, 43] * 6]
    model = quantize_int8(make_model(seed=6))
    config = EngineConfig(max_batch_size=3, kv_cache_dtype="bfloat16", speculative_method="ngram")
    engine = LLMEngine(model, tokenizer, config)
    assert engine.runner.cache.k.dtype == torch.bfloat16
    ids = [
        engine.add_request(p, SamplingParams(temperature=0.0), StopParams(10)).request_id
        for p in prompts
    ]
    generated: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for request, event in engine.step():
            generated[request.request_id] += [t.token_id for t in event.tokens]
    speculator = engine.runner.speculator
    assert speculator is not None and speculator.stats.num_verify_rows > 0  # checks ran
    for prompt, request_id in zip(prompts, ids, strict=True):
        tokens = generated[request_id]
        assert len(tokens) == 10
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]  # (10, V)
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        # every choice within a hundredth of the best logit
        assert float((logits.max(dim=1).values - chosen).max()) < 1e-2


def test_batch_invariant_models_keep_a_float32_cache() -> None:
    model = make_model(seed=5)
    make_batch_invariant(model)
    config = EngineConfig(max_batch_size=2, kv_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="batch-invariant model keeps its KV cache in float32"):
        LLMEngine(model, Tokenizer.default(), config)


def test_serve_setting_reaches_the_cache(tmp_path) -> None:  # type: ignore[no-untyped-def]
    save_checkpoint(make_model(), tmp_path / "m")
    folder = str(tmp_path / "m")
    engine, _ = load_engine(Settings(model=folder, device="cpu", kv_cache_dtype="bfloat16"))
    assert engine.engine.runner.cache.k.dtype == torch.bfloat16
    engine, _ = load_engine(Settings(model=folder, device="cpu"))
    assert engine.engine.runner.cache.k.dtype == torch.float32  # auto: the model's
    with pytest.raises(ServeConfigError, match="--batch-invariant keeps a float32 KV cache"):
        load_engine(
            Settings(model=folder, device="cpu", batch_invariant=True, kv_cache_dtype="bfloat16")
        )
    with pytest.raises(ServeConfigError, match="--kv-cache-dtype: a bfloat16 model keeps"):
        load_engine(
            Settings(model=folder, device="cpu", dtype="bfloat16", kv_cache_dtype="float16")
        )
    # auto says nothing of the cache: a bfloat16 model is refused for its weights
    with pytest.raises(ServeConfigError, match="needs --device cpu and float32 weights"):
        load_engine(Settings(model=folder, device="cpu", dtype="bfloat16", batch_invariant=True))


@pytest.mark.parametrize("measured", ["bfloat16", "auto"])
def test_int8_serving_takes_the_measured_cache_dtype(
    tmp_path, monkeypatch: pytest.MonkeyPatch, measured: str
) -> None:  # type: ignore[no-untyped-def]
    """With int8 weights, `auto` is what the start-up measures; a named dtype is kept."""
    save_checkpoint(make_model(), tmp_path / "m")
    folder = str(tmp_path / "m")
    probes = []

    def probe(n_head: int, head_dim: int, rows: int) -> KVCacheChoice:
        probes.append((n_head, head_dim, rows))
        return KVCacheChoice(measured, {"float32": 2.0, "bfloat16": 1.0})

    monkeypatch.setattr(kernel_choice, "choose_kv_cache_dtype", probe)
    engine, _ = load_engine(Settings(model=folder, device="cpu", quantization="int8"))
    expected = torch.bfloat16 if measured == "bfloat16" else torch.float32
    assert engine.engine.runner.cache.k.dtype == expected
    assert probes == [(TINY.n_head, TINY.head_dim, 32)]  # the default batch cap
    engine, _ = load_engine(
        Settings(model=folder, device="cpu", quantization="int8", kv_cache_dtype="float32")
    )
    assert engine.engine.runner.cache.k.dtype == torch.float32
    assert len(probes) == 1  # a named dtype is not measured


def test_kv_cache_dtype_choice_follows_the_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    real = choose_kv_cache_dtype(TINY.n_head, TINY.head_dim)  # the real probe runs
    assert real.dtype in ("auto", "bfloat16") and set(real.timings) == {"float32", "bfloat16"}
    for float32, bfloat16, chosen in ((10.0, 8.0, "bfloat16"), (10.0, 9.5, "auto")):
        queue = [float32, bfloat16]
        monkeypatch.setattr(kernel_choice, "_best_time", lambda run, q=queue: q.pop(0))
        choice = choose_kv_cache_dtype(TINY.n_head, TINY.head_dim)
        assert choice.dtype == chosen  # bfloat16 only when under 90% of float32's time
        assert choice.timings == {"float32": float32, "bfloat16": bfloat16}
