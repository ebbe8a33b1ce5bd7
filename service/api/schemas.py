"""Request and response bodies of /generate, /stream, /tokenize and /detokenize, and the
sampling fields every generation route shares.

Request schemas check types (strictly: `"5"` is not a number) and the ranges that name their own
fields; the ranges of the sampling settings are checked once, by `SamplingParams`, when a schema
converts itself. Text that cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800",
which JSON allows) is refused in any field, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.sampling_params import LOGPROBS_MODES, MAX_LOGPROBS, SamplingParams
from service.engine.errors import InvalidRequestError
from service.engine.params import StopParams

DEFAULT_MAX_NEW_TOKENS = 64
LogprobsMode = Literal["raw_logprobs", "processed_logprobs", "raw_and_processed_logprobs"]
assert set(LogprobsMode.__args__) == set(LOGPROBS_MODES)  # type: ignore[attr-defined]


def check_encodable(value: Any) -> Any:
    """Refuse strings (and mapping keys) that UTF-8 cannot encode, such as lone surrogates."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "the text holds a lone surrogate (such as \\ud800) that is not a character; "
                "send valid Unicode"
            ) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_encodable(key)
            check_encodable(item)
    elif isinstance(value, list | tuple):
        for item in value:
            check_encodable(item)
    return value


class StrictModel(BaseModel):
    """A request body: unknown fields, loosely typed values and unencodable text are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    _check_text = field_validator("*", mode="before")(check_encodable)


def parse_logit_bias(logit_bias: Mapping[str, float] | None) -> dict[int, float] | None:
    """JSON object keys are strings: turn `{"50256": -100}` into `{50256: -100.0}`."""
    if logit_bias is None:
        return None
    parsed: dict[int, float] = {}
    for key, bias in logit_bias.items():
        try:
            parsed[int(key)] = bias
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                "logit_bias",
            ) from None
    return parsed


def check_stop(value: object) -> object:
    """`stop` must be a string or a list of strings (the engine checks counts and lengths)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError("stop must be a string or a list of strings")


def check_token_prompt(value: object) -> object:
    """/generate's prompt must be a string or a non-empty list of token ids."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    ):
        return value
    raise ValueError("prompt must be a string or a non-empty list of token ids")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple, whether it came as one string or a list."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def derive_seed(seed: int | None, index: int) -> int | None:
    """The seed of the `index`-th sample of a request, so n seeded samples differ from each other."""
    if seed is None or index == 0:
        return seed
    return (seed + index) % 2**63


class SamplingFields(StrictModel):
    """The sampling, stop and scheduling fields every generation route takes, with vLLM's
    names and meanings; `null` for a number means its default."""

    temperature: float | None = Field(1.0, description="0 is greedy; [0, 100]")
    top_k: int = Field(0, description="keep the k most likely tokens; 0 or -1: off")
    top_p: float | None = Field(1.0, description="nucleus sampling mass, (0, 1]; 1: off")
    min_p: float = Field(0.0, description="drop tokens below min_p x the top probability; [0, 1]")
    repetition_penalty: float = Field(1.0, description="> 0; 1: off")
    presence_penalty: float | None = Field(0.0, description="[-2, 2]")
    frequency_penalty: float | None = Field(0.0, description="[-2, 2]")
    logit_bias: dict[str, float] | None = Field(
        default=None, description='added to the logits: {"token id": bias in [-100, 100]}'
    )
    seed: int | None = Field(default=None, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(
        default=None, description="stop strings; the text ends before the first one found"
    )
    stop_token_ids: list[int] | None = Field(
        default=None, description="token ids that end generation"
    )
    ignore_eos: bool = Field(False, description="keep generating past end-of-text")
    min_tokens: int = Field(0, ge=0, description="tokens to generate before any stop condition")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="return each token's log-probability and this many alternatives (0-20)",
    )
    logprobs_mode: LogprobsMode | None = Field(
        default=None,
        description="raw_logprobs: the model's softmax; processed_logprobs: the distribution the "
        "token was drawn from (after bias, penalties, temperature, top-k/top-p/min-p, "
        "renormalised); raw_and_processed_logprobs (/generate and /stream): raw, each with "
        "its processed value beside it; default: the server's --logprobs-mode",
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="return each prompt token's log-probability given the tokens before it, "
        "with this many alternatives (0-20); the first token has none",
    )
    priority: int = Field(0, description="scheduling priority: lower values go first")
    speculative: bool | None = Field(
        default=None,
        description="decode with guessed tokens checked in one pass, where the server has "
        "--speculative-method (the default there); false opts out",
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="seconds the request may wait and run in all; then it ends with "
        "finish_reason 'timeout'; default: the server's --request-timeout",
    )

    _check_stop = field_validator("stop", mode="before")(check_stop)

    def to_sampling_params(
        self, index: int = 0, default_mode: str = "raw_logprobs"
    ) -> SamplingParams:
        """The engine's sampling settings for sample `index` of this request."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=parse_logit_bias(self.logit_bias),
            seed=derive_seed(self.seed, index),
            logprobs=self.logprobs,
            logprobs_mode=self.logprobs_mode or default_mode,
        )

    def stop_params(self, max_new_tokens: int | None) -> StopParams:
        """The engine's stop conditions, with the route's own token limit."""
        return StopParams(
            max_new_tokens=max_new_tokens,
            stop=stop_strings(self.stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    def check_min_tokens(self, limit_name: str, limit: int | None) -> None:
        """min_tokens may not exceed the route's token limit (named as the route names it)."""
        if limit is not None and self.min_tokens > limit:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed {limit_name} ({limit})",
                "min_tokens",
            )


class GenerateRequest(SamplingFields):
    """Body of /generate and /stream."""

    prompt: str | list[int] = Field(description="text, or a list of token ids")
    max_new_tokens: int | None = Field(
        DEFAULT_MAX_NEW_TOKENS,
        ge=0,
        description="tokens to generate at most; 0: score the prompt only (with prompt_logprobs); "
        "null: up to the context window",
    )

    _check_prompt = field_validator("prompt", mode="before")(check_token_prompt)

    def to_stop_params(self) -> StopParams:
        """The engine's stop conditions for this request."""
        self.check_min_tokens("max_new_tokens", self.max_new_tokens)
        return self.stop_params(self.max_new_tokens)


class PromptTokensDetails(BaseModel):
    """Where the prompt's tokens came from."""

    cached_tokens: int = Field(description="prompt tokens reused from the prefix cache")


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        """Counts with their total."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class TopLogprob(BaseModel):
    """One alternative for a position."""

    token_id: int
    token: str
    logprob: float | None
    processed_logprob: float | None = Field(
        default=None,
        description="with raw_and_processed_logprobs: its log-probability in the distribution "
        "sampled from; null when the request's filters cut it off",
    )


class TokenLogprob(BaseModel):
    """A token's log-probability and the most likely alternatives at its position."""

    token_id: int
    token: str
    logprob: float | None
    processed_logprob: float | None = None
    processed_top_logprobs: list[TopLogprob] | None = Field(
        default=None,
        description="with raw_and_processed_logprobs: the most likely tokens of the distribution "
        "sampled from (which penalties and bias can reorder), cut-off tokens left out",
    )
    rank: int | None = Field(default=None, description="prompt tokens: 1 for the most likely token")
    top_logprobs: list[TopLogprob] | None = None


class GenerateResponse(BaseModel):
    """Body of a /generate answer."""

    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = Field(
        default=None, description="one entry per prompt token; the first has logprob null"
    )


class TokenizeRequest(StrictModel):
    """Body of /tokenize."""

    prompt: str = Field(description="text to encode")


class TokenizeResponse(BaseModel):
    """Body of a /tokenize answer."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(StrictModel):
    """Body of /detokenize."""

    tokens: list[int] = Field(description="token ids to decode")


class DetokenizeResponse(BaseModel):
    """Body of a /detokenize answer."""

    prompt: str
