"""The KV-cache slots as plain Python: who holds each, and which tokens each still caches.

A slot keeps the keys and values of its tokens after its request ends, until another request
needs it. A new request whose prompt starts with tokens cached in some slot starts from that
prefix: it takes over the slot when the slot is idle, or gets the prefix copied into a slot of
its own when the slot is in use. Idle slots are reused least recently used first, empty ones
before any. Nothing here touches a tensor: the runner performs the copies the pool decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.engine.request import PromptLogprob, Request


@dataclass
class SlotContent:
    """What an idle slot still holds: its tokens, and the prompt log-probabilities of them that
    its last request computed (entry i is token i + 1's, with `num_top` alternatives)."""

    tokens: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    num_top: int = -1  # alternatives per entry; -1 when there are no entries
    has_ranks: bool = False  # whether the entries carry each token's rank


@dataclass
class Placement:
    """Where a newly admitted request goes: its slot, the prefix it can skip, and the copy (if
    any) that brings that prefix into the slot from another one."""

    slot: int
    num_reused_tokens: int
    copy_from: int | None = None  # the source slot; None when the slot itself holds the prefix


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists (slices compare in C)."""
    low, high = 0, min(len(a), len(b))
    if high == 0 or a[0] != b[0]:
        return 0
    if a[:high] == b[:high]:
        return high
    while low < high:  # invariant: a[:low] == b[:low] and a[:high + 1] != b[:high + 1]
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class SlotPool:
    """`num_slots` cache slots; with `reuse_prefixes`, they remember their tokens when idle."""

    def __init__(self, num_slots: int, reuse_prefixes: bool = True) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.reuse_prefixes = reuse_prefixes
        self.owners: list[Request | None] = [None] * num_slots
        self.contents: list[SlotContent] = [SlotContent() for _ in range(num_slots)]
        self._last_used = [0] * num_slots
        self._clock = 0

    @property
    def num_free(self) -> int:
        """Slots that no request holds (idle ones included, whatever they cache)."""
        return sum(owner is None for owner in self.owners)

    def cached_tokens(self, slot: int) -> Sequence[int]:
        """The tokens whose keys and values the slot holds now."""
        owner = self.owners[slot]
        if owner is None:
            return self.contents[slot].tokens
        return owner.tokens_between(0, owner.num_computed_tokens)

    def longest_prefix(self, tokens: Sequence[int], include_pending: bool = False) -> int:
        """The longest prefix of `tokens` cached in any slot; with `include_pending`, also
        counting the prompts of running requests that are still being computed."""
        if not self.reuse_prefixes or not tokens:
            return 0
        best = 0
        for slot in range(self.num_slots):
            owner = self.owners[slot]
            if include_pending and owner is not None and not owner.is_paused:
                candidate: Sequence[int] = owner.prompt_token_ids
            else:
                candidate = self.cached_tokens(slot)
            best = max(best, common_prefix_length(tokens, candidate))
        return best

    def place(self, request: Request) -> Placement:
        """Give `request` a free slot and the longest usable cached prefix; the caller has
        checked that a slot is free."""
        prompt = request.tokens_between(0, request.num_tokens)
        # At least one token is always computed: its logits give the next token (or the scores).
        limit = request.num_feed_tokens - 1
        best_slot, best_length = -1, 0
        if self.reuse_prefixes and limit > 0:
            for slot in range(self.num_slots):
                common = common_prefix_length(prompt, self.cached_tokens(slot))
                length = self._usable(request, slot, common, limit)
                is_better = length > best_length or (
                    # at equal length, taking an idle slot over saves a copy
                    length == best_length > 0
                    and self.owners[slot] is None
                    and self.owners[best_slot] is not None
                )
                if is_better:
                    best_slot, best_length = slot, length
        if best_length > 0 and self.owners[best_slot] is None:
            placement = Placement(best_slot, best_length)
        else:
            target = self._victim()
            placement = Placement(target, best_length, best_slot if best_length > 0 else None)
        self._take(placement.slot, request, placement.num_reused_tokens, placement.copy_from)
        return placement

    def _usable(self, request: Request, slot: int, common: int, limit: int) -> int:
        """How many of `common` shared leading tokens a request can skip by reusing `slot`.

        With prompt log-probabilities, the skipped tokens' entries come from the slot, so it
        must know them, and with as many alternatives: entry i (token i's) needs the logits of
        position i - 1, so skipping r tokens needs the slot's entries 0 .. r for the same tokens.
        """
        length = min(common, limit)
        if request.prompt_logprobs is None or length == 0:
            return length
        owner = self.owners[slot]
        if owner is not None:
            entries, num_top = owner.prompt_logprob_entries, owner.prompt_logprobs
            has_ranks = owner.prompt_logprob_ranks
        else:
            content = self.contents[slot]
            entries, num_top, has_ranks = (
                content.prompt_logprobs,
                content.num_top,
                content.has_ranks,
            )
        if num_top is None or num_top < request.prompt_logprobs:
            return 0
        if request.prompt_logprob_ranks and not has_ranks:
            return 0
        return max(0, min(length, common - 1, len(entries) - 1))

    def _victim(self) -> int:
        """The free slot to overwrite: an empty one, else the least recently used."""
        free = [slot for slot in range(self.num_slots) if self.owners[slot] is None]
        if not free:
            raise RuntimeError("no free cache slot: the scheduler must check before placing")
        empty = [slot for slot in free if not self.contents[slot].tokens]
        if empty:
            return min(empty)
        return min(free, key=lambda slot: self._last_used[slot])

    def _take(self, slot: int, request: Request, num_reused: int, source: int | None) -> None:
        if self.owners[slot] is not None:
            raise RuntimeError(f"cache slot {slot} is already held")
        reused_entries: list[PromptLogprob] = []
        if request.prompt_logprobs is not None and num_reused > 0:
            origin = source if source is not None else slot
            owner = self.owners[origin]
            entries = (
                owner.prompt_logprob_entries
                if owner is not None
                else self.contents[origin].prompt_logprobs
            )
            reused_entries = [_truncated(entry, request.prompt_logprobs) for entry in entries]
            reused_entries = reused_entries[: num_reused + 1]
        self.owners[slot] = request
        # The slot's old tokens past the reused prefix are stale from now on.
        self.contents[slot] = SlotContent()
        request.slot = slot
        request.num_computed_tokens = num_reused
        if not request.was_scheduled:  # the prompt's reuse, counted at its first placement
            request.num_cached_tokens = min(num_reused, request.num_prompt_tokens)
        if request.prompt_logprobs is not None:
            request.prompt_logprob_entries = reused_entries
        self._touch(slot)

    def release(self, request: Request) -> None:
        """The request leaves its slot; the slot keeps what the request computed."""
        slot = request.slot
        if slot is None or self.owners[slot] is not request:
            return
        self.owners[slot] = None
        if self.reuse_prefixes:
            tokens = request.tokens_between(0, request.num_computed_tokens)
            entries = request.prompt_logprob_entries if request.prompt_logprobs is not None else []
            num_top = request.prompt_logprobs
            if num_top is None or not entries:
                num_top = -1
            has_ranks = request.prompt_logprob_ranks and bool(entries)
            self.contents[slot] = SlotContent(tokens, list(entries), num_top, has_ranks)
        self._touch(slot)

    def forget(self, slot: int) -> None:
        """Drop what a slot caches (its keys and values can no longer be trusted)."""
        if self.owners[slot] is None:
            self.contents[slot] = SlotContent()

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._last_used[slot] = self._clock


def _truncated(entry: PromptLogprob, num_top: int) -> PromptLogprob:
    """`entry` with at most `num_top` alternatives."""
    top = entry.top_logprobs
    if top is None or len(top.token_ids) <= num_top:
        return entry
    return PromptLogprob(entry.token_id, entry.logprob, top.first(num_top), entry.rank)
