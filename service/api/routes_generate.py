"""POST /generate (one JSON answer) and POST /stream (Server-Sent Events, one event per token)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from service.api.dependencies import AppState, StateDep
from service.api.generation import collect_until_disconnect, encode_prompt, idle_outputs, submit
from service.api.logprobs import prompt_logprobs, token_logprobs
from service.api.middleware import record_usage
from service.api.schemas import GenerateRequest, GenerateResponse, Usage
from service.api.sse import DONE, KEEPALIVE, EventStreamResponse, error_event, format_event
from service.engine.async_engine import RequestGroup, RequestSpec

router = APIRouter(tags=["generation"])

STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`text/event-stream`. With `prompt_logprobs`, a first "
        '`data: {"prompt_logprobs": [...]}`; then `data: {"token": {"id", "text", "logprob", '
        "...}}` per token; the last event adds `finish_reason`, `usage` and `generated_text` "
        "(it has no `token` when the request ended without a new one: max_new_tokens 0, a "
        'timeout); then `data: [DONE]`. An error after the stream started is `data: {"error": '
        "...}`.",
        "content": {"text/event-stream": {}},
    }
}


async def _submit(state: AppState, body: GenerateRequest, http_request: Request) -> RequestGroup:
    stop = body.to_stop_params()
    sampling = body.to_sampling_params(default_mode=state.settings.logprobs_mode)
    prompt_ids = await encode_prompt(state.tokenizer, body.prompt)
    spec = RequestSpec(
        prompt_ids,
        sampling,
        stop,
        body.prompt_logprobs,
        prompt_logprob_ranks=True,
        speculative=body.speculative,
    )
    request_id = f"gen-{uuid.uuid4().hex}"
    return submit(
        state, http_request, [spec], request_id, priority=body.priority, timeout=body.timeout
    )


@router.post("/generate", response_model_exclude_unset=True)
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> GenerateResponse:
    """Generate text for one prompt and answer when it is done.

    Defaults: `max_new_tokens` 64, `temperature` 1.0 (0 is greedy), every filter and penalty off.
    `max_new_tokens: 0` with `prompt_logprobs` scores the prompt without generating. A client
    that disconnects before the answer is ready aborts its generation.
    """
    group = await _submit(state, body, request)
    (completion,) = await collect_until_disconnect(request.receive, group)
    record_usage(request.state, completion.num_prompt_tokens, completion.num_output_tokens)
    tokenizer = state.tokenizer
    return GenerateResponse(
        id=group.requests[0].group_id,
        model=state.model_name,
        text=completion.text,
        token_ids=completion.token_ids,
        finish_reason=completion.finish_reason or "stop",
        usage=Usage.of(
            completion.num_prompt_tokens,
            completion.num_output_tokens,
            completion.num_cached_tokens,
        ),
        logprobs=(
            token_logprobs(tokenizer, completion.tokens) if body.logprobs is not None else None
        ),
        prompt_logprobs=(
            prompt_logprobs(tokenizer, completion.prompt_logprobs)
            if completion.prompt_logprobs is not None
            else None
        ),
    )


async def _token_events(
    state: AppState, group: RequestGroup, request: Request, with_logprobs: bool
) -> AsyncIterator[str]:
    """The SSE events of /stream, ending with `[DONE]` whatever happens."""
    tokenizer = state.tokenizer
    generated_text = ""
    try:
        async for item in idle_outputs(group, state.settings.keepalive_interval):
            if item is None:
                yield KEEPALIVE
                continue
            output = item[1]
            if output.prompt_logprobs is not None:
                entries = prompt_logprobs(tokenizer, output.prompt_logprobs)
                yield format_event({"prompt_logprobs": [e.model_dump() for e in entries]})
            events: list[dict[str, Any]] = []
            for token in output.tokens:
                generated_text += token.text
                fields: dict[str, Any] = {"id": token.token_id, "text": token.text}
                if with_logprobs:
                    (entry,) = token_logprobs(tokenizer, [token])
                    fields["logprob"] = entry.logprob
                    if token.processed_logprob is not None:
                        fields["processed_logprob"] = entry.processed_logprob
                    if entry.processed_top_logprobs is not None:
                        fields["processed_top_logprobs"] = [
                            top.model_dump(exclude_unset=True)
                            for top in entry.processed_top_logprobs
                        ]
                    fields["top_logprobs"] = [
                        top.model_dump(exclude_unset=True) for top in entry.top_logprobs or ()
                    ]
                else:
                    fields["logprob"] = None
                events.append({"token": fields})
            if output.finished:
                usage = Usage.of(
                    output.num_prompt_tokens, output.num_output_tokens, output.num_cached_tokens
                )
                record_usage(request.state, usage.prompt_tokens, usage.completion_tokens)
                if not events:  # ended without a new token
                    events.append({})
                events[-1]["finish_reason"] = (
                    output.finish_reason.value if output.finish_reason else None
                )
                events[-1]["usage"] = usage.model_dump()
                events[-1]["generated_text"] = generated_text
            for event in events:
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
    group = await _submit(state, body, request)
    events = _token_events(state, group, request, with_logprobs=body.logprobs is not None)
    return EventStreamResponse(events, group=group)
