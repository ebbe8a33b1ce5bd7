"""Speculative decoding in the runner: propose guesses for decode rows, verify them in one pass.

Part of the runner (it builds tensors): `Speculator.propose` gives each eligible decode request
up to k guesses, by prompt lookup or with a draft model; the runner feeds the last token and the
guesses of every such request in one forward pass and `model.speculative.verify` keeps what the
target model agrees with (see there for the rule that keeps sampling exact).

How many guesses a request may get adapts to how its guesses fare, much as Hugging Face's assisted
generation does: after a check that kept every guess, up to two more than that proposal had (never
fewer than were allowed before: prompt lookup often finds fewer than it may propose); after one
that rejected some, one fewer than that proposal had; between 1 and `num_tokens`. A check of k
guesses costs more than a plain step (k + 1 rows through every weight), so long proposals pay only
while they keep being accepted: in a stretch that repeats the context they grow to the cap, and in
free text they stay short. In the engine, on the prompt-repeating benchmark at one stream, this
took a cap of 8 from 1.52x to 1.56x plain decoding (3 guesses every step: 1.47x).

Checking guesses pays while a step is bound by reading the weights, so that extra rows come
almost free: at one stream, and on a GPU at many. On a CPU a step turns compute-bound within a
few rows, where every guess costs about what a request's own row does: measured in the engine on
2 cores (float32, the prompt-repeating workload), prompt lookup gave 116 against 102 tok/s with 4
requests at a time, but 95 against 151 with 8 and 132 against 254 with 32. So steps that decode
more than `max_batch_size` requests decode plainly: 4 by default on a CPU, no limit on a GPU.

A request speculates when the server has a method and the request did not opt out, and when its
next tokens do not depend on each other in ways one pass cannot see: no repetition, presence or
frequency penalty, no log-probabilities asked, past `min_tokens`, and at least two tokens left;
and, when it samples, without a seed (a seed promises the tokens of plain decoding, and
speculation draws its random numbers differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.sampling import SamplingState, final_distribution_logits
from model.speculative import propose_ngram
from service.engine.request import Request

SPECULATIVE_METHODS = ("none", "ngram", "draft")
CPU_SPECULATIVE_MAX_BATCH_SIZE = 4  # see the module doc


def speculation_batch_limit(setting: int | None, device: torch.device, max_batch_size: int) -> int:
    """The most decoding requests a step may have and still speculate: the setting, else a few
    on a CPU (where a step turns compute-bound within a few rows) and the whole batch on a GPU."""
    if setting is not None:
        return setting
    return CPU_SPECULATIVE_MAX_BATCH_SIZE if device.type == "cpu" else max_batch_size


@dataclass
class Proposal:
    """One request's guesses, and the draft model's distributions they were drawn from."""

    request: Request
    guesses: list[int]
    draft_probs: torch.Tensor | None = None  # (k, V), None for prompt lookup


@dataclass
class SpeculationStats:
    """Running totals for the metrics (plain ints, read from any thread)."""

    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_rows: int = 0


@dataclass
class Speculator:
    """Proposes guesses; with a draft model, keeps that model's KV cache in step."""

    method: str
    num_tokens: int
    max_model_len: int
    vocab_size: int
    max_batch_size: int  # speculate only in steps that decode at most this many requests
    max_ngram: int = 4
    min_ngram: int = 1
    draft_model: GPT | None = None
    num_slots: int = 1
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS[1:]:
            raise ValueError(f"speculative method must be one of {SPECULATIVE_METHODS[1:]}")
        if self.num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_tokens}")
        self._draft_cache: KVCache | None = None
        self._draft_computed: dict[str, tuple[int, int]] = {}  # request -> (slot, tokens)
        self._lengths: dict[str, int] = {}  # request -> guesses its next proposal may have
        if self.method == "draft":
            if self.draft_model is None:
                raise ValueError("the draft method needs a draft model")
            draft = self.draft_model
            length = min(self.max_model_len, draft.config.block_size)
            self._draft_cache = KVCache(
                draft.config, self.num_slots, length, draft.device, draft.dtype
            )

    def budget(self, request: Request) -> int:
        """How many guesses this request can take now (0: decode it plainly)."""
        if not request.speculative:
            return 0
        room = min(
            request.max_total_tokens - request.num_tokens - 1,  # the bonus token must fit
            self.max_model_len - request.num_tokens,  # positions of the last token + guesses
        )
        if self._draft_cache is not None:
            room = min(room, self._draft_cache.max_seq_len - request.num_tokens)
        return max(0, min(self._lengths.get(request.request_id, self.num_tokens), room))

    def propose(self, requests: list[Request], states: list[SamplingState]) -> list[Proposal]:
        """Guesses for the requests that can take some; the others are left out."""
        if self.method == "ngram":
            proposals = []
            for request in requests:
                budget = self.budget(request)
                if budget:
                    tokens = request.tokens_between(0, request.num_tokens)
                    guesses = propose_ngram(tokens, budget, self.max_ngram, self.min_ngram)
                    if guesses:
                        proposals.append(Proposal(request, guesses))
            return proposals
        return self._propose_with_draft(requests, states)

    def _propose_with_draft(
        self, requests: list[Request], states: list[SamplingState]
    ) -> list[Proposal]:
        draft, cache = self.draft_model, self._draft_cache
        assert draft is not None and cache is not None
        chosen = [(r, s, self.budget(r)) for r, s in zip(requests, states, strict=True)]
        chosen = [(r, s, b) for r, s, b in chosen if b > 0]
        if not chosen:
            return []
        # Catch the draft cache up to (and including) each request's last token.
        starts = []
        for request, _, _ in chosen:
            slot, computed = self._draft_computed.get(request.request_id, (-1, 0))
            starts.append(computed if slot == request.slot else 0)
        rows = [
            request.tokens_between(start, request.num_tokens)
            for (request, _, _), start in zip(chosen, starts, strict=True)
        ]
        width = max(len(row) for row in rows)
        layout = BatchLayout.build(
            [r.held_slot for r, _, _ in chosen],
            starts,
            [len(row) for row in rows],
            cache.max_seq_len,
            draft.device,
        )
        idx = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=draft.device)
        logits = draft.forward_cached(idx, cache, layout)[:, : self.vocab_size]  # (R, V)
        longest = max(b for _, _, b in chosen)
        guesses: list[list[int]] = [[] for _ in chosen]
        probs: list[list[torch.Tensor]] = [[] for _ in chosen]
        positions = [r.num_tokens for r, _, _ in chosen]  # where each next guess is fed
        for step in range(longest):
            live = [i for i, (_, _, b) in enumerate(chosen) if step < b]
            for i in live:
                request, state, _ = chosen[i]
                distribution = torch.softmax(
                    final_distribution_logits(logits[i : i + 1].float(), state.params), dim=-1
                )[0]
                if state.params.is_greedy:
                    token = int(distribution.argmax())
                else:
                    token = int(torch.multinomial(distribution, 1, generator=state.generator))
                guesses[i].append(token)
                probs[i].append(distribution)
            feed = [i for i in live if step + 1 < chosen[i][2]]  # the last guess is not fed
            if not feed:
                break
            layout = BatchLayout.build(
                [chosen[i][0].held_slot for i in feed],
                [positions[i] for i in feed],
                [1] * len(feed),
                cache.max_seq_len,
                draft.device,
            )
            idx = torch.tensor([[guesses[i][-1]] for i in feed], device=draft.device)
            step_logits = draft.forward_cached(idx, cache, layout)[:, : self.vocab_size]
            for row, i in enumerate(feed):
                logits[i] = step_logits[row]
                positions[i] += 1
        proposals = []
        for i, (request, _, _) in enumerate(chosen):
            self._draft_computed[request.request_id] = (request.held_slot, request.num_tokens)
            proposals.append(Proposal(request, guesses[i], torch.stack(probs[i])))
        return proposals

    def accepted(self, proposal: Proposal, num_accepted: int) -> None:
        """Record a verification: count it, size the request's next proposal (see the module
        doc), and keep the draft cache's valid length."""
        proposed = len(proposal.guesses)
        self.stats.num_draft_tokens += proposed
        self.stats.num_accepted_tokens += num_accepted
        self.stats.num_verify_rows += 1
        request = proposal.request
        if num_accepted == proposed:
            allowed = self._lengths.get(request.request_id, self.num_tokens)
            self._lengths[request.request_id] = min(self.num_tokens, max(allowed, proposed + 2))
        else:
            self._lengths[request.request_id] = max(1, proposed - 1)
        if self._draft_cache is not None:
            # The draft fed the last token and every guess but the last one.
            valid = request.num_tokens + min(num_accepted, proposed - 1)
            self._draft_computed[request.request_id] = (request.held_slot, valid)

    def preempted(self, request_id: str) -> None:
        """A request lost its slot: its draft cache there is gone; how its guesses fare (the
        text's doing, not the slot's) is kept."""
        self._draft_computed.pop(request_id, None)

    def release(self, request_id: str) -> None:
        """Forget a finished request."""
        self.preempted(request_id)
        self._lengths.pop(request_id, None)
