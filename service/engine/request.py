"""All of one request's state, from arrival to finish."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.sampling import SamplingParams
from service.engine.params import StopParams

if TYPE_CHECKING:
    from model.detokenizer import IncrementalDetokenizer
    from service.engine.errors import EngineError


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended, with the OpenAI API's names where it has them."""

    STOP = "stop"  # end-of-text, a stop string or a stop token
    LENGTH = "length"  # max_new_tokens or the context window
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # the engine failed while running it


@dataclass
class TokenOutput:
    """One generated token as the client sees it."""

    token_id: int
    text: str  # the text this token released (may be "" while a character is incomplete)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class RequestOutput:
    """One event on a request's output stream: new tokens, and at the end why it finished."""

    request_id: str
    tokens: list[TokenOutput]
    text: str  # new text in this event (the concatenation over events is the output text)
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: EngineError | None = None


@dataclass(eq=False)
class Request:
    """A request's state; the scheduler, runner and output processing all work on it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopParams
    max_total_tokens: int  # prompt + output may not exceed this (context window or max_new_tokens)
    sink: Callable[[RequestOutput], None] = field(repr=False)  # where its outputs go
    detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    num_emitted_chars: int = 0  # of output_text already sent (the rest may be a stop-string prefix)
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt in tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefill_done(self) -> bool:
        """Whether the whole prompt is in the cache, so the request decodes one token a step."""
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """Whether the request has ended, for whatever reason."""
        return self.status is RequestStatus.FINISHED

    def final_output(self, error: EngineError | None = None) -> RequestOutput:
        """The last event of a request that ends without a new token (abort, failure)."""
        return RequestOutput(
            request_id=self.request_id,
            tokens=[],
            text="",
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            finished=True,
            finish_reason=self.finish_reason,
            error=error,
        )

    def token_at(self, index: int) -> int:
        """The token at `index` of prompt followed by output."""
        prompt = self.prompt_token_ids
        return prompt[index] if index < len(prompt) else self.output_token_ids[index - len(prompt)]
