"""Iteration-level scheduling in plain Python: who runs in the next forward step.

Every step runs one decode token for each running request whose tokens are cached, plus prompt
work (new prompts, the rest of long ones, requests recomputing after losing their slot) up to a
token budget, so a long prompt is split into chunks instead of freezing everyone else's stream.

Waiting requests get free slots in this order: lower `priority` first (vLLM's convention), then
the request whose client holds the fewest slots, then arrival. One API request (a group: its n
choices and prompts) holds at most `max_slots_per_group` slots at once; its other requests wait.
When no slot is free, a waiting request may take one from a running request that is clearly
less entitled to it (a paused one, a worse priority, or a client holding at least two more
slots): that request is preempted, keeps its output so far and recomputes its tokens later.
A new request whose prompt shares a prefix with one still being computed waits for it, so
n choices of one prompt compute the prompt once.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from service.engine.request import Request, RequestStatus
from service.engine.slot_pool import SlotPool

# A waiting request longer than this defers to a running one whose uncomputed prompt shares
# more of its prefix than any slot holds now (it waits at most that prompt's prefill).
MIN_DEFERRING_PROMPT = 16


@dataclass
class PrefillChunk:
    """A run of uncomputed tokens of one request to put through the model this step."""

    request: Request
    start: int
    length: int

    @property
    def completes_tokens(self) -> bool:
        """Whether this chunk reaches the last token to feed, so logits for the next token come
        out of it (or, for a request that only scores its prompt, its last scores)."""
        return self.start + self.length >= self.request.num_feed_tokens

    @property
    def samples(self) -> bool:
        """Whether a token is sampled after this chunk."""
        request = self.request
        return self.completes_tokens and request.num_tokens < request.max_total_tokens


@dataclass
class CacheCopy:
    """Copy the keys and values of the first `num_tokens` positions of one slot to another."""

    source: int
    target: int
    num_tokens: int


@dataclass
class SchedulerOutput:
    """The work of one step: copies first, then the prompt chunks and decode rows."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    copies: list[CacheCopy] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # got a slot this step
    preempted: list[Request] = field(default_factory=list)  # lost their slot this step

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to run."""
        return not self.prefills and not self.decodes

    @property
    def num_rows(self) -> int:
        """Requests in this step."""
        return len(self.prefills) + len(self.decodes)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens computed by the prompt chunks."""
        return sum(chunk.length for chunk in self.prefills)


class Scheduler:
    """The waiting requests, the running ones, and the cache slots they hold."""

    def __init__(
        self,
        num_slots: int,
        max_prefill_tokens: int,
        max_slots_per_group: int | None = None,
        reuse_prefixes: bool = True,
    ) -> None:
        if num_slots < 1 or max_prefill_tokens < 1:
            raise ValueError(
                "num_slots and max_prefill_tokens must be >= 1, got "
                f"{num_slots} and {max_prefill_tokens}"
            )
        if max_slots_per_group is not None and max_slots_per_group < 1:
            raise ValueError(f"max_slots_per_group must be >= 1, got {max_slots_per_group}")
        self.num_slots = num_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.max_slots_per_group = max_slots_per_group or num_slots
        self.pool = SlotPool(num_slots, reuse_prefixes)
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order
        self._by_id: dict[str, Request] = {}
        self._slots_by_client: Counter[str] = Counter()
        self._slots_by_group: Counter[str] = Counter()

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
        return self.num_slots - len(self.running)

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue a request (admission limits are the caller's: see AsyncEngine)."""
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def get(self, request_id: str) -> Request | None:
        """The live (waiting or running) request with this id."""
        return self._by_id.get(request_id)

    def live_requests(self) -> list[Request]:
        """Every waiting and running request."""
        return [*self.waiting, *self.running]

    # ------------------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's decode rows and prompt chunks, admitting waiting requests."""
        out = SchedulerOutput()
        budget = self.max_prefill_tokens
        chunks: dict[str, PrefillChunk] = {}
        for request in self.running:
            if request.is_paused or request.is_prefill_done or budget <= 0:
                continue
            chunk = self._chunk(request, budget)
            chunks[request.request_id] = chunk
            budget -= chunk.length
        deferred: set[str] = set()
        while budget > 0 and self.waiting:
            candidate = self._next_waiting(deferred)
            if candidate is None:
                break
            if self._should_defer(candidate):
                deferred.add(candidate.request_id)
                continue
            if self.num_free_slots == 0:
                victim = self._victim_for(candidate)
                if victim is None:
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                deferred.add(victim.request_id)  # not back in the step that took its slot
                refunded = chunks.pop(victim.request_id, None)
                if refunded is not None:
                    budget += refunded.length
            self._admit(candidate, out)
            chunk = self._chunk(candidate, budget)
            chunks[candidate.request_id] = chunk
            budget -= chunk.length
        out.prefills = list(chunks.values())
        out.decodes = [r for r in self.running if r.is_prefill_done and not r.is_paused]
        return out

    @staticmethod
    def _chunk(request: Request, budget: int) -> PrefillChunk:
        start = request.num_computed_tokens
        return PrefillChunk(request, start, min(request.num_feed_tokens - start, budget))

    def _waiting_key(self, request: Request) -> tuple[int, int, int]:
        return (request.priority, self._slots_by_client[request.client_id], request.arrival_index)

    def _next_waiting(self, deferred: set[str]) -> Request | None:
        """The waiting request that goes next, skipping paused ones (their reader is behind:
        nothing to gain from a slot) and groups at their slot cap."""
        best: Request | None = None
        best_key: tuple[int, int, int] | None = None
        cap = self.max_slots_per_group
        for request in self.waiting:
            if request.is_paused or request.request_id in deferred:
                continue
            if self._slots_by_group[request.group_id] >= cap:
                continue
            key = self._waiting_key(request)
            if best_key is None or key < best_key:
                best, best_key = request, key
        return best

    def _should_defer(self, request: Request) -> bool:
        """Whether a running request's prompt, once computed, would give this one a much
        longer cached prefix than it can reuse now."""
        pool = self.pool
        if not pool.reuse_prefixes or request.num_tokens <= MIN_DEFERRING_PROMPT:
            return False
        tokens = request.tokens_between(0, request.num_tokens)
        return pool.longest_prefix(tokens, include_pending=True) > pool.longest_prefix(tokens)

    def _victim_for(self, candidate: Request) -> Request | None:
        """A running request the candidate may take the slot of, or None."""
        if not self.running:
            return None

        def victim_key(request: Request) -> tuple[bool, int, int, int]:
            client_slots = self._slots_by_client[request.client_id]
            return (request.is_paused, request.priority, client_slots, request.arrival_index)

        victim = max(self.running, key=victim_key)
        if victim.is_paused:
            return victim
        if candidate.priority < victim.priority:
            return victim
        if candidate.priority > victim.priority:
            return None
        # Strictly fairer after the swap, so two clients never take turns preempting each other.
        candidate_slots = self._slots_by_client[candidate.client_id]
        if candidate_slots + 1 < self._slots_by_client[victim.client_id]:
            return victim
        return None

    def _admit(self, request: Request, out: SchedulerOutput) -> None:
        placement = self.pool.place(request)
        if placement.copy_from is not None:
            out.copies.append(
                CacheCopy(placement.copy_from, placement.slot, placement.num_reused_tokens)
            )
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self.running.append(request)
        self._slots_by_client[request.client_id] += 1
        self._slots_by_group[request.group_id] += 1
        out.admitted.append(request)

    def _preempt(self, request: Request) -> None:
        """Take a running request's slot away; it waits again and recomputes its tokens."""
        self._leave_slot(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        self.waiting.append(request)

    def _leave_slot(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.release(request)
        request.slot = None
        self._slots_by_client[request.client_id] -= 1
        self._slots_by_group[request.group_id] -= 1

    # -------------------------------------------------------------------------------- finish

    def finish(self, request: Request) -> None:
        """Take a request out (finished, aborted or failed) and free its slot at once."""
        if self._by_id.pop(request.request_id, None) is None:
            return
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self._leave_slot(request)
        request.status = RequestStatus.FINISHED
        request.finish_time = time.monotonic()

    def forget_slot_contents(self, slots: list[int]) -> None:
        """Drop what these slots cache (a step that wrote them failed)."""
        for slot in slots:
            self.pool.forget(slot)
