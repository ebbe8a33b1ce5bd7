"""Per-request settings beyond sampling: how long to generate and when to stop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from model.validation import is_int
from service.engine.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LENGTH = 256


@dataclass(frozen=True)
class StopParams:
    """Stop conditions, checked after every generated token.

    `max_new_tokens=None` means up to the model's context window; 0 computes the prompt (and
    its log-probabilities, when asked) and generates nothing.
    """

    max_new_tokens: int | None = 16
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and (
            not is_int(self.max_new_tokens) or self.max_new_tokens < 0
        ):
            raise InvalidRequestError(
                f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}",
                "max_new_tokens",
            )
        if not is_int(self.min_tokens):
            raise InvalidRequestError("min_tokens must be an integer", "min_tokens")
        if self.min_tokens < 0 or (
            self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens
        ):
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_new_tokens], got {self.min_tokens}", "min_tokens"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        for text in self.stop:
            if not isinstance(text, str) or not 1 <= len(text) <= MAX_STOP_STRING_LENGTH:
                raise InvalidRequestError(
                    f"each stop string must be 1 to {MAX_STOP_STRING_LENGTH} characters",
                    "stop",
                )
        for token_id in self.stop_token_ids:
            if not is_int(token_id) or token_id < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must be non-negative token ids, got {token_id!r}",
                    "stop_token_ids",
                )
