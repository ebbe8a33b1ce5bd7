"""Speculative decoding: greedy tokens exactly as plain decoding, sampling from the same
distribution, stops and limits honoured, guesses counted."""

from __future__ import annotations

import random

import httpx
import pytest
import torch
from api_fixtures import live_server

from conftest import make_model
from model.generate import generate
from model.sampling import SamplingState
from model.sampling_params import SamplingParams
from model.speculative import propose_ngram, verify
from model.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.engine.errors import InvalidRequestError
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams
from service.engine.request import FinishReason
from service.engine.speculation import (
    CPU_SPECULATIVE_MAX_BATCH_SIZE,
    Proposal,
    speculation_batch_limit,
)

TOKENIZER = Tokenizer.default()
REPEATING = TOKENIZER.encode("the cat sat on the mat. " * 4 + "the cat sat on the")


def test_propose_what_followed_the_latest_match() -> None:
    tokens = [5, 6, 7, 8, 1, 2, 5, 6, 7, 9, 3, 5, 6, 7]
    assert propose_ngram(tokens, 2) == [9, 3]  # the latest earlier "5 6 7"
    assert propose_ngram(tokens, 5) == [9, 3, 5, 6, 7]  # it may run into the tail itself
    assert propose_ngram(tokens[:-1], 3) == [7, 9, 3]  # the longest tail that matches: "5 6"
    assert propose_ngram([1, 2, 3], 3) == []  # nothing repeats
    assert propose_ngram([4, 4, 4, 4], 3) == [4, 4, 4]  # a shorter match that is followed by 3
    assert propose_ngram([4, 5, 4], 3) == [5, 4]  # as many as there are


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("with_draft", [False, True])
def test_verification_keeps_the_target_distribution(with_draft: bool) -> None:
    vocab = 6
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator)  # two guesses, three positions
    params = SamplingParams(temperature=0.9, seed=1)
    draft_probs = torch.softmax(torch.randn(2, vocab, generator=generator), dim=-1)
    counts = torch.zeros(vocab)
    accepted = 0
    draws = 6000
    state = SamplingState.create(params, vocab)
    rng = random.Random(0)
    for _ in range(draws):
        if with_draft:  # guesses drawn from the draft's own distribution
            guesses = [
                int(torch.multinomial(draft_probs[i], 1, generator=state.generator))
                for i in range(2)
            ]
            result = verify(logits, guesses, state, draft_probs)
        else:
            guesses = [rng.randrange(vocab), rng.randrange(vocab)]
            result = verify(logits, guesses, state)
        counts[result.token_ids[0]] += 1
        accepted += result.num_accepted
    target = torch.softmax(logits[0] / 0.9, dim=-1)
    # 20.5: the 0.999 quantile of chi-square with 5 degrees of freedom
    assert chi_square(counts, target) < 20.5
    wrong = torch.roll(target, 1)
    assert chi_square(counts, wrong) > 20.5  # the check has teeth
    assert accepted > 0


def greedy_engine(method: str, model=None, draft=None, **config) -> LLMEngine:  # type: ignore[no-untyped-def]
    return LLMEngine(
        model or make_model(seed=3),
        TOKENIZER,
        EngineConfig(**({"max_batch_size": 6} | config), speculative_method=method),
        draft_model=draft,
    )


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_tokens_are_exactly_those_of_plain_decoding(method: str) -> None:
    model = make_model(seed=3)
    draft = make_model(seed=4) if method == "draft" else None  # a different (worse) drafter
    engine = greedy_engine(method, model, draft, num_speculative_tokens=5)
    rng = random.Random(1)
    prompts = [REPEATING, REPEATING[:9], [rng.randrange(50257) for _ in range(30)], [464]]
    requests = [
        engine.add_request(p, SamplingParams(temperature=0.0), StopParams(37, ignore_eos=True))
        for p in prompts
    ]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.output_token_ids == generate(model, prompt, 37)
        assert request.finish_reason is FinishReason.LENGTH and request.num_output_tokens == 37
    stats = engine.runner.speculator.stats  # type: ignore[union-attr]
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens >= stats.num_accepted_tokens
    if method == "ngram":
        assert steps < 37  # fewer steps than tokens: guesses were accepted


def test_draft_model_equal_to_the_target_accepts_every_guess() -> None:
    model = make_model(seed=3)
    engine = greedy_engine("draft", model, make_model(seed=3), num_speculative_tokens=4)
    request = engine.add_request(
        [464, 3290], SamplingParams(temperature=0.0), StopParams(21, ignore_eos=True)
    )
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert request.output_token_ids == generate(model, [464, 3290], 21)
    stats = engine.runner.speculator.stats  # type: ignore[union-attr]
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert steps == 1 + 4  # the prompt's step, then 5 tokens a step


def test_each_requests_guess_count_follows_how_its_guesses_fare() -> None:
    engine = greedy_engine("ngram", make_model(seed=3), None, num_speculative_tokens=6)
    speculator = engine.runner.speculator
    assert speculator is not None
    request = engine.make_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(50, ignore_eos=True)
    )
    other = engine.make_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(50, ignore_eos=True)
    )
    assert speculator.budget(request) == 6  # the cap, to begin with

    def check(guesses: int, kept: int) -> int:
        speculator.accepted(Proposal(request, list(range(1, guesses + 1))), kept)
        return speculator.budget(request)

    assert check(6, 2) == 5  # a rejection: one fewer than were proposed
    assert check(5, 0) == 4
    assert check(2, 2) == 4  # all kept: two more than were proposed
    assert check(4, 4) == 6
    assert check(1, 1) == 6  # a short proposal kept whole leaves the allowance as it was
    assert check(6, 6) == 6  # never past the cap
    assert check(1, 0) == 1  # never below one
    assert check(1, 0) == 1
    assert speculator.budget(other) == 6  # per request
    speculator.release(request.request_id)
    assert speculator.budget(request) == 6  # a finished request's count is forgotten
    short = engine.make_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(3, ignore_eos=True)
    )
    assert speculator.budget(short) == 2  # and the room left still bounds it


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_steps_with_more_requests_than_the_speculation_batch_decode_plainly(method: str) -> None:
    model = make_model(seed=3)
    # A draft equal to the target has every guess accepted, unless its cache fell out of step
    # while the steps did not speculate.
    draft = make_model(seed=3) if method == "draft" else None
    greedy = SamplingParams(temperature=0.0)
    # No prefix reuse: the three prompts (the same) are computed in one step and decode together
    # for their first 6 tokens; then one ends and two remain.
    engine = greedy_engine(method, model, draft, speculative_max_batch_size=2, reuse_prefixes=False)
    stats = engine.runner.speculator.stats  # type: ignore[union-attr]
    lengths = [7, 30, 30]
    requests = [
        engine.add_request(REPEATING, greedy, StopParams(n, ignore_eos=True)) for n in lengths
    ]
    drafted_while_three = None
    while engine.has_work():
        engine.step()
        if requests[0].finish_reason is None:
            drafted_while_three = stats.num_draft_tokens
    assert drafted_while_three == 0  # three decoding rows: more than 2, no guesses
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0  # two: guesses again
    if method == "draft":
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    for request, n in zip(requests, lengths, strict=True):
        assert request.output_token_ids == generate(model, REPEATING, n)


def test_the_speculation_batch_limit_by_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert speculation_batch_limit(None, cpu, 32) == CPU_SPECULATIVE_MAX_BATCH_SIZE == 4
    assert speculation_batch_limit(None, gpu, 32) == 32  # every step of the batch
    assert speculation_batch_limit(2, gpu, 32) == 2 and speculation_batch_limit(9, cpu, 32) == 9


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_ended_requests_leave_no_speculation_state(method: str) -> None:
    model = make_model(seed=3)
    draft = make_model(seed=4) if method == "draft" else None
    engine = greedy_engine(method, model, draft, num_speculative_tokens=4)
    speculator = engine.runner.speculator
    assert speculator is not None
    greedy = SamplingParams(temperature=0.0)
    finishing = engine.add_request(REPEATING, greedy, StopParams(12, ignore_eos=True))
    aborted = engine.add_request(REPEATING[:20], greedy, StopParams(40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert aborted.request_id in speculator._lengths  # it has speculated
    engine.abort(aborted.request_id)
    assert aborted.request_id not in speculator._lengths
    assert aborted.request_id not in speculator._draft_computed
    while engine.has_work():
        engine.step()
    assert finishing.finish_reason is FinishReason.LENGTH
    assert speculator._lengths == {} and speculator._draft_computed == {}


def test_a_preempted_request_keeps_its_guess_count_but_not_its_draft_cache() -> None:
    model = make_model(seed=3)
    engine = greedy_engine(
        "draft", model, make_model(seed=4), num_speculative_tokens=4, max_batch_size=1
    )
    speculator = engine.runner.speculator
    assert speculator is not None
    greedy = SamplingParams(temperature=0.0)
    target = engine.add_request(
        REPEATING, greedy, StopParams(30, ignore_eos=True), client_id="a", priority=1
    )
    for _ in range(3):
        engine.step()
    allowed = speculator._lengths[target.request_id]
    assert target.request_id in speculator._draft_computed
    # A more urgent request takes the only slot: the target is preempted at the next step.
    urgent = engine.add_request([1, 2, 3] * 5, greedy, StopParams(4), priority=0)
    engine.step()
    assert target.slot is None and urgent.slot is not None  # preempted for the urgent one
    assert speculator._lengths[target.request_id] == allowed  # the text's doing: kept
    assert target.request_id not in speculator._draft_computed  # its slot's cache: gone
    while engine.has_work():
        engine.step()
    assert target.output_token_ids == generate(model, REPEATING, 30)


def test_stop_string_and_eos_inside_accepted_guesses() -> None:
    model = make_model(seed=3)
    plain = greedy_engine("none", model)
    reference = plain.add_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(30, ignore_eos=True)
    )
    while plain.has_work():
        plain.step()
    text = reference.output_text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    fast = greedy_engine("ngram", model)
    request = fast.add_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(30, stop=[stop])
    )
    while fast.has_work():
        fast.step()
    assert request.output_text == text[: text.index(stop)]
    assert request.finish_reason is FinishReason.STOP
    # a length limit in the middle of a run of accepted guesses is exact too
    limited = fast.add_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(7, ignore_eos=True)
    )
    while fast.has_work():
        fast.step()
    assert limited.output_token_ids == reference.output_token_ids[:7]


def test_requests_that_cannot_speculate_decode_plainly() -> None:
    model = make_model(seed=3)
    engine = greedy_engine("ngram", model)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    with_logprobs = SamplingParams(temperature=0.0, logprobs=2)
    a = engine.add_request(REPEATING, penalised, StopParams(12, ignore_eos=True))
    b = engine.add_request(REPEATING, with_logprobs, StopParams(12, ignore_eos=True))
    c = engine.add_request(
        REPEATING, SamplingParams(temperature=0.0), StopParams(12), speculative=False
    )
    while engine.has_work():
        engine.step()
    assert engine.runner.speculator.stats.num_verify_rows == 0  # type: ignore[union-attr]
    assert a.output_token_ids == generate(model, REPEATING, 12, penalised)
    assert b.output_token_ids == c.output_token_ids == generate(model, REPEATING, 12)
    with pytest.raises(InvalidRequestError, match="speculative"):
        greedy_engine("none").add_request([1], SamplingParams(), StopParams(2), speculative=True)


def test_speculation_through_the_api_and_its_metrics() -> None:
    with (
        live_server(speculative_method="ngram") as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        body = {"prompt": REPEATING, "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
        fast = client.post("/generate", json=body).json()
        plain = client.post("/generate", json={**body, "speculative": False}).json()
        assert fast["token_ids"] == plain["token_ids"]
        metrics = client.get("/metrics").text
        accepted = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("gptserve_spec_decode_num_accepted_tokens_total")
        ]
        assert accepted and accepted[0] > 0
