"""OpenAI-compatible POST /v1/completions and GET /v1/models.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API; each choice is one engine
request. Token texts in `logprobs` are each token decoded alone; `text_offset` indexes into the
choice's text (echoed prompt included). With `echo` and `logprobs`, the prompt's tokens come
first in `logprobs`, the first of them with a null log-probability (nothing comes before it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from service.api.dependencies import AppState, StateDep
from service.api.errors import APIError
from service.api.generation import (
    Completion,
    collect_until_disconnect,
    encode_prompt,
    idle_outputs,
    submit,
)
from service.api.logprobs import LegacyLogprobs, vllm_prompt_logprobs
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
from service.api.sse import DONE, KEEPALIVE, EventStreamResponse, error_event, format_event
from service.engine.async_engine import RequestGroup, RequestSpec
from service.engine.request import FinishReason, PromptLogprob, RequestOutput

router = APIRouter(prefix="/v1", tags=["openai"])


@dataclass
class Submitted:
    """The engine requests of one completion request, and what shaping the answer needs."""

    response_id: str
    group: RequestGroup
    echo_texts: list[str]  # per choice: the prompt text when echo, else ""


async def _submit(state: AppState, body: CompletionRequest, http_request: Request) -> Submitted:
    body.check_supported()
    if body.model != state.model_name:
        raise APIError(
            404,
            f"the model '{body.model}' does not exist; this server serves '{state.model_name}'",
            code="model_not_found",
            param="model",
        )
    stop = body.to_stop_params()
    mode = state.settings.logprobs_mode
    prompts = [await encode_prompt(state.tokenizer, prompt) for prompt in body.prompt]
    specs = [
        RequestSpec(
            prompt_ids,
            body.to_sampling_params(sample, default_mode=mode),
            stop,
            body.num_prompt_logprobs,
            prompt_logprob_ranks=body.prompt_logprobs is not None,  # vLLM's field shows ranks
            speculative=body.speculative,
        )
        for prompt_ids in prompts
        for sample in range(body.n)
    ]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    group = submit(
        state, http_request, specs, response_id, priority=body.priority, timeout=body.timeout
    )
    texts = [""] * len(specs)
    if body.echo:  # after submit: the engine has checked the token ids, so they decode
        try:
            decoded = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in body.prompt]
        except Exception:
            group.close()
            raise
        texts = [text for text in decoded for _ in range(body.n)]
    return Submitted(response_id, group, texts)


def _finish_reason(reason: FinishReason | str | None) -> str:
    """OpenAI's finish reasons: "length" for a length limit, "timeout" for a deadline (this
    server's), "stop" for every other end."""
    value = reason.value if isinstance(reason, FinishReason) else reason
    if value in (FinishReason.LENGTH.value, FinishReason.TIMEOUT.value):
        return value
    return "stop"


class _ChoiceShaper:
    """Turns one choice's outputs into OpenAI's text and logprobs, piece by piece."""

    def __init__(self, state: AppState, body: CompletionRequest, echo_text: str) -> None:
        self.state = state
        self.body = body
        self.echo_text = echo_text
        self.is_echoed = not body.echo
        self.offset = 0

    def piece(
        self, text: str, output: RequestOutput | Completion
    ) -> tuple[str, CompletionLogprobs | None]:
        """The text and logprobs of a piece (the first piece carries the echoed prompt)."""
        tokenizer = self.state.tokenizer
        legacy = LegacyLogprobs() if self.body.logprobs is not None else None
        if not self.is_echoed:
            self.is_echoed = True
            text = self.echo_text + text
            entries: list[PromptLogprob] | None = output.prompt_logprobs
            if legacy is not None and entries is not None:
                self.offset = legacy.add_prompt(tokenizer, entries, self.offset, self.body.logprobs)
            else:
                self.offset = len(self.echo_text)
        if legacy is None:
            return text, None
        self.offset = legacy.add_generated(tokenizer, output.tokens, self.offset)
        return text, CompletionLogprobs(**vars(legacy))

    def prompt_logprobs(self, output: RequestOutput | Completion) -> list | None:  # type: ignore[type-arg]
        """vLLM's prompt_logprobs, when the request asked for them by that name."""
        if self.body.prompt_logprobs is None or output.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(
            self.state.tokenizer, output.prompt_logprobs, self.body.prompt_logprobs
        )


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep
) -> CompletionResponse | EventStreamResponse:
    """OpenAI's text completions, streamed (`stream: true`) or not, with vLLM's extensions.

    `echo` with `logprobs` (and `max_tokens: 0` to score without generating) returns the
    prompt tokens' log-probabilities, as lm-evaluation-harness needs. Not supported, and refused
    with a 400: `suffix`, and `best_of` other than `n`.
    """
    submitted = await _submit(state, body, request)
    if body.stream:
        events = _completion_chunks(state, body, submitted, request)
        return EventStreamResponse(events, submitted.group)
    results = await collect_until_disconnect(request.receive, submitted.group)
    choices = []
    for index, result in enumerate(results):
        shaper = _ChoiceShaper(state, body, submitted.echo_texts[index])
        text, logprobs = shaper.piece(result.text, result)
        choices.append(
            CompletionChoice(
                index=index,
                text=text,
                logprobs=logprobs,
                finish_reason=_finish_reason(result.finish_reason),  # type: ignore[arg-type]
                prompt_logprobs=shaper.prompt_logprobs(result),
            )
        )
    usage = _usage(results, body.n)
    record_usage(request.state, usage.prompt_tokens, usage.completion_tokens)
    return CompletionResponse(
        id=submitted.response_id,
        created=int(time.time()),
        model=state.model_name,
        choices=choices,
        usage=usage,
    )


def _usage(results: list[Completion], n: int) -> Usage:
    """Prompt tokens count once per prompt, not once per choice."""
    per_prompt = results[::n]
    return Usage.of(
        sum(result.num_prompt_tokens for result in per_prompt),
        sum(result.num_output_tokens for result in results),
        sum(result.num_cached_tokens for result in per_prompt),
    )


async def _completion_chunks(
    state: AppState, body: CompletionRequest, submitted: Submitted, request: Request
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed completion, ending with `[DONE]` whatever happens."""
    created = int(time.time())
    num_choices = len(submitted.echo_texts)
    shapers = [_ChoiceShaper(state, body, text) for text in submitted.echo_texts]
    finals = [Completion() for _ in range(num_choices)]

    # Chunks are built as plain dicts in CompletionResponse's field order: this runs once per
    # token of every stream, where pydantic's model building costs more than the rest.
    head = {"id": submitted.response_id, "object": "text_completion", "created": created}
    head["model"] = state.model_name

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return format_event(
            {**head, "choices": choices, "usage": usage, "system_fingerprint": None}
        )

    try:
        async for item in idle_outputs(submitted.group, state.settings.keepalive_interval):
            if item is None:
                yield KEEPALIVE
                continue
            index, output = item
            finals[index].add(output)
            text, logprobs = shapers[index].piece(output.text, output)
            finish_reason = _finish_reason(output.finish_reason) if output.finished else None
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs.model_dump() if logprobs is not None else None,
                "finish_reason": finish_reason,
                "prompt_logprobs": shapers[index].prompt_logprobs(output),
            }
            yield chunk([choice])
        usage = _usage(finals, body.n)
        record_usage(request.state, usage.prompt_tokens, usage.completion_tokens)
        if body.include_usage:
            yield chunk([], usage.model_dump())
    except Exception as exc:  # the stream has started: the error becomes an event
        yield error_event(exc, getattr(request.state, "request_id", None))
    yield DONE


@router.get("/models")
async def models(state: StateDep) -> ModelList:
    """The one model this server serves."""
    card = ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)
    return ModelList(data=[card])
