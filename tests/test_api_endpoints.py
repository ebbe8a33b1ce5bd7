"""Each endpoint's happy path, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_fixtures import MODEL_NAME, LiveServer, live_server

from model.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def sse_lines(client: httpx.Client, path: str, body: dict) -> list[str]:
    """The non-empty lines of an SSE answer, in order."""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def data_events(lines: list[str]) -> list[dict]:
    """The JSON payloads of the `data:` lines before `[DONE]`."""
    assert lines[-1] == "data: [DONE]"
    return [
        json.loads(line.removeprefix("data: ")) for line in lines[:-1] if line.startswith("data: ")
    ]


def test_report_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["model"] == MODEL_NAME


def test_generate_returns_text_tokens_and_usage(client: httpx.Client) -> None:
    tokenizer = Tokenizer.default()
    prompt = "The quick brown fox"
    response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 7, **GREEDY})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("gen-")
    assert body["model"] == MODEL_NAME
    assert len(body["token_ids"]) == 7
    assert body["text"] == tokenizer.decode(body["token_ids"])
    assert body["finish_reason"] == "length"
    prompt_tokens = len(tokenizer.encode(prompt))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 7,
        "total_tokens": prompt_tokens + 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["logprobs"] is None


def test_generate_accepts_token_ids_and_greedy_is_deterministic(client: httpx.Client) -> None:
    ids = Tokenizer.default().encode("Hello there")
    by_text = client.post(
        "/generate", json={"prompt": "Hello there", "max_new_tokens": 5, **GREEDY}
    )
    by_ids = client.post("/generate", json={"prompt": ids, "max_new_tokens": 5, **GREEDY})
    assert by_text.json()["token_ids"] == by_ids.json()["token_ids"]


def test_generate_returns_logprobs_when_asked(client: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_new_tokens": 4, "logprobs": 3, **GREEDY}
    result = client.post("/generate", json=body).json()
    assert len(result["logprobs"]) == 4
    for entry, token_id in zip(result["logprobs"], result["token_ids"], strict=True):
        assert entry["token_id"] == token_id
        assert entry["logprob"] <= 0
        top = entry["top_logprobs"]
        assert len(top) == 3
        # Greedy: the chosen token is the most likely one.
        assert top[0]["token_id"] == token_id
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)


def test_stream_sends_one_event_per_token_then_done(client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 6, **GREEDY}
    lines = sse_lines(client, "/stream", body)
    assert all(line.startswith("data: ") for line in lines)
    events = data_events(lines)
    assert len(events) == 6
    for event in events[:-1]:
        assert set(event) == {"token"}
        assert set(event["token"]) == {"id", "text", "logprob"}
    final = events[-1]
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 6
    assert final["generated_text"] == "".join(event["token"]["text"] for event in events)
    # The stream and /generate agree on greedy output.
    generated = client.post("/generate", json=body).json()
    assert [event["token"]["id"] for event in events] == generated["token_ids"]
    assert final["generated_text"] == generated["text"]


def test_stream_ends_at_a_stop_string(client: httpx.Client) -> None:
    full = client.post("/generate", json={"prompt": "a b c", "max_new_tokens": 12, **GREEDY})
    text = full.json()["text"]
    start = next(i for i in range(len(text) // 2, len(text)) if not text[i].isspace())
    stop = text[start : start + 2]
    body = {"prompt": "a b c", "max_new_tokens": 12, "stop": stop, **GREEDY}
    final = data_events(sse_lines(client, "/stream", body))[-1]
    assert final["finish_reason"] == "stop"
    assert final["generated_text"] == text[: text.index(stop)]


def test_tokenize_and_detokenize_round_trip(client: httpx.Client) -> None:
    tokens = client.post("/tokenize", json={"prompt": "Hello, world!"}).json()
    assert tokens["tokens"] == Tokenizer.default().encode("Hello, world!")
    assert tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 1024
    text = client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Hello, world!"}


def test_list_models_names_the_served_model(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [card["id"] for card in models["data"]] == [MODEL_NAME]


def test_accept_and_return_request_id(client: httpx.Client) -> None:
    given = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-Id": "bad id with spaces"})
    assert made.headers["x-request-id"] not in ("", "bad id with spaces")


def test_serve_metrics_and_docs(client: httpx.Client) -> None:
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "gptserve_num_requests_running" in metrics.text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/generate", "/stream", "/v1/completions", "/v1/models", "/tokenize", "/health"):
        assert path in paths


def test_complete_with_openai_client(server: LiveServer, client: httpx.Client) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = api.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    expected = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 5, **GREEDY})
    assert completion.choices[0].text == expected.json()["text"]


def test_stream_completion_with_openai_client(server: LiveServer) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        api.completions.create(
            model=MODEL_NAME,
            prompt=["Hello", "Goodbye"],
            max_tokens=4,
            n=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens == 16
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2, 3]
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
    # Greedy: the n samples of one prompt agree.
    assert texts[0] == texts[1] and texts[2] == texts[3]


def test_complete_with_echo_and_logprobs(client: httpx.Client) -> None:
    base = {"model": MODEL_NAME, "max_tokens": 3, **GREEDY}
    echoed = client.post("/v1/completions", json={**base, "prompt": "Echo me", "echo": True})
    plain = client.post("/v1/completions", json={**base, "prompt": "Echo me", "logprobs": 2})
    plain_choice = plain.json()["choices"][0]
    assert echoed.json()["choices"][0]["text"] == "Echo me" + plain_choice["text"]
    logprobs = plain_choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert "".join(logprobs["tokens"]) == plain_choice["text"]
    assert logprobs["text_offset"][0] == 0
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the top token


def test_sample_n_seeded_completions_that_differ(client: httpx.Client) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "x",
        "max_tokens": 8,
        "n": 3,
        "seed": 7,
        "ignore_eos": True,
    }
    first = client.post("/v1/completions", json=body).json()["choices"]
    again = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in first] == [0, 1, 2]
    assert [c["text"] for c in first] == [c["text"] for c in again]
    assert len({c["text"] for c in first}) > 1


def test_stream_echoed_completion_like_the_unstreamed_one(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "Echo", "max_tokens": 3, "echo": True, **GREEDY}
    events = data_events(sse_lines(client, "/v1/completions", {**body, "stream": True}))
    assert events[0]["choices"][0]["text"].startswith("Echo")
    streamed = "".join(choice["text"] for event in events for choice in event["choices"])
    unstreamed = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert streamed == unstreamed


def test_raise_openai_errors_for_unsupported_fields(server: LiveServer) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=MODEL_NAME, prompt="Hi", suffix="!")
    assert "suffix" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="another-model", prompt="Hi")


def test_streamed_chunks_have_the_documented_shape(client: httpx.Client) -> None:
    from service.api.openai_schemas import CompletionResponse

    body = {"model": MODEL_NAME, "prompt": "Shape", "max_tokens": 3, "stream": True, **GREEDY}
    body |= {"logprobs": 1, "echo": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    assert len(lines) == 4  # three tokens (the first with the echoed prompt), then usage
    for line in lines:
        payload = json.loads(line)
        parsed = CompletionResponse.model_validate(payload)
        assert parsed.model_dump(mode="json") == payload  # every field, in the model's shape
