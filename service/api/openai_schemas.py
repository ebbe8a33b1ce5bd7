"""Bodies of the OpenAI-compatible /v1/completions and /v1/models, with vLLM's extensions.

Fields that OpenAI defines but this server cannot honour (`suffix`, `best_of` other than `n`)
are refused with a 400 naming them; fields neither OpenAI nor vLLM define are refused by
`extra="forbid"`. `echo` with `logprobs` returns the prompt's log-probabilities before the
generated ones, as OpenAI's legacy API and vLLM do; `max_tokens: 0` with `echo` only scores.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from model.validation import is_int
from service.api.schemas import SamplingFields, StrictModel, Usage
from service.engine.errors import InvalidRequestError
from service.engine.params import StopParams

MAX_N = 16
MAX_CHOICES = 128  # prompts x n: each is one engine request
DEFAULT_MAX_TOKENS = 16

Prompt = str | list[int]
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def normalize_prompts(value: object) -> list[Prompt]:
    """OpenAI's four prompt shapes as a list of prompts, each text or token ids."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"prompt must be {_PROMPT_SHAPES}, and not empty")
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(is_int(item) for item in value):
        return [list(value)]
    if all(isinstance(item, list) and item and all(map(is_int, item)) for item in value):
        return [list(item) for item in value]
    raise ValueError(f"prompt must be {_PROMPT_SHAPES}; lists must not be empty or mixed")


class StreamOptions(StrictModel):
    """Options of a streamed completion."""

    include_usage: bool = Field(False, description="send a last chunk with `usage`")


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions: OpenAI's fields, then vLLM's extensions (in SamplingFields:
    top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, prompt_logprobs,
    logprobs_mode, priority, include_stop_str_in_output), then this server's `timeout`."""

    model: str
    prompt: list[Prompt] = Field(description=_PROMPT_SHAPES)
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS,
        ge=0,
        description="tokens to generate; 0 with echo: score the prompt only; null: up to the "
        "context window",
    )
    n: int = Field(1, ge=1, le=MAX_N, description=f"completions per prompt, 1 to {MAX_N}")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="prepend the prompt (and its logprobs) to each choice")
    user: str | None = Field(default=None, description="accepted and ignored")
    best_of: int | None = Field(default=None, description="only null or equal to n is supported")
    suffix: str | None = Field(default=None, description="not supported; must be null")

    _normalize_prompt = field_validator("prompt", mode="before")(normalize_prompts)

    def check_supported(self) -> None:
        """Refuse what the fields' types allow but this server cannot do, naming the field."""
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
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError(
                "max_tokens 0 generates nothing: it scores the prompt, which only echo=true "
                "returns; set echo (with logprobs) or ask for at least one token",
                "max_tokens",
            )
        if self.logprobs_mode == "raw_and_processed_logprobs":
            raise InvalidRequestError(
                "logprobs_mode raw_and_processed_logprobs is served by /generate and /stream; "
                "the completions API takes raw_logprobs or processed_logprobs",
                "logprobs_mode",
            )
        self.check_min_tokens("max_tokens", self.max_tokens)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token to compute: for echo with logprobs, and for vLLM's
        prompt_logprobs."""
        wanted = [n for n in (self.prompt_logprobs,) if n is not None]
        if self.echo and self.logprobs is not None:
            wanted.append(self.logprobs)
        return max(wanted) if wanted else None

    def to_stop_params(self) -> StopParams:
        """The engine's stop conditions."""
        return self.stop_params(self.max_tokens)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float | None] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "timeout"] | None = None
    prompt_logprobs: list[dict[str, dict[str, object]] | None] | None = Field(
        default=None,
        description="vLLM's: per prompt token, token id -> logprob, rank, decoded_token",
    )


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
