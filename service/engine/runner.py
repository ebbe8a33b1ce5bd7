"""The one place tensors are built: batches in, plain token ids and log-probabilities out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.decode import DecodeStep, SharedPrefix
from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache, resolve_kv_cache_dtype
from model.sampling import SamplerOutput, SamplingState, sample
from model.speculative import verify
from service.engine.decode_graphs import DecodeGraphs
from service.engine.errors import ModelNotUsableError
from service.engine.request import PromptLogprob, Request, TopLogprobs
from service.engine.scheduler import PrefillChunk, SchedulerOutput
from service.engine.shared_prefix import find_shared_prefixes
from service.engine.speculation import Speculator

# Prompt log-probabilities go through the head this many positions at a time, so a long prompt
# never holds a (length x vocabulary) block of logits at once.
PROMPT_LOGPROBS_CHUNK = 256


@dataclass
class SampledToken:
    """What the runner hands back for one sampled row: a token id and, when asked, its
    log-probabilities (under the request's logprobs_mode) and the top alternatives."""

    token_id: int
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    processed_logprob: float | None = None  # with raw_and_processed_logprobs
    # with raw_and_processed_logprobs: the processed distribution's own most likely tokens
    processed_top_logprobs: TopLogprobs | None = None


@dataclass
class StepResult:
    """One step's results, by request id."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)
    # Requests whose guesses were verified: the tokens kept (accepted guesses, then one more).
    accepted: dict[str, list[SampledToken]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PromptLogprob]] = field(default_factory=dict)
    num_forward_tokens: int = 0  # tokens put through the model (prompt chunks and decodes)


class ModelRunner:
    """Owns the model and its KV cache; runs prompt chunks and decode steps and samples."""

    def __init__(
        self,
        model: GPT,
        num_slots: int,
        max_model_len: int,
        vocab_size: int | None = None,
        eos_token_id: int | None = None,
        fast_decode: bool = False,
        speculator: Speculator | None = None,
        share_prefixes: bool = False,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        # A checkpoint may pad its vocabulary (nanoGPT's 50304): never sample the padding.
        self.vocab_size = vocab_size or model.config.vocab_size
        # The fast path pads batches with rows that write to a scratch slot nobody owns.
        cache_slots = num_slots + 1 if fast_decode else num_slots
        self.decode_step = DecodeStep(model)
        self.is_batch_invariant = self.decode_step.invariant
        cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        if self.is_batch_invariant and cache_dtype != self.dtype:
            # its per-query attention is proved bit-exact on float32 keys and values
            raise ValueError("a batch-invariant model keeps its KV cache in float32")
        self.cache = KVCache(model.config, cache_slots, max_model_len, self.device, cache_dtype)
        self._states: dict[str, SamplingState] = {}
        self.speculator = speculator
        # Decode rows with a long common prompt prefix read its keys and values once; the groups
        # are found again only when the batch (its requests and their slots) changes.
        self.share_prefixes = share_prefixes
        self._shared: tuple[tuple[tuple[str, int], ...], list[SharedPrefix]] = ((), [])
        self.decode_graphs = (
            DecodeGraphs(model, self.cache, num_slots, num_slots, max_model_len)
            if fast_decode
            else None
        )

    def capture_decode_graphs(self) -> None:
        """Capture the fast path's CUDA graphs (warm-up does this once, on the engine thread)."""
        if self.decode_graphs is not None:
            self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, work: SchedulerOutput) -> StepResult:
        """Run one step: cache copies, prompt chunks, decode rows, then sampling."""
        result = StepResult(num_forward_tokens=work.num_prefill_tokens + len(work.decodes))
        for copy in work.copies:
            self.cache.copy_prefix(copy.source, copy.target, copy.num_tokens)
        # Each part is sampled on its own: putting the decode rows' logits (B x vocab) together
        # with the prompt rows' would copy them.
        parts: list[tuple[list[Request], torch.Tensor]] = []
        if work.prefills:
            hidden = self._run_prefill(work.prefills)  # (B, T, C)
            self._prompt_logprobs(work.prefills, hidden, result)
            keep = [i for i, chunk in enumerate(work.prefills) if chunk.samples]
            if keep:
                rows = torch.tensor(keep, device=self.device)
                last = torch.tensor([work.prefills[i].length - 1 for i in keep], device=self.device)
                logits = self.model.logits(hidden[rows, last])  # (K, vocab)
                parts.append(([work.prefills[i].request for i in keep], logits))
        decodes = work.decodes
        speculator = self.speculator
        if decodes and speculator is not None and len(decodes) <= speculator.max_batch_size:
            decodes = self._speculate(decodes, result)
        if decodes:
            parts.append(self._run_decode(decodes))
        for requests, logits in parts:
            result.sampled.update(self._sample(requests, logits))
        return result

    def _run_prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        width = max(chunk.length for chunk in chunks)
        rows = [
            chunk.request.tokens_between(chunk.start, chunk.start + chunk.length)
            + [0] * (width - chunk.length)
            for chunk in chunks
        ]
        layout = BatchLayout.build(
            [chunk.request.held_slot for chunk in chunks],
            [chunk.start for chunk in chunks],
            [chunk.length for chunk in chunks],
            self.max_model_len,
            self.device,
        )
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B, T)
        return self.model.hidden_cached(idx, self.cache, layout)  # (B, T, C)

    def _run_decode(self, requests: list[Request]) -> tuple[list[Request], torch.Tensor]:
        """The decode rows, in the order their logits (B, vocab) come in."""
        # Each decode row feeds the last sampled token, which is not in the cache yet.
        if self.decode_graphs is not None and self.decode_graphs.is_active:
            return requests, self.decode_graphs(
                [r.token_at(r.num_computed_tokens) for r in requests],
                [r.held_slot for r in requests],
                [r.num_computed_tokens for r in requests],
            )
        # By slot, so the rows' cache is often one view (and the logits stay in that order).
        ordered = sorted(requests, key=lambda r: r.held_slot)
        slots = [r.held_slot for r in ordered]
        positions = [r.num_computed_tokens for r in ordered]
        logits = self.decode_step(
            self.cache,
            [r.token_at(r.num_computed_tokens) for r in ordered],
            slots,
            positions,
            self._shared_prefixes(ordered, slots, positions),
        )  # (B, vocab)
        return ordered, logits

    def _shared_prefixes(
        self, ordered: list[Request], slots: list[int], positions: list[int]
    ) -> list[SharedPrefix]:
        if not self.share_prefixes or self.is_batch_invariant or len(ordered) < 2:
            return []
        key = tuple(zip((r.request_id for r in ordered), slots, strict=True))
        if key != self._shared[0]:  # positions only grow, so the groups stay valid till then
            prompts = [r.prompt_token_ids for r in ordered]
            self._shared = (key, find_shared_prefixes(prompts, slots, positions))
        return self._shared[1]

    def _speculate(self, decodes: list[Request], result: StepResult) -> list[Request]:
        """Verify guesses for the decode rows that can take them, in one forward pass; returns
        the rows left to decode one token at a time."""
        assert self.speculator is not None
        eligible = [r for r in decodes if _can_speculate(r)]
        if not eligible:
            return decodes
        proposals = self.speculator.propose(eligible, [self._state(r) for r in eligible])
        if not proposals:
            return decodes
        rows = [[p.request.token_at(p.request.num_computed_tokens), *p.guesses] for p in proposals]
        if len(proposals) == 1 and not self.is_batch_invariant:  # one stream: the lean path
            request = proposals[0].request
            all_logits = [
                self.decode_step.several(
                    self.cache, rows[0], request.held_slot, request.num_computed_tokens
                )
            ]
        else:
            width = max(len(row) for row in rows)
            layout = BatchLayout.build(
                [p.request.held_slot for p in proposals],
                [p.request.num_computed_tokens for p in proposals],
                [len(row) for row in rows],
                self.max_model_len,
                self.device,
            )
            idx = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self.device)
            hidden = self.model.hidden_cached(idx, self.cache, layout)  # (R, 1 + k, C)
            all_logits = [
                self.model.logits(hidden[row, : len(rows[row])]) for row in range(len(rows))
            ]
        for row, proposal in enumerate(proposals):
            logits = all_logits[row].float()[:, : self.vocab_size]  # (1 + k, V): no padding
            state = self._state(proposal.request)
            verified = verify(logits, proposal.guesses, state, proposal.draft_probs)
            self.speculator.accepted(proposal, verified.num_accepted)
            result.accepted[proposal.request.request_id] = [
                SampledToken(token) for token in verified.token_ids
            ]
        result.num_forward_tokens += sum(len(p.guesses) for p in proposals)
        speculated = {id(p.request) for p in proposals}
        return [r for r in decodes if id(r) not in speculated]

    def _prompt_logprobs(
        self, chunks: list[PrefillChunk], hidden: torch.Tensor, result: StepResult
    ) -> None:
        """Log-probabilities of the prompt tokens these chunks give the logits for.

        Position p's logits score token p + 1. Entries already known (a request recomputing
        after preemption, or reusing a cached prefix) are not computed again.
        """
        pieces: list[torch.Tensor] = []  # hidden states (n, C), all rows' positions in a row
        targets: list[int] = []
        spans: list[tuple[Request, int]] = []  # request, number of tokens
        for row, chunk in enumerate(chunks):
            request = chunk.request
            if not request.wants_prompt_logprobs:
                continue
            first = max(chunk.start + 1, len(request.prompt_logprob_entries))
            last = min(chunk.start + chunk.length, request.num_prompt_tokens - 1)  # inclusive
            if first > last:
                continue
            pieces.append(hidden[row, first - 1 - chunk.start : last - chunk.start])
            targets.extend(request.prompt_token_ids[first : last + 1])
            spans.append((request, last - first + 1))
        if not pieces:
            return
        states = torch.cat(pieces)  # (N, C)
        target_ids = torch.tensor(targets, dtype=torch.long, device=self.device)
        num_top = max(r.prompt_logprobs or 0 for r, _ in spans)
        with_ranks = any(r.prompt_logprob_ranks for r, _ in spans)
        chosen_parts, rank_parts, top_value_parts, top_id_parts = [], [], [], []
        buffer: torch.Tensor | None = None  # one (n, V) block of log-probabilities, reused
        for begin in range(0, states.shape[0], PROMPT_LOGPROBS_CHUNK):
            end = begin + PROMPT_LOGPROBS_CHUNK
            logits = self.model.logits(states[begin:end]).float()  # (n, V), a block at a time
            if self.vocab_size < logits.shape[-1]:
                logits = logits[:, : self.vocab_size]
            if buffer is None or buffer.shape != logits.shape:
                buffer = torch.empty_like(logits)
            logprobs = torch.log_softmax(logits, dim=-1, out=buffer)
            chosen = logprobs.gather(1, target_ids[begin:end, None])  # (n, 1)
            chosen_parts.append(chosen.squeeze(1))
            if with_ranks:
                rank_parts.append(torch.count_nonzero(logprobs > chosen, dim=-1) + 1)
            if num_top:
                values, ids = logprobs.topk(num_top, dim=-1)
                top_value_parts.append(values)
                top_id_parts.append(ids)
        chosen_values = torch.cat(chosen_parts).tolist()
        ranks = torch.cat(rank_parts).tolist() if with_ranks else None
        top_values = torch.cat(top_value_parts).tolist() if num_top else None
        top_ids = torch.cat(top_id_parts).tolist() if num_top else None
        offset = 0
        for request, count in spans:
            wanted = request.prompt_logprobs or 0
            entries = []
            for i in range(count):
                top = None
                if wanted and top_ids is not None and top_values is not None:
                    top = TopLogprobs(top_ids[offset + i][:wanted], top_values[offset + i][:wanted])
                at = offset + i
                rank = ranks[at] if ranks is not None and request.prompt_logprob_ranks else None
                entries.append(PromptLogprob(targets[at], chosen_values[at], top, rank))
            result.prompt_logprobs[request.request_id] = entries
            offset += count

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> dict[str, SampledToken]:
        logits = logits.float()
        if self.vocab_size < logits.shape[-1]:
            logits[:, self.vocab_size :] = float("-inf")
        bans: dict[int, list[int]] = {}
        for row, request in enumerate(requests):
            # Before min_tokens, end-of-text and stop tokens cannot be chosen at all.
            if request.num_output_tokens < request.stop.min_tokens:
                banned = list(request.stop.stop_token_ids)
                if self.eos_token_id is not None and not request.stop.ignore_eos:
                    banned.append(self.eos_token_id)
                if banned:
                    bans[row] = banned
        states = [self._state(r) for r in requests]
        # this step's logits: nobody reads them after, so sampling may change them in place
        out = sample(logits, states, is_owned=True, bans=bans)
        token_ids = out.token_ids.tolist()
        for state, token_id in zip(states, token_ids, strict=True):
            if state.output_counts is not None:
                state.record(token_id)
        if all(r.sampling.logprobs is None for r in requests):
            return {r.request_id: SampledToken(t) for r, t in zip(requests, token_ids, strict=True)}
        return _with_logprobs(requests, token_ids, out)

    def _state(self, request: Request) -> SamplingState:
        state = self._states.get(request.request_id)
        if state is None:
            state = SamplingState.create(
                request.sampling, self.vocab_size, request.prompt_token_ids, self.device
            )
            for token_id in request.output_token_ids:  # recomputing after preemption
                state.record(token_id)
            self._states[request.request_id] = state
        return state

    def preempted(self, request_id: str) -> None:
        """A request lost its slot: what was cached for it there is gone (its sampling state,
        generator included, stays)."""
        if self.speculator is not None:
            self.speculator.preempted(request_id)

    def release(self, request_id: str) -> None:
        """Forget a finished request's per-request state (its generator and tensors)."""
        self._states.pop(request_id, None)
        if self.speculator is not None:
            self.speculator.release(request_id)

    @torch.inference_mode()
    def check_logits(self) -> None:
        """Raise ModelNotUsableError unless a short forward pass gives finite logits."""
        length = min(8, self.max_model_len)
        idx = torch.arange(length, device=self.device).remainder(self.vocab_size)[None, :]
        logits = self.model(idx)[..., : self.vocab_size]  # (1, T, vocab)
        if not bool(torch.isfinite(logits).all()):
            raise ModelNotUsableError(
                "the model's logits are not finite numbers (NaN or infinity): its weights are "
                "damaged or were saved in a dtype that overflowed; refusing to serve it"
            )


def _can_speculate(request: Request) -> bool:
    """Whether one pass can check guesses for this request (see service.engine.speculation):
    seeded sampling does not, so a seed gives the same tokens with or without speculation."""
    params = request.sampling
    return (
        request.speculative
        and (params.seed is None or params.is_greedy)
        and not params.uses_penalties
        and params.logprobs is None
        and request.num_output_tokens >= request.stop.min_tokens
    )


def _with_logprobs(
    requests: list[Request], token_ids: list[int], out: SamplerOutput
) -> dict[str, SampledToken]:
    """Plain-Python log-probabilities for the rows that asked, under their logprobs_mode."""

    def rows(tensor: torch.Tensor | None) -> list | None:  # type: ignore[type-arg]
        return tensor.tolist() if tensor is not None else None

    raw, raw_top_ids, raw_top = rows(out.logprobs), rows(out.top_token_ids), rows(out.top_logprobs)
    processed = rows(out.processed_logprobs)
    processed_top_ids = rows(out.processed_top_token_ids)
    processed_top = rows(out.processed_top_logprobs)
    processed_at_raw = rows(out.processed_at_raw_top)
    result: dict[str, SampledToken] = {}
    for row, request in enumerate(requests):
        params = request.sampling
        token = SampledToken(token_ids[row])
        wanted = params.num_logprobs
        if params.wants_raw_logprobs and raw is not None:
            token.logprob = raw[row]
            if wanted and raw_top_ids is not None and raw_top is not None:
                token.top_logprobs = TopLogprobs(raw_top_ids[row][:wanted], raw_top[row][:wanted])
            if params.wants_processed_logprobs and processed is not None:
                token.processed_logprob = processed[row]
                if token.top_logprobs is not None and processed_at_raw is not None:
                    token.top_logprobs.processed_logprobs = processed_at_raw[row][:wanted]
                if wanted and processed_top_ids is not None and processed_top is not None:
                    ids, values = processed_top_ids[row][:wanted], processed_top[row][:wanted]
                    token.processed_top_logprobs = TopLogprobs(ids, values)
        elif params.wants_processed_logprobs and processed is not None:
            token.logprob = processed[row]
            if wanted and processed_top_ids is not None and processed_top is not None:
                ids, values = processed_top_ids[row][:wanted], processed_top[row][:wanted]
                token.top_logprobs = TopLogprobs(ids, values)
        result[request.request_id] = token
    return result
