"""Between the routes and the engine: submit a request's engine requests, read their outputs.

One HTTP request may be several engine requests (OpenAI's `n` and prompt lists). They are
submitted all or none, read as one stream of `(index, output)`, and all aborted when the reader
stops early for any reason (disconnect, error, cancellation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from starlette.types import Receive

from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.api.disconnect import cancel_on_disconnect
from service.api.errors import APIError
from service.api.metrics import Metrics
from service.engine.async_engine import AsyncEngine, RequestStream
from service.engine.errors import (
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
)
from service.engine.params import StopParams
from service.engine.request import FinishReason, RequestOutput, TokenOutput

# Longer texts are encoded on a worker thread, so the event loop keeps streaming meanwhile.
ENCODE_OFF_LOOP_CHARS = 20_000


async def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt; an empty text starts from end-of-text, GPT-2's document boundary."""
    if not isinstance(prompt, str):
        return list(prompt)
    if len(prompt) > ENCODE_OFF_LOOP_CHARS:
        ids = await asyncio.to_thread(tokenizer.encode, prompt)
    else:
        ids = tokenizer.encode(prompt)
    return ids or [tokenizer.eos_token_id]


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, InvalidRequestError):
        return "invalid_request"
    return "not_ready" if isinstance(exc, EngineNotReadyError) else "error"


def abort_all(engine: AsyncEngine, streams: Sequence[RequestStream]) -> None:
    """Abort every request of `streams` still live (a no-op for those that finished)."""
    for stream in streams:
        engine.abort(stream.request_id)


def submit_all(
    engine: AsyncEngine,
    metrics: Metrics,
    requests: Sequence[tuple[list[int], SamplingParams, StopParams]],
    request_id: str,
) -> list[RequestStream]:
    """Submit every engine request of one HTTP request, or none: a failure aborts the rest."""
    if engine.is_draining:
        metrics.count_failure("not_ready")
        raise APIError(
            503, "the server is shutting down and takes no new requests", code="draining"
        )
    streams: list[RequestStream] = []
    try:
        for index, (prompt_ids, sampling, stop) in enumerate(requests):
            streams.append(engine.submit(prompt_ids, sampling, stop, f"{request_id}-{index}"))
    except Exception as exc:
        abort_all(engine, streams)
        metrics.count_failure(_failure_reason(exc))
        raise
    return streams


_END = object()


class StreamGroup:
    """Several request streams read as one async iterator of `(index, output)`.

    Use it as `async with StreamGroup(...) as group: async for index, output in group`; leaving
    the block, however it happens, aborts every request that has not finished.
    """

    def __init__(self, engine: AsyncEngine, streams: Sequence[RequestStream]) -> None:
        self.engine = engine
        self.streams = list(streams)
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._num_open = len(self.streams)

    async def __aenter__(self) -> StreamGroup:
        self._tasks = [
            asyncio.create_task(self._pump(index, stream))
            for index, stream in enumerate(self.streams)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        abort_all(self.engine, self.streams)

    async def _pump(self, index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                self._queue.put_nowait((index, output))
        except Exception as exc:  # the reader raises it; a bug must not leave it waiting forever
            self._queue.put_nowait((index, exc))
        self._queue.put_nowait((index, _END))

    def __aiter__(self) -> StreamGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while self._num_open:
            index, item = await self._queue.get()
            if item is _END:
                self._num_open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, RequestOutput):  # pragma: no cover - only outputs are queued
                raise TypeError(f"unexpected stream item {item!r}")
            if item.finish_reason is FinishReason.ABORT:
                # The client's own disconnect cancels this reader first, so this abort came from
                # the server: the drain timeout ran out during shutdown.
                raise APIError(
                    503, "the request was cancelled: the server is shutting down", code="aborted"
                )
            return index, item
        raise StopAsyncIteration


@dataclass
class Completion:
    """All outputs of one engine request, gathered."""

    tokens: list[TokenOutput] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids, in order."""
        return [token.token_id for token in self.tokens]

    def add(self, output: RequestOutput) -> None:
        """Append one event of the request's stream."""
        self.tokens.extend(output.tokens)
        self.text += output.text
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_output_tokens = output.num_output_tokens
        if output.finished and output.finish_reason is not None:
            self.finish_reason = output.finish_reason.value


async def collect(engine: AsyncEngine, streams: Sequence[RequestStream]) -> list[Completion]:
    """Read every stream to its end; one Completion per stream, in order."""
    completions = [Completion() for _ in streams]
    async with StreamGroup(engine, streams) as group:
        async for index, output in group:
            completions[index].add(output)
    return completions


async def collect_until_disconnect(
    receive: Receive, engine: AsyncEngine, streams: Sequence[RequestStream]
) -> list[Completion]:
    """`collect`, aborting everything at once if the client disconnects first."""
    try:
        return await cancel_on_disconnect(receive, collect(engine, streams))
    finally:  # covers a cancellation that lands before `collect` even started
        abort_all(engine, streams)
