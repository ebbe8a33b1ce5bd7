"""Bad input, failures and overload: every error has its status and the one error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from api_fixtures import MODEL_NAME, LiveServer, live_server

pytestmark = pytest.mark.timeout(60)

ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(max_body_bytes=10_000) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def error_of(response: httpx.Response) -> dict:
    """The `error` object of a response, after checking the shape."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_FIELDS
    return body["error"]


COMPLETION = {"model": MODEL_NAME, "prompt": "x"}
# (path, body, status, param, code, a piece of the message)
BAD_INPUTS = [
    ("/generate", {}, 400, "prompt", "invalid_value", "required"),
    ("/generate", {"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value", "[0, 100]"),
    ("/generate", {"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value", "(0, 1]"),
    ("/generate", {"prompt": "x", "top_k": -5}, 400, "top_k", "invalid_value", ">= 1"),
    ("/generate", {"prompt": "x", "top_k": "5"}, 400, "top_k", "invalid_value", "integer"),
    ("/generate", {"prompt": "x", "min_p": 2}, 400, "min_p", "invalid_value", "[0, 1]"),
    ("/generate", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "invalid_value", "[-2, 2]"),
    ("/generate", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value", "> 0"),
    ("/generate", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value", "less than or equal to 20"),
    ("/generate", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs", "invalid_value", "less than or equal to 20"),
    ("/generate", {"prompt": "x", "logprobs": 1, "logprobs_mode": "raw_logits"}, 400, "logprobs_mode", "invalid_value", "processed_logprobs"),
    ("/generate", {"prompt": "x", "timeout": 0}, 400, "timeout", "invalid_value", "greater than 0"),
    ("/generate", {"prompt": "x\ud800y"}, 400, "prompt", "invalid_value", "lone surrogate"),
    ("/generate", {"prompt": "x", "stop": ["\udfff"]}, 400, "stop", "invalid_value", "lone surrogate"),
    ("/generate", {"prompt": "x", "logit_bias": {"\ud800": 1}}, 400, "logit_bias", "invalid_value", "lone surrogate"),
    ("/generate", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value", "token ids"),
    ("/generate", {"prompt": "x", "logit_bias": {"60000": 1}}, 400, "logit_bias", "invalid_value", "50257"),
    ("/generate", {"prompt": "x", "max_new_tokens": -1}, 400, "max_new_tokens", "invalid_value", "greater than or equal to 0"),
    ("/generate", {"prompt": "x", "max_new_tokens": 5000}, 400, "prompt", "prompt_too_long", "context window of 1024"),
    ("/generate", {"prompt": "x", "max_new_tokens": 1024}, 400, "prompt", "prompt_too_long", "1 token and 1024 tokens"),
    ("/generate", {"prompt": "x", "min_tokens": 9, "max_new_tokens": 5}, 400, "min_tokens", "invalid_value", "max_new_tokens"),
    ("/generate", {"prompt": "x", "stop": [1, 2]}, 400, "stop", "invalid_value", "list of strings"),
    ("/generate", {"prompt": "x", "stop_token_ids": [60000]}, 400, "stop_token_ids", "invalid_value", "50257"),
    ("/generate", {"prompt": []}, 400, "prompt", "invalid_value", "token ids"),
    ("/generate", {"prompt": [70000]}, 400, "prompt", "invalid_value", "outside the vocabulary"),
    ("/generate", {"prompt": "x", "bogus": 1}, 400, "bogus", "unknown_field", "not a supported field"),
    ("/stream", {"prompt": "x", "temperature": 101}, 400, "temperature", "invalid_value", "[0, 100]"),
    ("/v1/completions", {**COMPLETION, "suffix": "!"}, 400, "suffix", "invalid_value", "not supported"),
    ("/v1/completions", {**COMPLETION, "best_of": 2}, 400, "best_of", "invalid_value", "not supported"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "invalid_value", "echo"),
    ("/v1/completions", {**COMPLETION, "logprobs": 1, "logprobs_mode": "raw_and_processed_logprobs"}, 400, "logprobs_mode", "invalid_value", "/generate"),
    ("/v1/completions", {**COMPLETION, "n": 0}, 400, "n", "invalid_value", "greater than or equal to 1"),
    ("/v1/completions", {**COMPLETION, "n": 17}, 400, "n", "invalid_value", "less than or equal to 16"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens", "invalid_value", "greater than or equal to 0"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2000}, 400, "prompt", "prompt_too_long", "--truncate-prompt"),
    ("/v1/completions", {**COMPLETION, "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens", "invalid_value", "max_tokens (5)"),
    ("/v1/completions", {**COMPLETION, "logprobs": 30}, 400, "logprobs", "invalid_value", "less than or equal to 20"),
    ("/v1/completions", {**COMPLETION, "model": "\ud800"}, 400, "model", "invalid_value", "lone surrogate"),
    ("/v1/completions", {**COMPLETION, "prompt": "a\ud800", "echo": True}, 400, "prompt", "invalid_value", "lone surrogate"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", "\udc00"], "stream": True}, 400, "prompt", "invalid_value", "lone surrogate"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value", "stream=true"),
    ("/v1/completions", {**COMPLETION, "stream": True, "stream_options": {"bogus": 1}}, 400, "stream_options.bogus", "unknown_field", "not a supported field"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt", "invalid_value", "not empty"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1], "a"]}, 400, "prompt", "invalid_value", "mixed"),
    ("/v1/completions", {**COMPLETION, "functions": []}, 400, "functions", "unknown_field", "not a supported field"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "invalid_value", "required"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found", MODEL_NAME),
    ("/tokenize", {"prompt": "x", "text": "x"}, 400, "text", "unknown_field", "not a supported field"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "invalid_value", "outside the vocabulary"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param", "code", "message"), BAD_INPUTS)
def test_reject_bad_input(
    client: httpx.Client, path: str, body: dict, status: int, param: str, code: str, message: str
) -> None:
    # json.dumps escapes non-ASCII, so a lone surrogate travels as valid JSON ("\ud800")
    content = json.dumps(body).encode()
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = error_of(response)
    assert error["param"] == param
    assert error["code"] == code
    assert message in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"'])
def test_reject_body_that_is_not_a_json_object(client: httpx.Client, content: bytes) -> None:
    response = client.post(
        "/generate", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_reject_missing_body_saying_so(client: httpx.Client, path: str) -> None:
    response = client.post(path)
    assert response.status_code == 400
    assert error_of(response)["message"] == "a JSON object body is required"


def test_reject_body_over_the_limit(client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": "x" * 20_000})
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "body_too_large"
    assert "10000 bytes" in error["message"]


def test_reject_chunked_body_over_the_limit(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count the bytes
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    response = client.post(
        "/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"


def test_answer_unknown_routes_and_methods_in_the_error_shape(client: httpx.Client) -> None:
    assert error_of(client.get("/nope"))["code"] == "not_found"
    wrong_method = client.get("/generate")
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["type"] == "invalid_request_error"


def test_answer_500_with_request_id_and_keep_serving(
    server: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_submit(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.engine, "submit_group", broken_submit)
    response = client.post("/generate", json={"prompt": "x"}, headers={"X-Request-Id": "req-42"})
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "internal_error"
    assert "req-42" in error["message"]
    assert "a bug" not in error["message"]  # internals stay in the log
    monkeypatch.undo()
    assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200


def test_send_error_event_when_a_step_fails_mid_stream(
    server: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = server.engine.engine.runner
    execute = runner.execute
    calls = {"n": 0}

    def fail_third_step(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fell over")
        return execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", fail_third_step)
    body = {"prompt": "x", "max_new_tokens": 50, "ignore_eos": True, "temperature": 0}
    with client.stream("POST", "/stream", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    monkeypatch.undo()
    payloads = [line.removeprefix("data: ") for line in lines]
    assert payloads[-1] == "[DONE]"
    assert [set(json.loads(p)) for p in payloads[:-2]] == [{"token"}, {"token"}]
    error = json.loads(payloads[-2])["error"]
    assert set(error) == ERROR_FIELDS
    assert error["type"] == "internal_error"
    assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200
