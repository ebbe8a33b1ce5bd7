"""OpenAI-compatible POST /v1/completions and GET /v1/models.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API; each choice is one engine
request. Token texts in `logprobs` are each token decoded alone; `text_offset` indexes into the
choice's text (echoed prompt included).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request

from model.tokenizer import Tokenizer
from service.api.dependencies import AppState, StateDep
from service.api.errors import APIError
from service.api.generation import (
    StreamGroup,
    abort_all,
    collect_until_disconnect,
    encode_prompt,
    submit_all,
)
from service.api.middleware import record_usage
from service.api.openai_schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from service.api.schemas import Usage
from service.api.sse import DONE, EventStreamResponse, error_event, format_event
from service.engine.async_engine import RequestStream
from service.engine.errors import PromptTooLongError
from service.engine.request import FinishReason, TokenOutput

router = APIRouter(prefix="/v1", tags=["openai"])


@dataclass
class Submitted:
    """The engine requests of one completion request, and what shaping the answer needs."""

    response_id: str
    streams: list[RequestStream]
    echo_prefixes: list[str]  # per choice: the prompt text when echo, else ""


async def _submit(state: AppState, body: CompletionRequest) -> Submitted:
    body.check_supported()
    if body.model != state.model_name:
        raise APIError(
            404,
            f"the model '{body.model}' does not exist; this server serves '{state.model_name}'",
            code="model_not_found",
            param="model",
        )
    stop = body.to_stop_params()
    prompts = [await encode_prompt(state.tokenizer, prompt) for prompt in body.prompt]
    work = [
        (prompt_ids, body.to_sampling_params(sample), stop)
        for prompt_ids in prompts
        for sample in range(body.n)
    ]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    try:
        streams = submit_all(state.engine, state.metrics, work, response_id)
    except PromptTooLongError as exc:  # the engine's message names its own max_new_tokens
        message = str(exc).replace("max_new_tokens", "max_tokens")
        raise PromptTooLongError(message, exc.param) from None
    prefixes = [""] * len(work)
    if body.echo:  # after submit: the engine has checked the token ids, so they decode
        try:
            texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in body.prompt]
        except Exception:
            abort_all(state.engine, streams)
            raise
        prefixes = [text for text in texts for _ in range(body.n)]
    return Submitted(response_id, streams, prefixes)


def _logprobs(
    tokenizer: Tokenizer, tokens: Sequence[TokenOutput], offset: int
) -> tuple[CompletionLogprobs, int]:
    """OpenAI-format logprobs of `tokens` whose text starts at `offset`; and the end offset."""
    result = CompletionLogprobs()
    for token in tokens:
        text = tokenizer.decode([token.token_id])
        top = {tokenizer.decode([tid]): logprob for tid, logprob in token.top_logprobs or ()}
        if token.logprob is not None:
            top.setdefault(text, token.logprob)
        result.tokens.append(text)
        result.token_logprobs.append(token.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(token.text)
    return result, offset


def _finish_reason(reason: FinishReason | str | None) -> Literal["stop", "length"]:
    """OpenAI's finish reasons: "length" for a length limit, "stop" for every other end."""
    value = reason.value if isinstance(reason, FinishReason) else reason
    return "length" if value == FinishReason.LENGTH.value else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep
) -> CompletionResponse | EventStreamResponse:
    """OpenAI's text completions, streamed (`stream: true`) or not, with vLLM's extensions.

    Not supported, and refused with a 400: `suffix`, `best_of` other than `n`, and `echo`
    together with `logprobs`.
    """
    submitted = await _submit(state, body)
    if body.stream:
        events = _completion_chunks(state, body, submitted, request)
        return EventStreamResponse(
            events,
            state.settings.keepalive_interval,
            on_close=lambda: abort_all(state.engine, submitted.streams),
        )
    results = await collect_until_disconnect(request.receive, state.engine, submitted.streams)
    choices = []
    for index, result in enumerate(results):
        prefix = submitted.echo_prefixes[index]
        logprobs = None
        if body.logprobs is not None:
            logprobs, _ = _logprobs(state.tokenizer, result.tokens, len(prefix))
        choices.append(
            CompletionChoice(
                index=index,
                text=prefix + result.text,
                logprobs=logprobs,
                finish_reason=_finish_reason(result.finish_reason),
            )
        )
    prompt_tokens = sum(result.num_prompt_tokens for result in results[:: body.n])
    completion_tokens = sum(result.num_output_tokens for result in results)
    record_usage(request.state, prompt_tokens, completion_tokens)
    return CompletionResponse(
        id=submitted.response_id,
        created=int(time.time()),
        model=state.model_name,
        choices=choices,
        usage=_usage(prompt_tokens, completion_tokens),
    )


async def _completion_chunks(
    state: AppState, body: CompletionRequest, submitted: Submitted, request: Request
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed completion, ending with `[DONE]` whatever happens."""
    created = int(time.time())
    num_choices = len(submitted.streams)
    offsets = [len(prefix) for prefix in submitted.echo_prefixes]
    echoed = [not prefix for prefix in submitted.echo_prefixes]
    prompt_tokens = [0] * num_choices
    completion_tokens = [0] * num_choices

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        response = CompletionResponse(
            id=submitted.response_id,
            created=created,
            model=state.model_name,
            choices=choices,
            usage=usage,
        )
        return format_event(response.model_dump(mode="json"))

    try:
        async with StreamGroup(state.engine, submitted.streams) as group:
            async for index, output in group:
                text = output.text
                if not echoed[index]:
                    text, echoed[index] = submitted.echo_prefixes[index] + text, True
                logprobs = None
                if body.logprobs is not None:
                    logprobs, offsets[index] = _logprobs(
                        state.tokenizer, output.tokens, offsets[index]
                    )
                prompt_tokens[index] = output.num_prompt_tokens
                completion_tokens[index] = output.num_output_tokens
                finish_reason = _finish_reason(output.finish_reason) if output.finished else None
                choice = CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=finish_reason
                )
                yield chunk([choice])
        usage = _usage(sum(prompt_tokens[:: body.n]), sum(completion_tokens))
        record_usage(request.state, usage.prompt_tokens, usage.completion_tokens)
        if body.include_usage:
            yield chunk([], usage)
    except Exception as exc:  # the stream has started: the error becomes an event
        yield error_event(exc, getattr(request.state, "request_id", None))
    yield DONE


@router.get("/models")
async def models(state: StateDep) -> ModelList:
    """The one model this server serves."""
    card = ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)
    return ModelList(data=[card])
