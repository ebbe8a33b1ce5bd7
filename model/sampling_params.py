"""Per-request sampling settings, validated once when they are built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from model.validation import is_int, is_number

MAX_TEMPERATURE = 100.0
# Temperatures below this decode greedily, as in vLLM: dividing logits by them would overflow
# float32, and the distribution is already a point mass at that scale.
GREEDY_TEMPERATURE = 1e-5
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
MAX_LOGPROBS = 20
# Which distribution log-probabilities describe (vLLM's names, plus both at once): the model's
# own softmax, or the one the token was drawn from, after bias, penalties, temperature and the
# top-k / top-p / min-p cuts, renormalised.
RAW_LOGPROBS = "raw_logprobs"
PROCESSED_LOGPROBS = "processed_logprobs"
RAW_AND_PROCESSED_LOGPROBS = "raw_and_processed_logprobs"
LOGPROBS_MODES = (RAW_LOGPROBS, PROCESSED_LOGPROBS, RAW_AND_PROCESSED_LOGPROBS)
# The range torch.Generator.manual_seed accepts.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Range:
    """Where a number may lie; `None` is unbounded on that side."""

    minimum: int | float | None
    maximum: int | float | None
    exclusive_minimum: bool = False


# Every range SamplingParams checks, in one table (clients read it through GET /v1/config).
SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(0.0, MAX_TEMPERATURE),
    "top_k": Range(-1, None),
    "top_p": Range(0.0, 1.0, exclusive_minimum=True),
    "min_p": Range(0.0, 1.0),
    "repetition_penalty": Range(0.0, None, exclusive_minimum=True),
    "presence_penalty": Range(-MAX_ABS_PENALTY, MAX_ABS_PENALTY),
    "frequency_penalty": Range(-MAX_ABS_PENALTY, MAX_ABS_PENALTY),
    "logit_bias": Range(-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS),
    "seed": Range(MIN_SEED, MAX_SEED),
    "logprobs": Range(0, MAX_LOGPROBS),
}


class SamplingParamsError(ValueError):
    """A sampling parameter has the wrong type or lies outside its valid range."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _invalid(param: str, expected: str, value: object) -> SamplingParamsError:
    return SamplingParamsError(param, f"{param} must be {expected}, got {value!r}")


def _number_in(param: str, value: object, expected: str, low: float, high: float) -> float:
    """Return `value` as a float if it is a finite number in [low, high], else raise."""
    if not is_number(value):
        raise _invalid(param, expected, value)
    number = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(number) and low <= number <= high):
        raise _invalid(param, expected, value)
    return number


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token; every field is checked in `__post_init__`.

    Ranges: temperature [0, 100] (0, or anything below 1e-5, is greedy); top_k >= 1, with 0 or -1
    meaning off; top_p (0, 1], 1 = off; min_p [0, 1], 0 = off; repetition_penalty > 0, 1 = off;
    presence_penalty and frequency_penalty [-2, 2]; logit_bias values [-100, 100] keyed by
    non-negative token ids; seed an integer in [-2**63, 2**64 - 1]; logprobs 0..20 or None;
    logprobs_mode one of LOGPROBS_MODES.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # copied in __post_init__, so later edits to the caller's dict do not leak in; left out of
    # the hash so the params stay hashable
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)
    seed: int | None = None
    logprobs: int | None = None
    logprobs_mode: str = RAW_LOGPROBS

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # the dataclass is frozen; store normalised values
        set_field(
            self,
            "temperature",
            _number_in(
                "temperature", self.temperature, "a number in [0, 100]", 0.0, MAX_TEMPERATURE
            ),
        )
        if not is_int(self.top_k) or self.top_k < -1:
            raise _invalid("top_k", "an integer >= 1, or 0 or -1 for no limit", self.top_k)
        set_field(self, "top_k", int(self.top_k))
        set_field(self, "top_p", _number_in("top_p", self.top_p, "a number in (0, 1]", 0.0, 1.0))
        if self.top_p == 0.0:
            raise _invalid("top_p", "a number in (0, 1]", self.top_p)
        set_field(self, "min_p", _number_in("min_p", self.min_p, "a number in [0, 1]", 0.0, 1.0))
        repetition = _number_in(
            "repetition_penalty", self.repetition_penalty, "a finite number > 0", 0.0, math.inf
        )
        if repetition == 0.0:
            raise _invalid("repetition_penalty", "a finite number > 0", self.repetition_penalty)
        set_field(self, "repetition_penalty", repetition)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number_in(
                name, getattr(self, name), "a number in [-2, 2]", -MAX_ABS_PENALTY, MAX_ABS_PENALTY
            )
            set_field(self, name, value)
        set_field(self, "logit_bias", self._checked_logit_bias())
        if self.seed is not None:
            if not is_int(self.seed) or not MIN_SEED <= self.seed <= MAX_SEED:
                raise _invalid("seed", "an integer in [-2**63, 2**64 - 1] or None", self.seed)
            set_field(self, "seed", int(self.seed))
        if self.logprobs is not None:
            if not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise _invalid("logprobs", "an integer in [0, 20] or None", self.logprobs)
            set_field(self, "logprobs", int(self.logprobs))
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise _invalid(
                "logprobs_mode", f"one of {', '.join(LOGPROBS_MODES)}", self.logprobs_mode
            )

    def _checked_logit_bias(self) -> Mapping[int, float] | None:
        """Validate logit_bias and return a copy (a plain dict, so params pickle and deep-copy)."""
        if self.logit_bias is None:
            return None
        if not isinstance(self.logit_bias, Mapping):
            raise _invalid("logit_bias", "a mapping of token id to bias, or None", self.logit_bias)
        checked: dict[int, float] = {}
        for token_id, bias in self.logit_bias.items():
            if not is_int(token_id) or token_id < 0:
                raise _invalid("logit_bias", "keyed by non-negative integer token ids", token_id)
            checked[int(token_id)] = _number_in(
                "logit_bias",
                bias,
                f"a number in [-100, 100] (token {token_id})",
                -MAX_ABS_LOGIT_BIAS,
                MAX_ABS_LOGIT_BIAS,
            )
        return checked

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Raise SamplingParamsError if logit_bias names a token id outside [0, vocab_size)."""
        for token_id in self.logit_bias or {}:
            if token_id >= vocab_size:
                raise _invalid("logit_bias", f"keyed by token ids in [0, {vocab_size})", token_id)

    @property
    def is_greedy(self) -> bool:
        """Whether this request always takes the most likely token."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """Whether any of the repetition, presence or frequency penalties is on."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def uses_truncation(self) -> bool:
        """Whether top-k, top-p or min-p removes any tokens before sampling."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def num_logprobs(self) -> int:
        """How many top alternatives to report (0 when logprobs is None)."""
        return self.logprobs or 0

    @property
    def wants_raw_logprobs(self) -> bool:
        """Whether log-probabilities under the model's own softmax are asked for."""
        return self.logprobs is not None and self.logprobs_mode != PROCESSED_LOGPROBS

    @property
    def wants_processed_logprobs(self) -> bool:
        """Whether log-probabilities under the distribution sampled from are asked for."""
        return self.logprobs is not None and self.logprobs_mode != RAW_LOGPROBS
