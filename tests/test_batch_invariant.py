"""Batch-invariant mode: a request's logits and logprobs are the same bits in any batch."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_model
from model import batch_invariant
from model.batch_invariant import (
    BatchInvarianceError,
    InvariantAttention,
    InvariantLinear,
    check_batch_invariance,
    make_batch_invariant,
)
from model.bf16x3_linear import Bf16x3Linear, bf16x3_unavailable
from model.config import GPTConfig
from model.decode import DecodeStep
from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.loading import save_checkpoint
from model.packed_linear import packing_available
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.api.loader import ServeConfigError, load_engine
from service.api.settings import Settings
from service.api.startup_summary import is_batch_invariant
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams
from service.engine.request import Request

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")

# gpt2's widths (its 3072-wide MLP input is where oneDNN splits work), two layers for speed
WIDE = GPTConfig(n_layer=2, n_head=12, n_embd=768, vocab_size=50257, block_size=256)
TARGET_PARAMS = SamplingParams(temperature=0.8, top_k=40, seed=5, logprobs=5)


# highest: oneDNN's packed kernel in chunks; high: bf16x3 on AMX where the CPU has it
PRECISIONS = ("highest", "high")
LINEAR_OF = {"highest": InvariantLinear, "high": Bf16x3Linear}


def skip_without_amx(precision: str) -> None:
    reason = bf16x3_unavailable()
    if precision == "high" and reason is not None:
        pytest.skip(reason)


# attention: the compiled kernel (model.native_decode's library) where it loads, else torch's
ATTENTION = ("compiled", "torch")


@pytest.fixture(scope="module", params=ATTENTION)
def attention(request: pytest.FixtureRequest) -> str:
    if request.param == "compiled" and batch_invariant._attention_library() is None:
        pytest.skip("the compiled library does not load here")
    return str(request.param)


@pytest.fixture(autouse=True)
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of the torch attention runs with the library hidden from it, for that test only."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("attention") == "torch":
        monkeypatch.setattr(batch_invariant, "_attention_library", lambda: None)


@pytest.fixture(scope="module", params=PRECISIONS)
def invariant_model(request: pytest.FixtureRequest, attention: str) -> GPT:
    skip_without_amx(request.param)
    torch.manual_seed(0)
    model = GPT(WIDE).init_weights(0).eval()
    make_batch_invariant(model, request.param)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m, LINEAR_OF[request.param]) for m in linears)
    return model


def target_prompt() -> list[int]:
    return [random.Random(1).randrange(50257) for _ in range(90)]


def other_requests(count: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.1, top_p=0.9, seed=3),
        SamplingParams(repetition_penalty=1.3, seed=4, logprobs=2),
    ]
    return [
        ([rng.randrange(50257) for _ in range(rng.randint(1, 150))], params[i % 3])
        for i in range(count)
    ]


def run_target(
    model: GPT, num_others: int, prefill_budget: int, reuse: bool, warm_prefix: bool = False
) -> list[tuple[int, float | None, list[float] | None]]:
    """The target request's tokens and logprobs, run beside `num_others` other requests."""
    engine = LLMEngine(
        model,
        Tokenizer.default(),
        EngineConfig(max_batch_size=33, max_prefill_tokens=prefill_budget, reuse_prefixes=reuse),
    )
    if warm_prefix:  # another request leaves the target's first 70 tokens cached
        engine.add_request(target_prompt()[:70] + [5], SamplingParams(), StopParams(1))
        while engine.has_work():
            engine.step()
    for prompt, params in other_requests(num_others, seed=num_others):
        engine.add_request(prompt, params, StopParams(12, ignore_eos=True))
    target: Request = engine.add_request(target_prompt(), TARGET_PARAMS, StopParams(8))
    tokens = []
    while engine.has_work():
        for request, event in engine.step():
            if request is target:
                tokens += event.tokens
    if warm_prefix:
        assert target.num_cached_tokens == 70
    return [
        (t.token_id, t.logprob, t.top_logprobs.logprobs if t.top_logprobs else None) for t in tokens
    ]


def test_logprobs_are_the_same_bits_in_any_batch(invariant_model: GPT) -> None:
    alone = run_target(invariant_model, 0, 512, reuse=False)
    assert len(alone) == 8
    for num_others, budget in ((2, 512), (16, 48), (31, 100)):  # batches of 3, 17 and 32
        assert run_target(invariant_model, num_others, budget, reuse=False) == alone


def test_prefix_reuse_gives_the_same_bits(invariant_model: GPT) -> None:
    cold = run_target(invariant_model, 0, 512, reuse=False)
    assert run_target(invariant_model, 4, 64, reuse=True, warm_prefix=True) == cold


@pytest.mark.parametrize("precision", PRECISIONS)
def test_close_to_the_plain_model(precision: str) -> None:
    skip_without_amx(precision)
    torch.manual_seed(0)
    plain = GPT(WIDE).init_weights(0).eval()
    invariant = GPT(WIDE).init_weights(0).eval()
    make_batch_invariant(invariant, precision)
    assert all(
        isinstance(m, LINEAR_OF[precision])
        for m in invariant.modules()
        if isinstance(m, torch.nn.Linear)
    )
    idx = torch.tensor([target_prompt()])
    with torch.inference_mode():
        torch.testing.assert_close(invariant(idx), plain(idx), rtol=0, atol=1e-4)


def test_start_up_check_refuses_a_plain_model_and_accepts_the_invariant_one(
    invariant_model: GPT,
) -> None:
    check_batch_invariance(invariant_model, 256)
    with pytest.raises(BatchInvarianceError, match="different bits"):
        check_batch_invariance(make_model(), 128)


def test_serve_refuses_int8_with_batch_invariance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    save_checkpoint(make_model(), tmp_path / "m")
    settings = Settings(
        model=str(tmp_path / "m"), device="cpu", batch_invariant=True, quantization="int8"
    )
    with pytest.raises(ServeConfigError, match="int8"):
        load_engine(settings)
    engine, _ = load_engine(Settings(model=str(tmp_path / "m"), device="cpu", batch_invariant=True))
    model = engine.engine.model
    kind = InvariantLinear if bf16x3_unavailable() else Bf16x3Linear  # the default: high
    assert any(isinstance(m, kind) for m in model.modules())
    assert is_batch_invariant(model)
    settings = Settings(
        model=str(tmp_path / "m"),
        device="cpu",
        batch_invariant=True,
        float32_matmul_precision="highest",
    )
    engine, _ = load_engine(settings)
    assert any(isinstance(m, InvariantLinear) for m in engine.engine.model.modules())


def test_attention_reads_slots_in_place_or_gathered_with_the_same_bits() -> None:
    """Consecutive slots are read as a view, others gathered: a query's result is the same."""
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.randn(8, 12, 256, 64, generator=generator)
    v_cache = torch.randn(8, 12, 256, 64, generator=generator)
    q = torch.randn(8, 12, 1, 64, generator=generator)
    positions = [[100 + 7 * slot] for slot in range(8)]  # every row in one key bucket or two
    with torch.inference_mode():
        together = InvariantAttention(list(range(8)), positions, 256, q.device)(
            q, k_cache, v_cache
        )  # a view
        for rows in ([5], [2, 3, 4], [5, 1, 6], [7, 0]):  # alone, consecutive, gathered
            some = InvariantAttention(rows, [positions[row] for row in rows], 256, q.device)(
                q[rows], k_cache, v_cache
            )
            for index, row in enumerate(rows):
                assert torch.equal(some[index], together[row])


def test_compiled_attention_agrees_with_torch_and_keeps_a_query_s_bits() -> None:
    """The compiled kernel: within float rounding of the torch path's result, and a query's
    bits the same alone, in other batches and as one of a prompt's queries (padding after)."""
    if batch_invariant._attention_library() is None:
        pytest.skip("the compiled library does not load here")
    generator = torch.Generator().manual_seed(1)
    k_cache = torch.randn(4, 12, 256, 64, generator=generator)
    v_cache = torch.randn(4, 12, 256, 64, generator=generator)
    projections = torch.randn(3, 5, 3 * 768, generator=generator)  # (B, T, 3C), as a layer's
    q = projections[..., :768].view(3, 5, 12, 64).transpose(1, 2)  # (B, nh, T, hs): in place
    positions = [[40, 41, 42, 43, 44], [7, 8], [200, 201, 202]]  # rows 1 and 2 padded
    slots = [2, 0, 3]
    with torch.inference_mode():
        compiled = InvariantAttention(slots, positions, 256, q.device)
        assert compiled.library is not None
        together = compiled(q, k_cache, v_cache)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(batch_invariant, "_attention_library", lambda: None)
            reference = InvariantAttention(slots, positions, 256, q.device)(q, k_cache, v_cache)
        torch.testing.assert_close(together, reference, rtol=0, atol=2e-6)
        assert together[1, :, 2:].abs().max() == 0 and together[2, :, 3:].abs().max() == 0
        for row, column in ((0, 3), (1, 1), (2, 0)):
            alone_q = q[row : row + 1, :, column : column + 1].contiguous()  # copied, not in place
            alone = InvariantAttention([slots[row]], [[positions[row][column]]], 256, q.device)
            assert torch.equal(alone(alone_q, k_cache, v_cache)[0, :, 0], together[row, :, column])


def test_a_decode_step_gives_the_bits_of_a_prompt(invariant_model: GPT, attention: str) -> None:
    """A token's logits are the same whether it was the last of a prompt or fed by the lean
    decode step, alone or beside rows in other slots at other positions: what a request that
    is preempted and recomputed (its generated tokens then come back as a prompt) relies on."""
    compiled = InvariantAttention([0], [[0]], 256, torch.device("cpu")).library is not None
    assert compiled == (attention == "compiled")  # the path this parameter names
    rng = random.Random(3)
    prompts = [[rng.randrange(50257) for _ in range(n)] for n in (90, 17, 64, 129)]
    slots = [2, 0, 3, 1]  # not in order: the decode step gathers their keys
    with torch.inference_mode():
        cache = KVCache(WIDE, 4, 256)
        for prompt, slot in zip(prompts, slots, strict=True):  # all but the last token
            layout = BatchLayout.build([slot], [0], [len(prompt) - 1], 256)
            invariant_model.forward_cached(torch.tensor([prompt[:-1]]), cache, layout)
        step = DecodeStep(invariant_model)
        assert step.invariant
        together = step(cache, [p[-1] for p in prompts], slots, [len(p) - 1 for p in prompts])
        for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
            fresh = KVCache(WIDE, 1, 256)
            whole = invariant_model.forward_cached(
                torch.tensor([prompt]), fresh, BatchLayout.build([0], [0], [len(prompt)], 256)
            )[0]
            alone = step(cache, [prompt[-1]], [slot], [len(prompt) - 1])[0]
            assert torch.equal(together[row], whole)
            assert torch.equal(alone, whole)


@pytest.mark.parametrize("reuse", [False, True])
def test_a_preempted_request_keeps_its_bits(invariant_model: GPT, reuse: bool) -> None:
    """Preempted after three tokens, the target computes its prompt and those tokens again as
    a prompt (or finds them cached) and goes on: the same tokens and logprobs as alone."""
    alone = run_target(invariant_model, 0, 512, reuse=False)
    engine = LLMEngine(
        invariant_model,
        Tokenizer.default(),
        EngineConfig(max_batch_size=1, max_prefill_tokens=512, reuse_prefixes=reuse),
    )
    target = engine.add_request(
        target_prompt(), TARGET_PARAMS, StopParams(8), client_id="a", priority=1
    )
    schedule, preempted = engine.scheduler.schedule, []

    def watched():  # type: ignore[no-untyped-def]
        work = schedule()
        preempted.extend(work.preempted)
        return work

    engine.scheduler.schedule = watched  # type: ignore[method-assign]
    tokens = []
    while len(tokens) < 3:
        tokens += [t for request, e in engine.step() if request is target for t in e.tokens]
    urgent = engine.add_request([1, 2, 3] * 30, SamplingParams(), StopParams(4), priority=0)
    while engine.has_work():
        for request, event in engine.step():
            if request is target:
                tokens += event.tokens
    assert urgent.num_output_tokens == 4 and preempted == [target]
    got = [
        (t.token_id, t.logprob, t.top_logprobs.logprobs if t.top_logprobs else None) for t in tokens
    ]
    assert got == alone
