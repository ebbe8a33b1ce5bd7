"""Iteration-level scheduling in plain Python: who runs in the next forward step.

Every step runs one decode token for each request whose prompt is cached, plus prompt work
(new prompts and the rest of long ones) up to a token budget, so a long prompt is split into
chunks instead of freezing everyone else's stream. Waiting requests are admitted first come,
first served into free cache slots between steps.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from service.engine.errors import QueueFullError
from service.engine.request import Request, RequestStatus


@dataclass
class PrefillChunk:
    """A run of prompt tokens of one request to put through the model this step."""

    request: Request
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        """Whether this chunk reaches the end of the prompt, so a first token is sampled."""
        return self.start + self.length >= self.request.num_prompt_tokens


@dataclass
class SchedulerOutput:
    """The work of one step."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to run."""
        return not self.prefills and not self.decodes

    @property
    def num_rows(self) -> int:
        """Requests in this step."""
        return len(self.prefills) + len(self.decodes)


class Scheduler:
    """A bounded waiting queue, a running set, and the free cache slots."""

    def __init__(self, num_slots: int, max_waiting: int, max_prefill_tokens: int) -> None:
        if num_slots < 1 or max_waiting < 0 or max_prefill_tokens < 1:
            raise ValueError(
                "num_slots and max_prefill_tokens must be >= 1 and max_waiting >= 0, got "
                f"{num_slots}, {max_prefill_tokens} and {max_waiting}"
            )
        self.num_slots = num_slots
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self._free_slots = list(range(num_slots))  # a min-heap: low slots first keeps rows dense
        self._by_id: dict[str, Request] = {}

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a slot."""
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        """Cache slots nobody holds."""
        return len(self._free_slots)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue a request, or fail at once with QueueFullError when the queue is full."""
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # Requests that the next step admits straight into a free slot do not really wait.
        if len(self.waiting) >= self.max_waiting + len(self._free_slots):
            raise QueueFullError(
                f"the waiting queue is full ({self.max_waiting} requests); retry later"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def get(self, request_id: str) -> Request | None:
        """The live (waiting or running) request with this id."""
        return self._by_id.get(request_id)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's decode rows and prompt chunks, admitting waiting requests."""
        out = SchedulerOutput()
        budget = self.max_prefill_tokens
        for request in self.running:
            if request.is_prefill_done:
                out.decodes.append(request)
            elif budget > 0:
                budget -= self._add_chunk(out, request, budget)
        now = time.monotonic()
        while self.waiting and self._free_slots and budget > 0:
            request = self.waiting.popleft()
            request.slot = heapq.heappop(self._free_slots)
            request.status = RequestStatus.RUNNING
            request.first_scheduled_time = now
            self.running.append(request)
            budget -= self._add_chunk(out, request, budget)
        return out

    @staticmethod
    def _add_chunk(out: SchedulerOutput, request: Request, budget: int) -> int:
        start = request.num_computed_tokens
        length = min(request.num_prompt_tokens - start, budget)
        out.prefills.append(PrefillChunk(request, start, length))
        return length

    def finish(self, request: Request) -> None:
        """Take a request out (finished, aborted or failed) and free its slot at once."""
        if self._by_id.pop(request.request_id, None) is None:
            return
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
            if request.slot is not None:
                heapq.heappush(self._free_slots, request.slot)
        request.status = RequestStatus.FINISHED
        request.finish_time = time.monotonic()
