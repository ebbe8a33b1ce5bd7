"""POST /generate (one JSON answer) and POST /stream (Server-Sent Events, one event per token)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request

from model.tokenizer import Tokenizer
from service.api.dependencies import AppState, StateDep
from service.api.generation import (
    StreamGroup,
    abort_all,
    collect_until_disconnect,
    encode_prompt,
    submit_all,
)
from service.api.middleware import record_usage
from service.api.schemas import GenerateRequest, GenerateResponse, TokenLogprob, TopLogprob, Usage
from service.api.sse import DONE, EventStreamResponse, error_event, format_event
from service.engine.async_engine import RequestStream
from service.engine.request import TokenOutput

router = APIRouter(tags=["generation"])

STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": '`text/event-stream`: `data: {"token": {"id", "text", "logprob"}}` '
        "per token; the last token event adds `finish_reason`, `usage` and `generated_text`; "
        'then `data: [DONE]`. An error after the stream started is `data: {"error": ...}`.',
        "content": {"text/event-stream": {}},
    }
}


async def _submit(state: AppState, body: GenerateRequest, request_id: str) -> list[RequestStream]:
    prompt_ids = await encode_prompt(state.tokenizer, body.prompt)
    work = [(prompt_ids, body.to_sampling_params(), body.to_stop_params())]
    return submit_all(state.engine, state.metrics, work, request_id)


def _top_logprobs(tokenizer: Tokenizer, token: TokenOutput) -> list[TopLogprob] | None:
    if token.top_logprobs is None:
        return None
    return [
        TopLogprob(token_id=token_id, token=tokenizer.decode([token_id]), logprob=logprob)
        for token_id, logprob in token.top_logprobs
    ]


def _token_logprobs(tokenizer: Tokenizer, tokens: Sequence[TokenOutput]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token_id=token.token_id,
            token=tokenizer.decode([token.token_id]),
            logprob=token.logprob,
            top_logprobs=_top_logprobs(tokenizer, token),
        )
        for token in tokens
    ]


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> GenerateResponse:
    """Generate text for one prompt and answer when it is done.

    Defaults: `max_new_tokens` 64, `temperature` 1.0 (0 is greedy), every filter and penalty off.
    A client that disconnects before the answer is ready aborts its generation.
    """
    response_id = f"gen-{uuid.uuid4().hex}"
    streams = await _submit(state, body, response_id)
    (completion,) = await collect_until_disconnect(request.receive, state.engine, streams)
    record_usage(request.state, completion.num_prompt_tokens, completion.num_output_tokens)
    return GenerateResponse(
        id=response_id,
        model=state.model_name,
        text=completion.text,
        token_ids=completion.token_ids,
        finish_reason=completion.finish_reason or "stop",
        usage=_usage(completion.num_prompt_tokens, completion.num_output_tokens),
        logprobs=(
            _token_logprobs(state.tokenizer, completion.tokens)
            if body.logprobs is not None
            else None
        ),
    )


def _token_event(tokenizer: Tokenizer, token: TokenOutput, with_top: bool) -> dict[str, Any]:
    """The event of one token: id, text, logprob, and the alternatives when asked."""
    fields: dict[str, Any] = {"id": token.token_id, "text": token.text, "logprob": token.logprob}
    if with_top:
        top = _top_logprobs(tokenizer, token) or []
        fields["top_logprobs"] = [entry.model_dump() for entry in top]
    return {"token": fields}


async def _token_events(
    state: AppState, streams: list[RequestStream], request: Request, with_top: bool
) -> AsyncIterator[str]:
    """The SSE events of /stream, ending with `[DONE]` whatever happens."""
    generated_text = ""
    try:
        async with StreamGroup(state.engine, streams) as group:
            async for _, output in group:
                for position, token in enumerate(output.tokens):
                    generated_text += token.text
                    event = _token_event(state.tokenizer, token, with_top)
                    if output.finished and position == len(output.tokens) - 1:
                        usage = _usage(output.num_prompt_tokens, output.num_output_tokens)
                        record_usage(request.state, usage.prompt_tokens, usage.completion_tokens)
                        event["finish_reason"] = (
                            output.finish_reason.value if output.finish_reason else None
                        )
                        event["usage"] = usage.model_dump()
                        event["generated_text"] = generated_text
                    yield format_event(event)
    except Exception as exc:  # the stream has started: the error becomes an event
        yield error_event(exc, getattr(request.state, "request_id", None))
    yield DONE


@router.post("/stream", status_code=200, response_class=EventStreamResponse, responses=STREAM_DOC)
async def stream(body: GenerateRequest, request: Request, state: StateDep) -> EventStreamResponse:
    """Generate text for one prompt as Server-Sent Events, one event per token.

    Same body and defaults as /generate. Idle streams (e.g. while queued) get `: keep-alive`
    comments; a client that disconnects aborts its generation at once.
    """
    streams = await _submit(state, body, f"gen-{uuid.uuid4().hex}")
    events = _token_events(state, streams, request, with_top=body.logprobs is not None)
    return EventStreamResponse(
        events,
        state.settings.keepalive_interval,
        on_close=lambda: abort_all(state.engine, streams),
    )
