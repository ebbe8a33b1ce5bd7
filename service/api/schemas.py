"""Request and response bodies of /generate, /stream, /tokenize and /detokenize.

Request schemas check types (strictly: `"5"` is not a number); the ranges of sampling and stop
fields are checked once, by `SamplingParams` and `StopParams`, when a schema converts itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.sampling_params import SamplingParams
from service.engine.errors import InvalidRequestError
from service.engine.params import StopParams

DEFAULT_MAX_NEW_TOKENS = 64


class StrictModel(BaseModel):
    """A request body: unknown fields and loosely typed values are errors, not silence."""

    model_config = ConfigDict(extra="forbid", strict=True)


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
    """Sampling and stop fields shared by /generate and /stream (vLLM's names and meanings)."""

    temperature: float = Field(1.0, description="0 is greedy; [0, 100]")
    top_k: int = Field(0, description="keep the k most likely tokens; 0 or -1: off")
    top_p: float = Field(1.0, description="nucleus sampling mass, (0, 1]; 1: off")
    min_p: float = Field(0.0, description="drop tokens below min_p x the top probability; [0, 1]")
    repetition_penalty: float = Field(1.0, description="> 0; 1: off")
    presence_penalty: float = Field(0.0, description="[-2, 2]")
    frequency_penalty: float = Field(0.0, description="[-2, 2]")
    logit_bias: dict[str, float] | None = Field(
        None, description='added to the logits: {"token id": bias in [-100, 100]}'
    )
    seed: int | None = Field(None, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(
        None, description="stop strings; the text ends before the first one found"
    )
    stop_token_ids: list[int] | None = Field(None, description="token ids that end generation")
    ignore_eos: bool = Field(False, description="keep generating past end-of-text")
    min_tokens: int = Field(0, description="tokens to generate before any stop condition")
    logprobs: int | None = Field(
        None, description="return the log-probability of each token and this many alternatives"
    )

    _check_stop = field_validator("stop", mode="before")(check_stop)

    def to_sampling_params(self, index: int = 0) -> SamplingParams:
        """The engine's sampling settings for sample `index` of this request."""
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=parse_logit_bias(self.logit_bias),
            seed=derive_seed(self.seed, index),
            logprobs=self.logprobs,
        )


class GenerateRequest(SamplingFields):
    """Body of /generate and /stream."""

    prompt: str | list[int] = Field(description="text, or a list of token ids")
    max_new_tokens: int | None = Field(
        DEFAULT_MAX_NEW_TOKENS,
        description="tokens to generate at most; null: up to the context window",
    )

    _check_prompt = field_validator("prompt", mode="before")(check_token_prompt)

    def to_stop_params(self) -> StopParams:
        """The engine's stop conditions for this request."""
        return StopParams(
            max_new_tokens=self.max_new_tokens,
            stop=stop_strings(self.stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
        )


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    """One alternative for a position."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """A generated token's log-probability and the most likely alternatives."""

    token_id: int
    token: str
    logprob: float | None
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
