"""One streamed completion request, timed chunk by chunk, and the model-name lookup."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service.bench.config import BenchConfig, BenchError
from service.bench.http import ConnectionPool, HttpError
from service.bench.sse import DONE, SseDecoder

MAX_ERROR_CHARS = 300
# After `[DONE]`, how long the rest of the body (usually just its end mark) may take to arrive
# so that the connection can be kept; past that it is closed, and the request still counts.
DRAIN_SECONDS = 1.0


class RequestFailed(Exception):
    """A request went wrong in a way the benchmark counts and reports, never re-raises."""


@dataclass
class RequestResult:
    """How one request went; times are `time.perf_counter()` seconds."""

    start: float
    end: float = 0.0
    is_ok: bool = False
    error: str | None = None
    # Arrival time of each chunk that carried generated text.
    chunk_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None

    @property
    def num_generated_tokens(self) -> int:
        """The server's own count when it sent usage, else the number of text chunks."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return len(self.chunk_times)

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from sending the request to the first chunk with text, if any came."""
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive text chunks."""
        return [later - earlier for earlier, later in itertools.pairwise(self.chunk_times)]

    @property
    def e2e_latency(self) -> float:
        """Seconds from sending the request to the end of its stream."""
        return self.end - self.start

    def handle_event(self, payload: str) -> bool:
        """Record one SSE data payload; True once the stream says it is done."""
        if payload == DONE:
            return True
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            raise RequestFailed(f"invalid JSON in stream event: {payload[:100]!r}") from None
        if not isinstance(event, dict):
            raise RequestFailed(f"stream event is not a JSON object: {payload[:100]!r}")
        if "error" in event:
            raise RequestFailed(f"error event: {describe_error(event)}")
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_completion_tokens = usage["completion_tokens"]
            prompt_tokens = usage.get("prompt_tokens")
            self.usage_prompt_tokens = prompt_tokens if isinstance(prompt_tokens, int) else None
        choices = event.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            text = choices[0].get("text")
            # Empty-text chunks (a token held back mid UTF-8 character, a bare finish chunk)
            # are not counted: they would make fake zero-length gaps.
            if isinstance(text, str) and text:
                self.chunk_times.append(time.perf_counter())
            if choices[0].get("finish_reason"):
                self.finish_reason = str(choices[0]["finish_reason"])
        return False


def build_payload(config: BenchConfig, model: str, prompt: list[int] | str) -> dict[str, Any]:
    """The JSON body of one streamed /v1/completions request."""
    payload: dict[str, Any] = {
        "model": model,
        # A list holding one token-id list is a batch of one prompt in the OpenAI API.
        "prompt": [prompt] if isinstance(prompt, list) else prompt,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": True,
    }
    if config.include_usage:
        payload["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        payload["ignore_eos"] = True  # vLLM / llama.cpp extension
    return payload


async def send_request(
    client: ConnectionPool,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    timeout: float,
) -> RequestResult:
    """Send one streamed request and time it; failures are recorded in the result, not raised."""
    result = RequestResult(start=time.perf_counter())
    try:
        await asyncio.wait_for(_stream(client, url, payload, headers, result), timeout)
        result.is_ok = True
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout:g} s"
    except RequestFailed as error:
        result.error = str(error)
    except HttpError as error:
        result.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    except Exception as error:  # one odd request must not end the benchmark
        result.error = f"unexpected {type(error).__name__}: {error}"
    if not result.end:  # set at `[DONE]` when the stream had one
        result.end = time.perf_counter()
    if result.error is not None:
        result.error = result.error[:MAX_ERROR_CHARS]
    return result


async def _stream(
    client: ConnectionPool,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    result: RequestResult,
) -> None:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **headers}
    async with client.request("POST", url, headers, body) as response:
        if response.status != 200:
            text = await response.read()
            raise RequestFailed(f"HTTP {response.status}: {describe_error_body(text)}")
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            text = await response.read()
            raise RequestFailed(
                f"expected a text/event-stream response, got {content_type or 'no content type'}"
                f": {describe_error_body(text)}"
            )
        decoder = SseDecoder()
        lines = response.iter_lines()
        async for line in lines:
            event = decoder.feed(line)
            if event is not None and result.handle_event(event):
                result.end = time.perf_counter()
                # Read on to the body's end, so that the connection can be kept.
                with contextlib.suppress(HttpError, asyncio.TimeoutError):
                    await asyncio.wait_for(_drain(lines), DRAIN_SECONDS)
                return
        event = decoder.flush()
        if event is not None and result.handle_event(event):
            return
    # Some servers end the stream without [DONE]; a finish reason shows that it was complete.
    if result.finish_reason is None:
        raise RequestFailed("stream ended before 'data: [DONE]' and without a finish_reason")


async def _drain(rest: AsyncIterator[object]) -> None:
    async for _ in rest:
        pass


def describe_error(body: Any) -> str:
    """The message of an error body: OpenAI's {"error": {"message"}}, FastAPI's detail, or text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("detail", "message"):
            if body.get(key):
                return str(body[key])
    return json.dumps(body)[:MAX_ERROR_CHARS]


def describe_error_body(body: bytes) -> str:
    """The message of an HTTP error response body, JSON or not."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        return describe_error(json.loads(text))
    except json.JSONDecodeError:
        return text[:MAX_ERROR_CHARS] or "(empty body)"


async def fetch_model_name(client: ConnectionPool, config: BenchConfig) -> str:
    """The first model that GET /v1/models lists."""
    url = config.models_url
    hint = "; pass --model to skip this lookup"

    async def get() -> tuple[int, bytes]:
        async with client.request("GET", url, config.headers()) as response:
            return response.status, await response.read()

    try:
        status, body = await asyncio.wait_for(get(), config.timeout)
    except (HttpError, asyncio.TimeoutError) as error:
        name = type(error).__name__
        raise BenchError(f"cannot reach {url}: {name}: {error}{hint}") from None
    if status != 200:
        message = describe_error_body(body)
        raise BenchError(f"GET {url} answered HTTP {status}: {message}{hint}")
    try:
        models = json.loads(body)["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url} did not list any model: {body[:200]!r}{hint}") from None
