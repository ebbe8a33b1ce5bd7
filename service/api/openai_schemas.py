"""Bodies of the OpenAI-compatible /v1/completions and /v1/models, with vLLM's extensions.

Fields that OpenAI defines but this server cannot honour (`suffix`, `best_of` other than `n`,
`echo` with `logprobs`) are refused with a 400 naming them; fields OpenAI does not define are
refused by `extra="forbid"`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from model.sampling_params import SamplingParams
from service.api.schemas import (
    StrictModel,
    Usage,
    check_stop,
    derive_seed,
    parse_logit_bias,
    stop_strings,
)
from service.engine.errors import InvalidRequestError
from service.engine.params import StopParams

MAX_N = 16
MAX_CHOICES = 128  # prompts x n: each is one engine request
DEFAULT_MAX_TOKENS = 16

Prompt = str | list[int]
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_prompts(value: object) -> list[Prompt]:
    """OpenAI's four prompt shapes as a list of prompts, each text or token ids."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"prompt must be {_PROMPT_SHAPES}, and not empty")
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(_is_token_id(item) for item in value):
        return [list(value)]
    if all(isinstance(item, list) and item and all(map(_is_token_id, item)) for item in value):
        return [list(item) for item in value]
    raise ValueError(f"prompt must be {_PROMPT_SHAPES}; lists must not be empty or mixed")


class StreamOptions(StrictModel):
    """Options of a streamed completion."""

    include_usage: bool = Field(False, description="send a last chunk with `usage`")


class CompletionRequest(StrictModel):
    """Body of POST /v1/completions."""

    model: str
    prompt: list[Prompt] = Field(description=_PROMPT_SHAPES)
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS, description="tokens to generate; null: up to the context window"
    )
    temperature: float | None = Field(1.0, description="0 is greedy; [0, 100]")
    top_p: float | None = Field(1.0, description="(0, 1]")
    n: int = Field(1, description=f"completions per prompt, 1 to {MAX_N}")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="sample i of n uses seed + i")
    logprobs: int | None = Field(None, description="alternatives per token, 0 to 20")
    echo: bool = Field(False, description="prepend the prompt to each completion")
    presence_penalty: float | None = Field(0.0, description="[-2, 2]")
    frequency_penalty: float | None = Field(0.0, description="[-2, 2]")
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, description="accepted and ignored")
    best_of: int | None = Field(None, description="only null or equal to n is supported")
    suffix: str | None = Field(None, description="not supported; must be null")
    # vLLM's extensions
    top_k: int = Field(0, description="0 or -1: off")
    min_p: float = Field(0.0, description="[0, 1]")
    repetition_penalty: float = Field(1.0, description="> 0; 1: off")
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False

    _normalize_prompt = field_validator("prompt", mode="before")(normalize_prompts)
    _check_stop = field_validator("stop", mode="before")(check_stop)

    def check_supported(self) -> None:
        """Refuse what the fields' types allow but this server cannot do, naming the field."""
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be an integer in [1, {MAX_N}], got {self.n}", "n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be an integer >= 1 or null, got {self.max_tokens}", "max_tokens"
            )
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise InvalidRequestError(
                f"prompts x n must be at most {MAX_CHOICES}, got {len(self.prompt) * self.n}",
                "prompt",
            )
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported (no text insertion)", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported unless it equals n", "best_of")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options needs stream=true", "stream_options")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs is not supported: this server does not compute prompt "
                "log-probabilities",
                "echo",
            )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, index: int = 0) -> SamplingParams:
        """The engine's sampling settings for choice `index` of a prompt."""
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
        )

    def to_stop_params(self) -> StopParams:
        """The engine's stop conditions; errors name OpenAI's `max_tokens`."""
        try:
            return StopParams(
                max_new_tokens=self.max_tokens,
                stop=stop_strings(self.stop),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
            )
        except InvalidRequestError as exc:
            message = str(exc).replace("max_new_tokens", "max_tokens")
            param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
            raise InvalidRequestError(message, param) from None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """Body of a /v1/completions answer, and of each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """One entry of /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptserve"
    max_model_len: int


class ModelList(BaseModel):
    """Body of /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
