"""The engine with a tiny random model: batching invariance, stops, aborts, failures."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from model.generate import generate
from model.gpt2 import GPT
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    StepFailedError,
)
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams
from service.engine.request import FinishReason, Request, RequestOutput

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def make_engine(model: GPT, tokenizer: Tokenizer, **config) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(**config))


def run_to_completion(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    events: dict[str, list[RequestOutput]] = {}
    while engine.has_work():
        for request, event in engine.step():
            events.setdefault(request.request_id, []).append(event)
    return events


def test_batched_output_equals_each_request_alone(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    settings = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_k=40, seed=11),
        SamplingParams(temperature=1.2, top_p=0.8, seed=12),
        SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.3, seed=13),
    ]
    cases = []
    for i in range(16):
        prompt = [rng.randrange(50257) for _ in range(rng.randint(1, 40))]
        cases.append((prompt, settings[i % len(settings)], rng.randint(1, 24)))
    engine = make_engine(tiny_model, tokenizer, max_batch_size=8, max_prefill_tokens=48)
    requests = [
        engine.add_request(prompt, params, StopParams(max_new_tokens=n, ignore_eos=True))
        for prompt, params, n in cases
    ]
    events = run_to_completion(engine)
    for request, (prompt, params, n) in zip(requests, cases, strict=True):
        alone = generate(tiny_model, prompt, n, params)
        assert request.output_token_ids == alone
        streamed = [t.token_id for e in events[request.request_id] for t in e.tokens]
        assert streamed == alone
        assert events[request.request_id][-1].finish_reason is FinishReason.LENGTH
        assert "".join(e.text for e in events[request.request_id]) == tokenizer.decode(alone)
    assert engine.scheduler.num_free_slots == 8


def greedy_texts(engine: LLMEngine, prompt: list[int], n: int) -> list[str]:
    """The text each token of a greedy run releases."""
    engine.add_request(prompt, SamplingParams(temperature=0.0), StopParams(n, ignore_eos=True))
    (events,) = run_to_completion(engine).values()
    return [e.text for e in events]


def test_stop_string_split_across_tokens(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
    prompt = tokenizer.encode("The king said")
    pieces = greedy_texts(engine, prompt, 30)
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(5, 29) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop_string = pieces[k][-2:] + pieces[k + 1][:2]
    full = "".join(pieces)
    expected = full[: full.index(stop_string)]
    request = engine.add_request(
        prompt, SamplingParams(temperature=0.0), StopParams(30, stop=[stop_string])
    )
    events = run_to_completion(engine)[request.request_id]
    assert "".join(e.text for e in events) == expected
    assert request.output_text == expected
    assert events[-1].finish_reason is FinishReason.STOP
    assert request.num_output_tokens <= k + 2
    # Streamed pieces never showed any part of the stop string that was then withdrawn.
    assert stop_string not in "".join(e.text for e in events)


def test_stop_string_kept_when_asked(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
    prompt = tokenizer.encode("Once upon a time")
    full = "".join(greedy_texts(engine, prompt, 20))
    stop_string = full[10:14]
    request = engine.add_request(
        prompt,
        SamplingParams(temperature=0.0),
        StopParams(20, stop=[stop_string], include_stop_str_in_output=True),
    )
    run_to_completion(engine)
    assert request.output_text == full[: full.index(stop_string) + len(stop_string)]


def test_eos_ends_request_unless_ignored(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=4)
    to_eos = SamplingParams(temperature=0.0, logit_bias={EOS: 100.0})
    ends = engine.add_request([1, 2, 3], to_eos, StopParams(10))
    ignores = engine.add_request([1, 2, 3], to_eos, StopParams(10, ignore_eos=True))
    waits = engine.add_request([1, 2, 3], to_eos, StopParams(10, min_tokens=4))
    run_to_completion(engine)
    assert ends.output_token_ids == [EOS] and ends.finish_reason is FinishReason.STOP
    assert ends.output_text == ""
    assert ignores.num_output_tokens == 10 and ignores.finish_reason is FinishReason.LENGTH
    # End-of-text is impossible before min_tokens, then wins at once.
    assert EOS not in waits.output_token_ids[:4] and waits.output_token_ids[4] == EOS
    assert waits.num_output_tokens == 5 and waits.finish_reason is FinishReason.STOP


def test_stop_token_ids_end_request(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
    prompt = [5, 6, 7]
    greedy = greedy_texts(engine, prompt, 8)
    assert len(greedy) == 8
    forced = SamplingParams(temperature=0.0, logit_bias={1234: 100.0})
    request = engine.add_request(prompt, forced, StopParams(8, stop_token_ids=[1234]))
    run_to_completion(engine)
    assert request.output_token_ids == [1234] and request.finish_reason is FinishReason.STOP
    assert request.output_text == ""


def test_length_limit_of_context_window(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2, max_model_len=40)
    request = engine.add_request(
        list(range(30)), SamplingParams(temperature=0.0), StopParams(None, ignore_eos=True)
    )
    run_to_completion(engine)
    assert request.num_tokens == 40 and request.finish_reason is FinishReason.LENGTH


def test_reject_prompt_too_long_or_truncate(tiny_model: GPT, tokenizer: Tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_model_len=40)
    with pytest.raises(PromptTooLongError, match="context window of 40"):
        engine.add_request(list(range(35)), SamplingParams(), StopParams(10))
    truncating = make_engine(tiny_model, tokenizer, max_model_len=40, truncate_prompt=True)
    request = truncating.add_request(list(range(35)), SamplingParams(), StopParams(10))
    assert request.prompt_token_ids == list(range(5, 35))


@pytest.mark.parametrize(
    ("prompt", "params", "stop", "param"),
    [
        ([], SamplingParams(), StopParams(), "prompt"),
        ([50257], SamplingParams(), StopParams(), "prompt"),
        ([1], SamplingParams(logit_bias={60000: 1.0}), StopParams(), "logit_bias"),
        ([1], SamplingParams(), StopParams(stop_token_ids=[70000]), "stop_token_ids"),
    ],
)
def test_reject_invalid_request(tiny_model, tokenizer, prompt, params, stop, param) -> None:
    engine = make_engine(tiny_model, tokenizer)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(prompt, params, stop)
    assert info.value.param == param
    assert not engine.has_work()


def test_failed_step_fails_its_requests_and_engine_goes_on(
    tiny_model: GPT, tokenizer: Tokenizer, monkeypatch
) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=4)
    doomed = engine.add_request([1, 2], SamplingParams(temperature=0.0), StopParams(5))
    original = engine.runner.execute

    def broken(work):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(engine.runner, "execute", broken)
    ((request, event),) = engine.step()
    assert request is doomed and event.finished and isinstance(event.error, StepFailedError)
    assert "simulated device fault" in str(event.error)
    assert doomed.finish_reason is FinishReason.ERROR and engine.scheduler.num_free_slots == 4
    monkeypatch.setattr(engine.runner, "execute", original)
    survivor = engine.add_request([1, 2], SamplingParams(temperature=0.0), StopParams(5))
    run_to_completion(engine)
    assert survivor.num_output_tokens == 5


def consume(stream) -> asyncio.Task:  # type: ignore[no-untyped-def]
    async def collect() -> list[RequestOutput]:
        return [event async for event in stream]

    return asyncio.ensure_future(collect())


def test_async_submit_streams_and_matches_reference(tiny_model, tokenizer) -> None:
    async def main() -> None:
        engine = AsyncEngine(make_engine(tiny_model, tokenizer, max_batch_size=4))
        await engine.start()
        prompts = [[1, 2, 3], list(range(100, 120)), [7]]
        streams = [
            engine.submit(p, SamplingParams(temperature=0.0), StopParams(12, ignore_eos=True))
            for p in prompts
        ]
        results = await asyncio.gather(*(consume(s) for s in streams))
        for prompt, events in zip(prompts, results, strict=True):
            tokens = [t.token_id for e in events for t in e.tokens]
            assert tokens == generate(tiny_model, prompt, 12)
            assert events[-1].finished and events[-1].num_output_tokens == 12
        await engine.shutdown()

    asyncio.run(main())


def test_abort_waiting_and_running_frees_slots(tiny_model, tokenizer) -> None:
    async def main() -> None:
        llm = make_engine(tiny_model, tokenizer, max_batch_size=1)
        engine = AsyncEngine(llm)
        await engine.start()
        long = StopParams(100, ignore_eos=True)
        running = engine.submit([1, 2, 3], SamplingParams(temperature=0.0), long)
        waiting = engine.submit([4, 5, 6], SamplingParams(temperature=0.0), long)
        seen = []
        async for event in running:  # read two tokens, then walk away
            seen.append(event)
            if len(seen) == 2:
                break
        engine.abort(waiting.request_id)
        events = [e async for e in waiting]
        assert events[-1].finish_reason is FinishReason.ABORT and events[-1].tokens == []
        await asyncio.sleep(0.05)
        assert llm.scheduler.num_running == 0 and llm.scheduler.num_waiting == 0
        assert llm.scheduler.num_free_slots == 1
        # The slot serves the next request at once.
        events = await consume(
            engine.submit([9], SamplingParams(temperature=0.0), StopParams(3, ignore_eos=True))
        )
        assert events[-1].num_output_tokens == 3
        await engine.shutdown()

    asyncio.run(main())


def test_submit_abort_cycles_leave_nothing_behind(tiny_model, tokenizer) -> None:
    async def main() -> None:
        llm = make_engine(tiny_model, tokenizer, max_batch_size=4, max_queue_size=200)
        engine = AsyncEngine(llm)
        await engine.start()
        tasks_before = len(asyncio.all_tasks())
        rng = random.Random(1)
        for _ in range(100):
            stream = engine.submit(
                [rng.randrange(1000)], SamplingParams(temperature=0.8), StopParams(50)
            )
            task = consume(stream)
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.005]))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert llm.scheduler.num_running == 0 and llm.scheduler.num_waiting == 0
        assert llm.scheduler.num_free_slots == 4
        assert llm.runner._states == {}
        assert len(asyncio.all_tasks()) == tasks_before
        await engine.shutdown()

    asyncio.run(main())


def test_engine_loop_death_is_reported(tiny_model, tokenizer, monkeypatch) -> None:
    async def main() -> None:
        llm = make_engine(tiny_model, tokenizer, max_batch_size=2)
        engine = AsyncEngine(llm)
        await engine.start()

        def die() -> list[tuple[Request, RequestOutput]]:
            raise SystemError("scheduler state corrupted")

        monkeypatch.setattr(llm, "step", die)
        stream = engine.submit([1], SamplingParams(), StopParams(5))
        with pytest.raises(EngineDeadError):
            await consume(stream)
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            engine.submit([1], SamplingParams(), StopParams(5))

    asyncio.run(main())


def test_seeded_sampling_reproducible_across_batches(tiny_model, tokenizer) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    outputs = []
    for companions in (0, 5):
        engine = make_engine(tiny_model, tokenizer, max_batch_size=8)
        for i in range(companions):
            engine.add_request([i + 1], SamplingParams(temperature=1.0), StopParams(15))
        request = engine.add_request([42, 43], params, StopParams(15, ignore_eos=True))
        run_to_completion(engine)
        outputs.append(request.output_token_ids)
    assert outputs[0] == outputs[1]
    torch.manual_seed(0)  # other rows' unseeded draws must not matter either
    assert outputs[0] == generate(tiny_model, [42, 43], 15, params)


def test_output_failure_fails_only_that_request(tiny_model, tokenizer, monkeypatch) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=4)
    quick = engine.add_request([1], SamplingParams(temperature=0.0), StopParams(1))
    doomed = engine.add_request([2], SamplingParams(temperature=0.0), StopParams(5))
    survivor = engine.add_request([3], SamplingParams(temperature=0.0), StopParams(5))
    original = engine.output_processor.process

    def process(request, token):  # type: ignore[no-untyped-def]
        if request is doomed:
            raise KeyError("simulated detokenizer fault")
        return original(request, token)

    monkeypatch.setattr(engine.output_processor, "process", process)
    events = run_to_completion(engine)
    assert events[quick.request_id][-1].finish_reason is FinishReason.LENGTH
    assert isinstance(events[doomed.request_id][-1].error, StepFailedError)
    assert survivor.num_output_tokens == 5 and engine.scheduler.num_free_slots == 4


def test_abort_between_steps_releases_seeded_state(tiny_model, tokenizer) -> None:
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
    request = engine.add_request([1, 2], SamplingParams(seed=5), StopParams(10))
    engine.step()  # prefill: the sampling state (its generator) exists
    assert request.request_id in engine.runner._states
    ((aborted, event),) = [engine.abort(request.request_id)]  # type: ignore[misc]
    assert aborted is request and event.finish_reason is FinishReason.ABORT and event.finished
    assert engine.runner._states == {} and not engine.has_work()
    assert engine.step() == []


def test_rows_behind_a_shared_header_decode_as_each_request_alone(tokenizer: Tokenizer) -> None:
    """Decode rows that share a long prompt prefix read it once (the shared-prefix attention);
    their greedy tokens are those of each request run alone."""
    from conftest import TINY, make_model
    from model.config import GPTConfig

    config = GPTConfig(**{**TINY.__dict__, "block_size": 512})
    model = make_model(config, seed=5)
    rng = random.Random(3)
    header = [rng.randrange(50000) for _ in range(300)]
    prompts = [header + [rng.randrange(50000) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    prompts.append([rng.randrange(50000) for _ in range(30)])  # shares nothing with them
    engine = make_engine(model, tokenizer, max_batch_size=8, max_prefill_tokens=4096)
    requests = [
        engine.add_request(p, SamplingParams(temperature=0.0), StopParams(12, ignore_eos=True))
        for p in prompts
    ]
    groups_seen = []
    while engine.has_work():
        engine.step()
        groups_seen.append(engine.runner._shared[1])
    assert any(len(g) == 1 and len(g[0].rows) == 6 and g[0].length >= 300 for g in groups_seen)
    for request, prompt in zip(requests, prompts, strict=True):
        assert request.output_token_ids == generate(
            model, prompt, 12, SamplingParams(temperature=0.0)
        )
