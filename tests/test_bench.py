"""`gptserve bench` against a small fake OpenAI-compatible streaming server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from model.tokenizer import Tokenizer
from service.bench import (
    BenchConfig,
    BenchError,
    BenchResult,
    PromptFactory,
    RequestResult,
    format_table,
    percentile,
    run_benchmark,
    summarize,
)
from service.bench import runner as runner_module
from service.bench.config import normalize_base_url
from service.bench.sse import SseDecoder
from service.cli import main

MODEL_NAME = "fake-model"


@dataclass
class Behaviour:
    """How the fake server answers; tests set one before each run."""

    first_token_delay: float = 0.01
    chunk_delay: float = 0.005
    tokens_per_chunk: int = 1
    send_usage: bool = True
    # None, "http" (503), "event" (error event mid-stream), "alternate" (every 2nd gets 429),
    # "no_done" (finish chunk, no [DONE]), "truncated" (stream cut short), "json" (not SSE).
    error_mode: str | None = None
    api_key: str | None = None


@dataclass
class FakeServer:
    """A tiny OpenAI-compatible completions server: the benchmark's peer in these tests."""

    base_url: str = ""
    behaviour: Behaviour = field(default_factory=Behaviour)
    received: list[dict[str, Any]] = field(default_factory=list)
    num_in_flight: int = 0
    max_in_flight: int = 0

    def reset(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.received = []
        self.num_in_flight = self.max_in_flight = 0

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})

    async def completions(self, request: Request) -> Response:
        behaviour = self.behaviour
        body = await request.json()
        client_port = request.client.port if request.client else None
        self.received.append(
            {"body": body, "headers": dict(request.headers), "client_port": client_port}
        )
        if behaviour.api_key and request.headers.get("authorization") != (
            f"Bearer {behaviour.api_key}"
        ):
            return _error(401, "invalid API key")
        if behaviour.error_mode == "http":
            return _error(503, "server overloaded")
        if behaviour.error_mode == "alternate" and len(self.received) % 2 == 0:
            return _error(429, "queue full")
        if behaviour.error_mode == "json":
            return JSONResponse({"choices": [{"text": "not streamed"}]})
        return StreamingResponse(self._stream(body), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[str]:
        behaviour = self.behaviour
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            yield ": keep-alive comment\n\n"
            await asyncio.sleep(behaviour.first_token_delay)
            num_tokens = body["max_tokens"]
            num_chunks = math.ceil(num_tokens / behaviour.tokens_per_chunk)
            for index in range(num_chunks):
                if index:
                    await asyncio.sleep(behaviour.chunk_delay)
                if behaviour.error_mode == "event" and index == 2:
                    yield _event({"error": {"message": "engine failed", "type": "server_error"}})
                    yield "data: [DONE]\n\n"
                    return
                if behaviour.error_mode == "truncated" and index == 2:
                    return
                text = " tok" * min(behaviour.tokens_per_chunk, num_tokens - index)
                yield _event({"object": "text_completion", "choices": [_choice(text, None)]})
            # A bare finish chunk with empty text, as some servers send; it is not a token.
            yield _event({"object": "text_completion", "choices": [_choice("", "length")]})
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if behaviour.send_usage and wants_usage:
                usage = {"prompt_tokens": 3, "completion_tokens": num_tokens}
                yield _event({"object": "text_completion", "choices": [], "usage": usage})
            if behaviour.error_mode != "no_done":
                yield "data: [DONE]\n\n"
        finally:
            self.num_in_flight -= 1


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error(status: int, message: str) -> Response:
    error = {"message": message, "type": "error", "param": None, "code": status}
    return JSONResponse({"error": error}, status_code=status)


@pytest.fixture(scope="module")
def server_instance() -> Iterator[FakeServer]:
    fake = FakeServer()
    app = Starlette(
        routes=[
            Route("/v1/models", fake.models, methods=["GET"]),
            Route("/v1/completions", fake.completions, methods=["POST"]),
        ]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    fake.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    yield fake
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake_server(server_instance: FakeServer) -> FakeServer:
    server_instance.reset(Behaviour())
    return server_instance


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def _run(config: BenchConfig, tokenizer: Tokenizer) -> BenchResult:
    return asyncio.run(run_benchmark(config, show_progress=False, tokenizer=tokenizer))


def _config(server: FakeServer, **overrides: Any) -> BenchConfig:
    settings: dict[str, Any] = {
        "base_url": server.base_url,
        "prompt_tokens": 8,
        "max_tokens": 5,
        "warmup": 0,
        "timeout": 10.0,
    }
    return BenchConfig(**(settings | overrides))


def test_compute_percentile_known_values() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([5.0, 1.0, 3.0], 0) == 1.0
    assert percentile([5.0, 1.0, 3.0], 100) == 5.0
    assert percentile([10.0, 20.0], 50) == pytest.approx(15.0)
    assert percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    rng = random.Random(1)
    values = [rng.uniform(0, 100) for _ in range(37)]
    # statistics' "inclusive" quantiles are the same linear interpolation, computed independently.
    expected = statistics.quantiles(values, n=100, method="inclusive")
    for q in (1, 25, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(expected[q - 1])
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_decode_sse_lines() -> None:
    decoder = SseDecoder()
    lines = [": ping", "", "event: message", "id: 7", 'data: {"a": 1}', "", "data:nospace", ""]
    lines += ["data: first", "data: second", "", "retry: 10", "data: [DONE]"]
    payloads = [p for line in lines if (p := decoder.feed(line)) is not None]
    assert payloads == ['{"a": 1}', "nospace", "first\nsecond"]
    assert decoder.flush() == "[DONE]"
    assert decoder.flush() is None


def test_build_prompts_of_exact_length(tokenizer: Tokenizer) -> None:
    prompts = PromptFactory(tokenizer, num_tokens=50, seed=3)
    id_lists = [prompts.token_ids(index) for index in range(20)]
    assert all(len(ids) == 50 for ids in id_lists)
    assert len({tuple(ids) for ids in id_lists}) == 20
    assert prompts.token_ids(4) == PromptFactory(tokenizer, 50, seed=3).token_ids(4)
    assert prompts.token_ids(4) != PromptFactory(tokenizer, 50, seed=4).token_ids(4)
    for index in range(20):
        assert tokenizer.encode(prompts.text(index)) == id_lists[index]


def test_count_tokens_from_usage(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    # Two tokens per chunk: only the server's usage gives the right count.
    fake_server.behaviour.tokens_per_chunk = 2
    result = _run(
        _config(fake_server, concurrency_levels=(1, 3), num_requests=6, max_tokens=7, warmup=2),
        tokenizer,
    )
    assert result.model == MODEL_NAME
    assert result.warmup is not None and result.warmup.num_ok == 2
    assert [level.concurrency for level in result.levels] == [1, 3]
    for level in result.levels:
        assert (level.num_ok, level.num_failed) == (6, 0)
        assert level.num_generated_tokens == 6 * 7
        assert level.num_usage_reported == 6
        assert level.num_prompt_tokens == 6 * 3
        assert level.output_tokens_per_second == pytest.approx(6 * 7 / level.wall_seconds)
        assert level.requests_per_second == pytest.approx(6 / level.wall_seconds)
    assert len(fake_server.received) == 2 + 6 + 6


def test_count_tokens_from_chunks(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.send_usage = False
    result = _run(_config(fake_server, num_requests=4, max_tokens=9), tokenizer)
    (level,) = result.levels
    assert (level.num_ok, level.num_generated_tokens, level.num_usage_reported) == (4, 36, 0)
    assert level.num_prompt_tokens is None


def test_send_openai_request_body(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    config = _config(fake_server, num_requests=5, ignore_eos=True, include_usage=False)
    _run(config, tokenizer)
    bodies = [request["body"] for request in fake_server.received]
    assert len(bodies) == 5
    for body in bodies:
        assert body["model"] == MODEL_NAME
        assert body["stream"] is True
        assert body["max_tokens"] == 5
        assert body["temperature"] == 0
        assert body["ignore_eos"] is True
        assert "stream_options" not in body
        (prompt,) = body["prompt"]
        assert len(prompt) == 8 and all(isinstance(token, int) for token in prompt)
    assert len({tuple(body["prompt"][0]) for body in bodies}) == 5


def test_send_text_prompts(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    _run(_config(fake_server, num_requests=3, prompt_format="text", model="m"), tokenizer)
    bodies = [request["body"] for request in fake_server.received]
    assert [body["model"] for body in bodies] == ["m"] * 3
    assert all(len(tokenizer.encode(body["prompt"])) == 8 for body in bodies)
    assert all("ignore_eos" not in body for body in bodies)
    assert bodies[0]["stream_options"] == {"include_usage": True}


def test_send_api_key(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.api_key = "sesame"
    (level,) = _run(_config(fake_server, model="m", num_requests=2), tokenizer).levels
    assert level.num_failed == 2 and "HTTP 401: invalid API key" in str(level.first_error)
    (level,) = _run(_config(fake_server, num_requests=2, api_key="sesame"), tokenizer).levels
    assert (level.num_ok, level.num_failed) == (2, 0)
    assert fake_server.received[-1]["headers"]["authorization"] == "Bearer sesame"


def test_measure_plausible_latencies(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.first_token_delay = 0.06
    fake_server.behaviour.chunk_delay = 0.025
    (level,) = _run(_config(fake_server, num_requests=4, max_tokens=6), tokenizer).levels
    assert level.num_ok == 4
    assert level.ttft_p50_ms is not None and level.ttft_p99_ms is not None
    assert level.itl_p50_ms is not None and level.itl_p99_ms is not None
    assert level.e2e_p50_ms is not None
    # The server sleeps 60 ms before the first token and 25 ms between chunks; a busy machine
    # can only add to that.
    assert 60 <= level.ttft_p50_ms < 60 + 100
    assert 25 * 0.9 <= level.itl_p50_ms < 25 * 2
    assert level.itl_p99_ms >= level.itl_p50_ms and level.ttft_p99_ms >= level.ttft_p50_ms
    assert level.e2e_p50_ms >= 60 + 5 * 25


def test_overlap_concurrent_requests(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.first_token_delay = 0.05
    fake_server.behaviour.chunk_delay = 0.02
    config = _config(fake_server, concurrency_levels=(8,), num_requests=8, max_tokens=10)
    (level,) = _run(config, tokenizer).levels
    assert level.num_ok == 8 and level.e2e_p50_ms is not None
    assert fake_server.max_in_flight == 8
    one_request_seconds = 0.05 + 9 * 0.02
    assert level.wall_seconds < 8 * one_request_seconds / 3


def test_keep_one_connection_per_worker(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    config = _config(fake_server, concurrency_levels=(2,), num_requests=6, max_tokens=3)
    (level,) = _run(config, tokenizer).levels
    assert level.num_ok == 6
    assert len({received["client_port"] for received in fake_server.received}) == 2


def test_report_the_clients_cpu_use(
    fake_server: FakeServer, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake server runs in this process, so its CPU time would count too: the client's
    # clock is set here instead, 0.5 s of CPU over the level.
    clock = iter([10.0, 10.5])
    monkeypatch.setattr(runner_module.time, "process_time", lambda: next(clock))
    (level,) = _run(_config(fake_server, num_requests=2), tokenizer).levels
    assert level.client_cpu_percent == pytest.approx(50.0 / level.wall_seconds)


@pytest.mark.parametrize(
    ("error_mode", "message"),
    [
        ("http", "HTTP 503: server overloaded"),
        ("event", "error event: engine failed"),
        ("truncated", "stream ended before"),
        ("json", "expected a text/event-stream response, got application/json"),
    ],
)
def test_report_failed_requests(
    fake_server: FakeServer, tokenizer: Tokenizer, error_mode: str, message: str
) -> None:
    fake_server.behaviour.error_mode = error_mode
    result = _run(_config(fake_server, concurrency_levels=(2,), num_requests=4), tokenizer)
    (level,) = result.levels
    assert (level.num_ok, level.num_failed, level.num_generated_tokens) == (0, 4, 0)
    assert level.first_error is not None and message in level.first_error
    assert level.errors == {level.first_error: 4}
    assert level.ttft_p50_ms is None and level.output_tokens_per_second == 0.0
    table = format_table(result.levels)
    assert "first error: " + level.first_error in table


def test_count_mixed_failures(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.error_mode = "alternate"
    (level,) = _run(_config(fake_server, num_requests=6, max_tokens=4), tokenizer).levels
    assert (level.num_ok, level.num_failed) == (3, 3)
    assert level.num_generated_tokens == 3 * 4
    assert level.first_error == "HTTP 429: queue full"


def test_accept_stream_without_done(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.error_mode = "no_done"
    (level,) = _run(_config(fake_server, num_requests=2, max_tokens=3), tokenizer).levels
    assert (level.num_ok, level.num_generated_tokens) == (2, 6)


def test_report_timeouts(fake_server: FakeServer, tokenizer: Tokenizer) -> None:
    fake_server.behaviour.chunk_delay = 2.0
    start = time.perf_counter()
    config = _config(fake_server, concurrency_levels=(2,), num_requests=2, timeout=0.2)
    (level,) = _run(config, tokenizer).levels
    assert time.perf_counter() - start < 1.5
    assert level.num_failed == 2 and level.first_error == "timed out after 0.2 s"


def test_report_unreachable_server(tokenizer: Tokenizer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = BenchConfig(base_url=base_url, model="m", num_requests=3, warmup=0, timeout=5)
    (level,) = _run(config, tokenizer).levels
    assert (level.num_ok, level.num_failed) == (0, 3)
    assert level.first_error is not None and "ConnectError" in level.first_error
    with pytest.raises(BenchError, match="cannot reach .*/v1/models.*--model"):
        _run(BenchConfig(base_url=base_url, warmup=0, timeout=5), tokenizer)


def test_summarize_known_results() -> None:
    fast = RequestResult(start=10.0, end=11.0, is_ok=True, chunk_times=[10.1, 10.2, 10.4])
    slow = RequestResult(start=10.0, end=12.0, is_ok=True, chunk_times=[10.3, 10.6])
    slow.usage_completion_tokens = 5
    failed = RequestResult(start=10.0, end=10.5, error="HTTP 500: boom")
    summary = summarize(4, [fast, slow, failed], wall_seconds=2.0)
    assert (summary.num_ok, summary.num_failed, summary.num_generated_tokens) == (2, 1, 3 + 5)
    assert summary.output_tokens_per_second == pytest.approx(4.0)
    assert summary.requests_per_second == pytest.approx(1.0)
    assert summary.ttft_p50_ms == pytest.approx(200.0)  # TTFTs 100 and 300 ms
    assert summary.itl_p50_ms == pytest.approx(200.0)  # gaps 100, 200, 300 ms
    assert summary.itl_p99_ms == pytest.approx(298.0)
    assert summary.e2e_p50_ms == pytest.approx(1500.0)
    assert summary.first_error == "HTTP 500: boom"
    assert summary.client_cpu_percent is None  # not measured
    assert summarize(4, [fast], 2.0, client_cpu_seconds=0.5).client_cpu_percent == 25.0


def test_format_table_columns() -> None:
    done = RequestResult(start=0.0, end=1.0, is_ok=True, chunk_times=[0.25, 0.5])
    failed = RequestResult(start=0.0, end=1.0, error="HTTP 429: queue full")
    table = format_table([summarize(1, [done], 1.0, 0.25), summarize(32, [failed], 1.0)])
    header, rule, row_1, row_32, error_line = table.splitlines()
    for column in ("concurrency", "ok", "failed", "wall s", "tok/s", "req/s", "TTFT p50 ms"):
        assert column in header
    for column in ("TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "E2E p50 ms", "client CPU %"):
        assert column in header
    assert set(rule) == {"-"} and len(rule) == len(header) == len(row_1) == len(row_32)
    assert row_1.split()[:6] == ["1", "1", "0", "1.00", "2.0", "1.00"]
    assert row_1.split()[6:] == ["250.0", "250.0", "250.00", "250.00", "1000.0", "25"]
    assert row_32.split() == ["32", "0", "1", "1.00", "0.0", "0.00", *["-"] * 6]
    assert error_line == "concurrency 32: 1 of 1 failed; first error: HTTP 429: queue full"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "ftp://host"}, "base URL"),
        ({"base_url": "127.0.0.1:8000"}, "base URL"),
        ({"concurrency_levels": ()}, "at least one"),
        ({"concurrency_levels": (4, 0)}, "concurrency"),
        ({"num_requests": 0}, "num_requests"),
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"timeout": 0.0}, "timeout"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_reject_bad_settings(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        BenchConfig(**overrides)


def test_choose_requests_per_level() -> None:
    assert normalize_base_url("http://host:1/v1/") == "http://host:1"
    assert normalize_base_url("https://host/proxy/") == "https://host/proxy"
    config = BenchConfig()
    assert config.completions_url == "http://127.0.0.1:8000/v1/completions"
    assert [config.requests_for(level) for level in (1, 4, 8, 32)] == [16, 16, 32, 128]
    assert BenchConfig(num_requests=5).requests_for(32) == 5


def test_show_bench_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--concurrency", "--num-requests", "--prompt-tokens", "--max-tokens"):
        assert flag in help_text
    for flag in ("--prompt-format", "--ignore-eos", "--model", "--api-key", "--json-out"):
        assert flag in help_text


def test_reject_bad_concurrency_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--concurrency", "1,zero"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_run_bench_command(
    fake_server: FakeServer, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    json_out = tmp_path / "bench.json"
    argv = ["bench", "--base-url", fake_server.base_url, "--concurrency", "1,2"]
    argv += ["--num-requests", "4", "--max-tokens", "3", "--prompt-tokens", "5", "--warmup", "1"]
    argv += ["--no-progress", "--json-out", str(json_out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"model={MODEL_NAME}" in lines[0] and "prompt=5 tokens" in lines[0]
    assert "TTFT p50 ms" in lines[1]
    assert [line.split()[:3] for line in lines[3:5]] == [["1", "4", "0"], ["2", "4", "0"]]
    saved = json.loads(json_out.read_text())
    assert saved["model"] == MODEL_NAME and "api_key" not in saved["config"]
    assert [level["num_generated_tokens"] for level in saved["levels"]] == [12, 12]
    assert saved["warmup"]["num_ok"] == 1
    assert len(fake_server.received) == 1 + 4 + 4


def test_exit_nonzero_when_all_requests_fail(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server.behaviour.error_mode = "http"
    argv = ["bench", "--base-url", fake_server.base_url, "--num-requests", "3", "--warmup", "0"]
    assert main([*argv, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "concurrency 1: 3 of 3 failed; first error: HTTP 503: server overloaded" in out
