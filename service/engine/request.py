"""All of one request's state, from arrival to finish."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.sampling import SamplingParams
from service.engine.params import StopParams

if TYPE_CHECKING:
    from model.detokenizer import IncrementalDetokenizer
    from service.engine.errors import EngineError

# Arrival order, for first-come-first-served among equals (monotonic clocks can tie).
_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended, with the OpenAI API's names where it has them."""

    STOP = "stop"  # end-of-text, a stop string or a stop token
    LENGTH = "length"  # max_new_tokens or the context window
    TIMEOUT = "timeout"  # its deadline passed while it waited or ran
    ABORT = "abort"  # cancelled by the client (or by the server shutting down)
    STALLED = "stalled"  # the client stopped reading its stream for too long
    ERROR = "error"  # the engine failed while running it


@dataclass
class TopLogprobs:
    """The most likely tokens of one position, with their log-probabilities, descending."""

    token_ids: list[int]
    logprobs: list[float]
    # With both raw and processed asked: the processed log-probability of each of `token_ids`
    # (-inf for a candidate that the request's filters cut off).
    processed_logprobs: list[float] | None = None

    def first(self, count: int) -> TopLogprobs:
        """The `count` most likely of these (itself when it holds no more)."""
        if len(self.token_ids) <= count:
            return self
        processed = self.processed_logprobs
        return TopLogprobs(
            self.token_ids[:count],
            self.logprobs[:count],
            processed[:count] if processed is not None else None,
        )


@dataclass
class TokenOutput:
    """One generated token as the client sees it."""

    token_id: int
    text: str  # the text this token released (may be "" while a character is incomplete)
    logprob: float | None = None  # under the request's logprobs_mode (raw unless processed)
    top_logprobs: TopLogprobs | None = None
    processed_logprob: float | None = None  # only with raw_and_processed_logprobs
    processed_top_logprobs: TopLogprobs | None = None  # idem: the processed distribution's top


@dataclass
class PromptLogprob:
    """Log-probability of one prompt token given the tokens before it (None for the first)."""

    token_id: int
    logprob: float | None
    top_logprobs: TopLogprobs | None = None
    rank: int | None = None  # 1 for the most likely token (None for the first prompt token)


@dataclass
class RequestOutput:
    """One event on a request's output stream: new tokens, and at the end why it finished.

    `prompt_logprobs` comes once, on the first event, when the request asked for them.
    """

    request_id: str
    tokens: list[TokenOutput]
    text: str  # new text in this event (the concatenation over events is the output text)
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: EngineError | None = None
    prompt_logprobs: list[PromptLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed


@dataclass(eq=False)
class Request:
    """A request's state; the scheduler, runner and output processing all work on it.

    Its tokens are the prompt followed by the output; `num_computed_tokens` of them have keys
    and values in its cache slot. A step feeds the next uncomputed tokens, and when that reaches
    the last known token, a new one is sampled (so decoding is a one-token chunk, and a request
    that lost its slot recomputes its prompt and output the same way).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopParams
    max_total_tokens: int  # prompt + output may not exceed this (context window or max_new_tokens)
    sink: Callable[[RequestOutput], None] = field(repr=False)  # where its outputs go
    detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)
    # Scheduling: lower priority values go first (vLLM); then clients holding fewer slots; then
    # arrival. A group is one API request (its n choices); it may hold at most `max_slots`.
    priority: int = 0
    client_id: str = ""
    group_id: str = ""
    deadline: float | None = None  # time.monotonic() by which it must have finished
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: not asked
    prompt_logprob_ranks: bool = False  # also each prompt token's rank (a pass over the vocab)
    speculative: bool = False  # may decode with guessed tokens checked in one pass
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    is_paused: bool = False  # its reader is behind: it keeps its slot but takes no steps
    was_scheduled: bool = False  # has held a slot (it may have lost it since, to preemption)
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    num_cached_tokens: int = 0  # of the prompt, reused from a cache slot instead of computed
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    num_emitted_chars: int = 0  # of output_text already sent (the rest may be a stop-string prefix)
    prompt_logprob_entries: list[PromptLogprob] = field(default_factory=list, repr=False)
    is_prompt_logprobs_sent: bool = False
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    @property
    def held_slot(self) -> int:
        """The cache slot of a scheduled request (an error if it holds none)."""
        if self.slot is None:
            raise RuntimeError(f"request {self.request_id} is scheduled without a cache slot")
        return self.slot

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
    def max_new_tokens(self) -> int:
        """Tokens this request may generate in all."""
        return self.max_total_tokens - len(self.prompt_token_ids)

    @property
    def num_feed_tokens(self) -> int:
        """Tokens to put through the model: all of them, but the last prompt token of a request
        that only scores its prompt (max_new_tokens 0): it is scored, never an input, so such a
        prompt may be one token longer than the context window."""
        if self.max_total_tokens == len(self.prompt_token_ids) > 1:
            return len(self.prompt_token_ids) - 1
        return self.num_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens to feed whose keys and values are not in the cache yet (1 while decoding)."""
        return self.num_feed_tokens - self.num_computed_tokens

    @property
    def is_prefill_done(self) -> bool:
        """Whether everything but the last sampled token is in the cache (one token a step)."""
        return self.num_computed_tokens >= self.num_tokens - 1 and bool(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """Whether the request has ended, for whatever reason."""
        return self.status is RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt log-probabilities were asked for and are not all known yet."""
        return (
            self.prompt_logprobs is not None
            and len(self.prompt_logprob_entries) < self.num_prompt_tokens
        )

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
            num_cached_tokens=self.num_cached_tokens,
        )

    def token_at(self, index: int) -> int:
        """The token at `index` of prompt followed by output."""
        prompt = self.prompt_token_ids
        return prompt[index] if index < len(prompt) else self.output_token_ids[index - len(prompt)]

    def tokens_between(self, start: int, end: int) -> list[int]:
        """The tokens at [start, end) of prompt followed by output."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_token_ids)[start:end]
