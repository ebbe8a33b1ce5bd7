"""Prompt log-probabilities and prefix reuse in the engine, against full-sequence forwards."""

from __future__ import annotations

import random
import time

import pytest
import torch

from conftest import TINY, make_model
from model.gpt2 import GPT
from model.packed_linear import pack_linears, packing_available
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams
from service.engine.request import FinishReason, Request, RequestOutput
from service.engine.stats import EngineListener

GREEDY = SamplingParams(temperature=0.0)


class ForwardCounter(EngineListener):
    """Counts the tokens every step put through the model."""

    def __init__(self) -> None:
        self.prompt_tokens = 0

    def on_step(self, num_rows: int, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        self.prompt_tokens += num_prompt_tokens


def make_engine(model: GPT, counter: EngineListener | None = None, **config) -> LLMEngine:
    listeners = (counter,) if counter is not None else ()
    return LLMEngine(model, Tokenizer.default(), EngineConfig(**config), listeners)


def run(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    events: dict[str, list[RequestOutput]] = {}
    while engine.has_work():
        for request, event in engine.step():
            events.setdefault(request.request_id, []).append(event)
    return events


def reference_logprobs(model: GPT, prompt: list[int]) -> torch.Tensor:
    """log_softmax of one full-sequence forward: row p scores token p + 1 (T, V)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0].double()
    return torch.log_softmax(logits, dim=-1)


def check_prompt_logprobs(model: GPT, request: Request, num_top: int) -> None:
    prompt = request.prompt_token_ids
    entries = request.prompt_logprob_entries
    assert len(entries) == len(prompt)
    assert entries[0].token_id == prompt[0] and entries[0].logprob is None
    expected = reference_logprobs(model, prompt)
    for position in range(1, len(prompt)):
        entry = entries[position]
        row = expected[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        chosen = row[prompt[position]]  # rank: 1 + tokens more likely (ties within rounding)
        if entry.rank is not None:  # when asked for
            lowest = int((row > chosen + 1e-4).sum()) + 1
            assert lowest <= entry.rank <= int((row > chosen - 1e-4).sum()) + 1
        if num_top:
            assert entry.top_logprobs is not None
            values, ids = row.topk(num_top)
            assert entry.top_logprobs.token_ids == ids.tolist()
            assert entry.top_logprobs.logprobs == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_prompt_logprobs_equal_full_forward_chunked_and_mixed(packed: bool) -> None:
    if packed and not packing_available():
        pytest.skip("torch without oneDNN")
    model = make_model(seed=5)
    if packed:
        pack_linears(model)
    engine = make_engine(model, max_batch_size=4, max_prefill_tokens=16)
    rng = random.Random(2)
    long_prompt = [rng.randrange(50257) for _ in range(70)]  # 5 chunks of at most 16
    scored = engine.add_request(
        long_prompt,
        GREEDY,
        StopParams(max_new_tokens=0),
        prompt_logprobs=3,
        prompt_logprob_ranks=True,
    )
    # generation requests share the steps, some with prompt log-probabilities of their own
    others = [
        engine.add_request([rng.randrange(50257) for _ in range(n)], GREEDY, StopParams(5))
        for n in (3, 25)
    ]
    with_one = engine.add_request(
        [rng.randrange(50257) for _ in range(20)],
        GREEDY,
        StopParams(4),
        prompt_logprobs=0,
        prompt_logprob_ranks=True,
    )
    events = run(engine)
    check_prompt_logprobs(model, scored, 3)
    check_prompt_logprobs(model, with_one, 0)
    last = events[scored.request_id][-1]
    assert last.finished and last.finish_reason is FinishReason.LENGTH and last.tokens == []
    assert last.prompt_logprobs is not None and len(last.prompt_logprobs) == 70
    assert scored.num_output_tokens == 0
    first = events[with_one.request_id][0]
    assert first.prompt_logprobs is not None and len(first.tokens) == 1  # with the first token
    assert all(e.prompt_logprobs is None for e in events[with_one.request_id][1:])
    assert all(r.num_output_tokens == 5 for r in others)


def test_prompt_logprobs_survive_preemption() -> None:
    model = make_model(seed=6)
    engine = make_engine(model, max_batch_size=1, max_prefill_tokens=8)
    prompt = list(range(300, 340))
    scored = engine.add_request(
        prompt,
        GREEDY,
        StopParams(3),
        prompt_logprobs=2,
        prompt_logprob_ranks=True,
        client_id="a",
        priority=1,
    )
    engine.step()
    engine.step()  # 16 of 40 prompt tokens computed
    urgent = engine.add_request([1, 2, 3], GREEDY, StopParams(2), priority=0, client_id="b")
    run(engine)
    assert urgent.num_output_tokens == 2
    check_prompt_logprobs(model, scored, 2)


def test_prefix_reuse_gives_the_cold_logprobs_and_counts_hits() -> None:
    model = make_model(seed=7)
    header = [random.Random(3).randrange(50257) for _ in range(60)]
    tails = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    cold = make_engine(model, max_batch_size=2, reuse_prefixes=False)
    warm = make_engine(model, max_batch_size=2, reuse_prefixes=True)
    results = {}
    for engine in (cold, warm):
        outputs = []
        for tail in tails:  # one after the other: each later one finds the header cached
            request = engine.add_request(header + tail, GREEDY, StopParams(6), prompt_logprobs=1)
            run(engine)
            outputs.append(request)
        results[engine is warm] = outputs
    for cold_request, warm_request in zip(results[False], results[True], strict=True):
        assert warm_request.output_token_ids == cold_request.output_token_ids
        for a, b in zip(
            cold_request.prompt_logprob_entries, warm_request.prompt_logprob_entries, strict=True
        ):
            assert a.token_id == b.token_id
            if a.logprob is None:
                assert b.logprob is None
            else:
                assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
    # with prompt log-probabilities, the last shared token is computed again: its logits score
    # the first token that differs
    assert [r.num_cached_tokens for r in results[True]] == [0, 59, 59]
    assert [r.num_cached_tokens for r in results[False]] == [0, 0, 0]


def test_prefix_reuse_logits_match_cold_for_running_source() -> None:
    model = make_model(seed=8)
    prompt = [random.Random(4).randrange(50257) for _ in range(40)]
    with_logprobs = SamplingParams(temperature=0.0, logprobs=5)
    engine = make_engine(model, max_batch_size=3)
    first = engine.add_request(prompt, GREEDY, StopParams(20, ignore_eos=True))
    engine.step()
    engine.step()  # first decodes; the next copies its prefix from a running slot
    second = engine.add_request(prompt + [5, 6], with_logprobs, StopParams(10, ignore_eos=True))
    events = run(engine)
    assert second.num_cached_tokens == 40
    alone = make_engine(model, max_batch_size=1, reuse_prefixes=False)
    again = alone.add_request(prompt + [5, 6], with_logprobs, StopParams(10, ignore_eos=True))
    cold_events = run(alone)
    assert second.output_token_ids == again.output_token_ids
    warm = [t for e in events[second.request_id] for t in e.tokens]
    cold = [t for e in cold_events[again.request_id] for t in e.tokens]
    for a, b in zip(warm, cold, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.top_logprobs is not None and b.top_logprobs is not None
        assert a.top_logprobs.logprobs == pytest.approx(b.top_logprobs.logprobs, abs=1e-5)
    assert first.num_output_tokens == 20


def test_n_choices_compute_the_prompt_once() -> None:
    model = make_model(seed=9)
    counter = ForwardCounter()
    engine = make_engine(model, counter, max_batch_size=4, max_prefill_tokens=32)
    prompt = list(range(1000, 1100))  # 100 tokens, 4 chunks
    choices = [
        engine.add_request(
            prompt,
            SamplingParams(temperature=0.8, seed=i),
            StopParams(5),
            group_id="one-api-request",
        )
        for i in range(4)
    ]
    run(engine)
    assert counter.prompt_tokens == 100 + 3  # one prompt, then a token for each other choice
    assert all(c.num_output_tokens == 5 for c in choices)
    assert [c.num_cached_tokens for c in choices] == [0, 99, 99, 99]
    # each choice is what it would be with the prompt computed for it alone
    for i, choice in enumerate(choices):
        solo = make_engine(model, max_batch_size=1, reuse_prefixes=False)
        alone = solo.add_request(prompt, SamplingParams(temperature=0.8, seed=i), StopParams(5))
        run(solo)
        assert choice.output_token_ids == alone.output_token_ids


def test_a_reused_slot_never_serves_a_stale_prefix() -> None:
    model = make_model(seed=10)
    engine = make_engine(model, max_batch_size=1)
    first = engine.add_request(list(range(10, 40)), GREEDY, StopParams(3))
    aborted = engine.add_request(list(range(10, 30)) + [7, 7, 7], GREEDY, StopParams(30))
    run_until = 0
    while first.num_output_tokens < 3:
        engine.step()
        run_until += 1
    engine.step()  # the second request takes the slot over and starts computing
    engine.abort(aborted.request_id)
    # the slot now holds tokens 10..29 and maybe part of the second prompt: a third request
    # sharing only the first 15 tokens reuses 15, never more
    third = engine.add_request(list(range(10, 25)) + [99] * 5, GREEDY, StopParams(4))
    run(engine)
    assert third.num_cached_tokens <= 15
    cold = make_engine(model, max_batch_size=1, reuse_prefixes=False)
    again = cold.add_request(list(range(10, 25)) + [99] * 5, GREEDY, StopParams(4))
    run(cold)
    assert third.output_token_ids == again.output_token_ids


def test_reject_bad_prompt_logprobs_and_timeout() -> None:
    engine = make_engine(make_model(TINY, seed=1))
    from service.engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        engine.add_request([1, 2], GREEDY, StopParams(1), prompt_logprobs=21)
    with pytest.raises(InvalidRequestError, match="timeout"):
        engine.add_request([1, 2], GREEDY, StopParams(1), timeout=0.0)


def test_deadline_ends_waiting_and_running_requests() -> None:
    engine = make_engine(make_model(seed=11), max_batch_size=1)
    running = engine.add_request([1, 2], GREEDY, StopParams(120, ignore_eos=True), timeout=0.5)
    waiting = engine.add_request([3, 4], GREEDY, StopParams(5), timeout=0.4)
    while running.num_output_tokens < 2:
        engine.step()
    time.sleep(0.5)
    events = {request.request_id: event for request, event in engine.step()}
    assert running.finish_reason is FinishReason.TIMEOUT and 2 <= running.num_output_tokens < 120
    assert waiting.finish_reason is FinishReason.TIMEOUT and waiting.num_output_tokens == 0
    assert events[waiting.request_id].finished and events[running.request_id].finished
    assert engine.scheduler.num_free_slots == 1 and not engine.has_work()


def test_score_a_prompt_one_token_longer_than_the_context() -> None:
    model = make_model(seed=12)  # 128 positions
    engine = make_engine(model, max_batch_size=2, max_prefill_tokens=50)
    prompt = [random.Random(5).randrange(50257) for _ in range(129)]
    counter = ForwardCounter()
    engine.listeners.append(counter)
    scored = engine.add_request(prompt, GREEDY, StopParams(max_new_tokens=0), prompt_logprobs=1)
    run(engine)
    assert counter.prompt_tokens == 128  # the last token is scored, never fed
    assert scored.finish_reason is FinishReason.LENGTH
    entries = scored.prompt_logprob_entries
    assert len(entries) == 129
    expected = reference_logprobs(model, prompt[:128])  # positions 0..127 score tokens 1..128
    assert entries[128].logprob == pytest.approx(expected[127, prompt[128]].item(), abs=1e-4)
    from service.engine.errors import PromptTooLongError

    with pytest.raises(PromptTooLongError):
        engine.add_request(prompt + [1], GREEDY, StopParams(max_new_tokens=0))
    with pytest.raises(PromptTooLongError):
        engine.add_request(prompt, GREEDY, StopParams(max_new_tokens=1))
