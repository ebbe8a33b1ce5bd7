"""Between the routes and the engine: submit an API request's engine requests, read outputs.

One HTTP request may be several engine requests (OpenAI's `n` and prompt lists). They are
admitted all or none as one group, read as one stream of `(index, output)`, and all aborted when
the reader stops early for any reason (disconnect, error, cancellation).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from starlette.types import Receive

from model.tokenizer import Tokenizer
from service.api.dependencies import AppState, bearer_token
from service.api.disconnect import cancel_on_disconnect
from service.api.errors import APIError
from service.engine.async_engine import RequestGroup, RequestSpec
from service.engine.errors import EngineNotReadyError, InvalidRequestError, QueueFullError
from service.engine.request import FinishReason, PromptLogprob, RequestOutput, TokenOutput

# Longer texts are encoded on a worker thread, so the event loop keeps streaming meanwhile.
ENCODE_OFF_LOOP_CHARS = 20_000
# What -inf log-probabilities become in OpenAI-shaped answers (vLLM's value): JSON has no inf.
OPENAI_MIN_LOGPROB = -9999.0


async def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt; an empty text starts from end-of-text, GPT-2's document boundary."""
    if not isinstance(prompt, str):
        return list(prompt)
    if len(prompt) > ENCODE_OFF_LOOP_CHARS:
        ids = await asyncio.to_thread(tokenizer.encode_prompt, prompt)
    else:
        ids = tokenizer.encode_prompt(prompt)
    return ids or [tokenizer.eos_token_id]


def finite_or_none(value: float | None) -> float | None:
    """A log-probability as JSON can carry it: NaN and -inf become None."""
    if value is None or not math.isfinite(value):
        return None
    return value


def openai_logprob(value: float | None) -> float | None:
    """A log-probability for OpenAI's shape: -inf becomes -9999.0 (as vLLM), NaN None."""
    if value is None or math.isnan(value):
        return None
    return max(value, OPENAI_MIN_LOGPROB)


def client_of(request: Request) -> str:
    """Who is asking, for fair scheduling: the API key when keys are configured (hashed, never
    kept in the clear), else the client's connection (address and port)."""
    token = bearer_token(request)
    if token is not None and request.app.state.settings.api_keys:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    client = request.client
    return f"conn:{client.host}:{client.port}" if client is not None else "conn:unknown"


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, InvalidRequestError):
        return "invalid_request"
    return "not_ready" if isinstance(exc, EngineNotReadyError) else "error"


def submit(
    state: AppState,
    http_request: Request,
    specs: Sequence[RequestSpec],
    request_id: str,
    *,
    priority: int = 0,
    timeout: float | None = None,
) -> RequestGroup:
    """Admit every engine request of one HTTP request, or none."""
    engine = state.engine
    if engine.is_draining:
        state.metrics.count_failure("not_ready")
        raise APIError(
            503, "the server is shutting down and takes no new requests", code="draining"
        )
    if timeout is None:
        timeout = state.settings.request_timeout
    try:
        return engine.submit_group(
            specs,
            request_id,
            client_id=client_of(http_request),
            priority=priority,
            timeout=timeout,
        )
    except Exception as exc:
        state.metrics.count_failure(_failure_reason(exc))
        raise


async def outputs(group: RequestGroup) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The group's outputs; an abort the server made (shutdown, a stalled reader) is an error."""
    async for item in idle_outputs(group, None):
        if item is not None:
            yield item


async def idle_outputs(
    group: RequestGroup, idle_after: float | None
) -> AsyncIterator[tuple[int, RequestOutput] | None]:
    """`outputs`, with None after every `idle_after` seconds without one (keep-alives)."""
    source = group.with_idle(idle_after) if idle_after is not None else group
    async for item in source:
        if item is None:
            yield None
            continue
        index, output = item
        if output.finish_reason is FinishReason.ABORT:
            # The client's own disconnect cancels this reader first, so this abort came from
            # the server: the drain timeout ran out during shutdown.
            raise APIError(
                503, "the request was cancelled: the server is shutting down", code="aborted"
            )
        if output.finish_reason is FinishReason.STALLED:
            raise APIError(
                503,
                "the request was cancelled: its stream was not read for too long",
                code="stalled",
            )
        yield index, output


@dataclass
class Completion:
    """All outputs of one engine request, gathered."""

    tokens: list[TokenOutput] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[PromptLogprob] | None = None

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
        self.num_cached_tokens = output.num_cached_tokens
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.finished and output.finish_reason is not None:
            self.finish_reason = output.finish_reason.value


async def collect(group: RequestGroup) -> list[Completion]:
    """Read every request of the group to its end; one Completion per request, in order."""
    completions = [Completion() for _ in group.requests]
    async for index, output in outputs(group):
        completions[index].add(output)
    return completions


async def collect_until_disconnect(receive: Receive, group: RequestGroup) -> list[Completion]:
    """`collect`, aborting everything at once if the client disconnects first."""
    try:
        return await cancel_on_disconnect(receive, collect(group))
    finally:  # covers a cancellation that lands before `collect` even started
        group.close()
