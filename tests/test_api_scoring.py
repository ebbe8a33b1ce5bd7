"""Scoring through the APIs: echo + logprobs, max_tokens 0, prompt_logprobs, logprobs modes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from api_fixtures import MODEL_NAME, LiveServer, live_server, make_tiny_model

from model.sampling import truncate_logits
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

TOKENIZER = Tokenizer.default()
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(max_batch_size=4) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def reference(prompt_ids: list[int]) -> torch.Tensor:
    """log_softmax of the test model's full forward over the prompt (T, V)."""
    with torch.no_grad():
        logits = make_tiny_model()(torch.tensor([prompt_ids]))[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_score_prompt_with_openai_client_echo_logprobs_max_tokens_0(server: LiveServer) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = api.completions.create(
        model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=5, max_tokens=0
    )
    (choice,) = completion.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    ids = TOKENIZER.encode(PROMPT)
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.tokens == [TOKENIZER.token_text(i) for i in ids]
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference(ids)
    for position in range(1, len(ids)):
        want = expected[position - 1, ids[position]].item()
        assert logprobs.token_logprobs[position] == pytest.approx(want, abs=1e-4)
        top = logprobs.top_logprobs[position]
        assert TOKENIZER.token_text(ids[position]) in top  # the token itself is listed
        best = expected[position - 1].topk(5)
        for token_id, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            assert top[TOKENIZER.token_text(token_id)] == pytest.approx(value, abs=1e-4)
    offsets = logprobs.text_offset
    assert offsets is not None and offsets[0] == 0
    assert all(PROMPT[o:].startswith(t) for o, t in zip(offsets, logprobs.tokens, strict=True))
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == 0


def test_echo_logprobs_put_prompt_before_generated_tokens(client: httpx.Client) -> None:
    ids = TOKENIZER.encode(PROMPT)
    body = {"model": MODEL_NAME, "prompt": [ids, ids[:4]], "echo": True, "logprobs": 1}
    body |= {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    for choice, prompt in zip(choices, [ids, ids[:4]], strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 3
        assert choice["text"].startswith(TOKENIZER.decode(prompt))
        generated = client.post(
            "/generate", json={"prompt": prompt, "max_new_tokens": 3, "temperature": 0}
        ).json()
        assert choice["text"] == TOKENIZER.decode(prompt) + generated["text"]
        assert lp["text_offset"][len(prompt)] == len(TOKENIZER.decode(prompt))
        # lm-evaluation-harness's greedy check: each prompt token's logprob against its top
        for token_logprob, top in zip(
            lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
        ):
            assert token_logprob <= max(top.values()) + 1e-6


def test_stream_echo_logprobs(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "echo": True, "logprobs": 2, "stream": True}
    body |= {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    chunks = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    first = chunks[0]["choices"][0]
    num_prompt = len(TOKENIZER.encode(PROMPT))
    assert first["text"].startswith(PROMPT)
    assert len(first["logprobs"]["tokens"]) == num_prompt + 1  # the prompt and the first token
    assert first["logprobs"]["token_logprobs"][0] is None
    second = chunks[1]["choices"][0]
    assert len(second["logprobs"]["tokens"]) == 1 and second["finish_reason"] == "length"
    # scoring only, streamed: one chunk with the prompt and the finish
    body["max_tokens"] = 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        data = [json.loads(line[6:]) for line in response.iter_lines() if line[6:7] == "{"]
    (only,) = data
    assert only["choices"][0]["text"] == PROMPT
    assert only["choices"][0]["finish_reason"] == "length"
    assert len(only["choices"][0]["logprobs"]["tokens"]) == num_prompt


def test_vllm_prompt_logprobs_field(client: httpx.Client) -> None:
    ids = TOKENIZER.encode(PROMPT)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 1}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    expected = reference(ids)
    for position in range(1, len(ids)):
        listing = entries[position]
        mine = listing[str(ids[position])]
        assert mine["logprob"] == pytest.approx(
            expected[position - 1, ids[position]].item(), abs=1e-4
        )
        assert mine["decoded_token"] == TOKENIZER.token_text(ids[position])
        ranked = sorted((v["rank"], k) for k, v in listing.items() if v["rank"] <= 2)
        assert [k for _, k in ranked][:2] == [
            str(i) for i in expected[position - 1].topk(2).indices.tolist()
        ]


def test_generate_prompt_logprobs_and_score_only(client: httpx.Client) -> None:
    ids = TOKENIZER.encode(PROMPT)
    body = {"prompt": PROMPT, "max_new_tokens": 0, "prompt_logprobs": 3}
    answer = client.post("/generate", json=body).json()
    assert (
        answer["text"] == "" and answer["token_ids"] == [] and answer["finish_reason"] == "length"
    )
    entries = answer["prompt_logprobs"]
    assert [e["token_id"] for e in entries] == ids and entries[0]["logprob"] is None
    expected = reference(ids)
    total = sum(e["logprob"] for e in entries[1:])
    want = sum(expected[p - 1, ids[p]].item() for p in range(1, len(ids)))
    assert total == pytest.approx(want, abs=1e-3)
    assert all(len(e["top_logprobs"]) == 3 for e in entries[1:])
    # streamed: the prompt's entries first, then a last event without a token
    events = []
    with client.stream("POST", "/stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    assert [e["token_id"] for e in events[0]["prompt_logprobs"]] == ids
    assert "token" not in events[1] and events[1]["finish_reason"] == "length"


def softmax_over_kept(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = logits / (params.temperature if not params.is_greedy else 1.0)
    kept = truncate_logits(scaled[None].float(), [params])[0] > -math.inf
    return torch.log_softmax(scaled.masked_fill(~kept, -math.inf), dim=-1)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.5},
        {"temperature": 0.9, "min_p": 0.3},
        {"temperature": 0.0, "top_k": 3},
    ],
)
def test_raw_and_processed_logprobs(client: httpx.Client, fields: dict) -> None:
    ids = TOKENIZER.encode(PROMPT)
    body = {"prompt": ids, "max_new_tokens": 1, "logprobs": 8, "seed": 3, **fields}
    both = client.post(
        "/generate", json={**body, "logprobs_mode": "raw_and_processed_logprobs"}
    ).json()
    raw = client.post("/generate", json={**body, "logprobs_mode": "raw_logprobs"}).json()
    processed = client.post(
        "/generate", json={**body, "logprobs_mode": "processed_logprobs"}
    ).json()
    assert both["token_ids"] == raw["token_ids"] == processed["token_ids"]  # the same draw
    with torch.no_grad():
        logits = make_tiny_model()(torch.tensor([ids]))[0, -1].double()
    expected_raw = torch.log_softmax(logits, dim=-1)
    params = SamplingParams(**fields)
    expected_processed = softmax_over_kept(logits, params)
    token = both["logprobs"][0]
    chosen = both["token_ids"][0]
    assert token["logprob"] == pytest.approx(expected_raw[chosen].item(), abs=1e-4)
    assert token["processed_logprob"] == pytest.approx(expected_processed[chosen].item(), abs=1e-4)
    for entry in token["top_logprobs"]:
        assert entry["logprob"] == pytest.approx(expected_raw[entry["token_id"]].item(), abs=1e-4)
        want = expected_processed[entry["token_id"]].item()
        if math.isinf(want):
            assert entry["processed_logprob"] is None  # cut off by a filter
        else:
            assert entry["processed_logprob"] == pytest.approx(want, abs=1e-4)
    # the processed distribution's own top tokens, cut-off ones left out
    finite = expected_processed[expected_processed > -math.inf]
    want_top = finite.sort(descending=True).values[:8].tolist()
    got_top = [e["logprob"] for e in token["processed_top_logprobs"]]
    assert got_top == pytest.approx(want_top, abs=1e-4)
    assert raw["logprobs"][0]["logprob"] == pytest.approx(token["logprob"], abs=1e-6)
    assert "processed_logprob" not in raw["logprobs"][0]["top_logprobs"][0]
    mode_processed = processed["logprobs"][0]
    assert mode_processed["logprob"] == pytest.approx(token["processed_logprob"], abs=1e-6)
    kept = [e for e in mode_processed["top_logprobs"]]
    assert all(e["logprob"] is not None for e in kept)  # cut-off candidates are not listed
    assert len(kept) == min(8, int((expected_processed > -math.inf).sum()))
    total = sum(math.exp(e["logprob"]) for e in kept)
    assert total <= 1.0 + 1e-5


def test_processed_mode_in_openai_api(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "logprobs": 3, "top_k": 2}
    body |= {"logprobs_mode": "processed_logprobs", "seed": 1}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    for top in choice["logprobs"]["top_logprobs"]:
        probabilities = [math.exp(v) for v in top.values()]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)  # top-2, renormalised
        assert len(top) == 2


def test_each_field_gets_the_alternatives_it_asked_for(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 0, "echo": True}
    body |= {"logprobs": 1, "prompt_logprobs": 4}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    for top in choice["logprobs"]["top_logprobs"][1:]:
        assert 1 <= len(top) <= 2  # one alternative, and the token itself when it is not it
    for listing in choice["prompt_logprobs"][1:]:
        assert 4 <= len(listing) <= 5
