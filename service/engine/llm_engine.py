"""The synchronous step loop: schedule, run the model, turn tokens into events.

One thread owns an LLMEngine: it adds and aborts requests and runs `step()`; nothing here is
locked. `make_request()` only reads the engine's fixed configuration, so the event loop may call
it to validate a request before handing it to the engine thread (see AsyncEngine).
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from model.gpt2 import GPT
from model.sampling import SamplingParams
from model.sampling_params import MAX_LOGPROBS, SamplingParamsError
from model.tokenizer import Tokenizer
from model.validation import is_int
from service.engine.config import EngineConfig
from service.engine.errors import (
    EngineError,
    InvalidRequestError,
    PromptTooLongError,
    StepFailedError,
)
from service.engine.output_processor import OutputProcessor
from service.engine.params import StopParams
from service.engine.request import FinishReason, PromptLogprob, Request, RequestOutput
from service.engine.runner import ModelRunner, SampledToken, StepResult
from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.speculation import Speculator, speculation_batch_limit
from service.engine.stats import EngineListener, EngineStats

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
Event = tuple[Request, RequestOutput]
MAX_TIMEOUT_SECONDS = 86_400  # a day: a deadline further away is no deadline


def _discard(_: RequestOutput) -> None:
    """The sink of requests whose outputs nobody reads (warm-up)."""


class LLMEngine:
    """Continuous batching over one model: many requests share every forward step."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        listeners: Sequence[EngineListener] = (),
        draft_model: GPT | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        block_size = model.config.block_size
        self.max_model_len = min(self.config.max_model_len or block_size, block_size)
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        self.scheduler = Scheduler(
            num_slots=self.config.max_batch_size,
            max_prefill_tokens=self.config.max_prefill_tokens,
            max_slots_per_group=self.config.max_slots_per_request,
            reuse_prefixes=self.config.reuse_prefixes,
        )
        speculator = None
        if self.config.speculative_method != "none":
            speculator = Speculator(
                method=self.config.speculative_method,
                num_tokens=self.config.num_speculative_tokens,
                max_batch_size=speculation_batch_limit(
                    self.config.speculative_max_batch_size, model.device, self.config.max_batch_size
                ),
                max_model_len=self.max_model_len,
                vocab_size=self.vocab_size,
                max_ngram=self.config.ngram_max,
                min_ngram=self.config.ngram_min,
                draft_model=draft_model,
                num_slots=self.config.max_batch_size,
            )
        self.runner = ModelRunner(
            model,
            num_slots=self.config.max_batch_size,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_id=tokenizer.eos_token_id,
            fast_decode=self.config.fast_decode,
            speculator=speculator,
            share_prefixes=self.config.reuse_prefixes,
            kv_cache_dtype=self.config.kv_cache_dtype,
        )
        self.output_processor = OutputProcessor(tokenizer, tokenizer.eos_token_id)
        self.stats = EngineStats()
        self.listeners: list[EngineListener] = [self.stats, *listeners]
        # (deadline, arrival, request id): ids, so a finished request is not kept alive by it
        self._deadlines: list[tuple[float, int, str]] = []  # a min-heap
        self.last_step_num_rows = 0  # rows the last step ran (0: nothing was runnable)

    # ------------------------------------------------------------------ building requests

    def make_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        stop: StopParams,
        sink: Sink = _discard,
        request_id: str | None = None,
        *,
        priority: int = 0,
        client_id: str = "",
        group_id: str = "",
        timeout: float | None = None,
        prompt_logprobs: int | None = None,
        prompt_logprob_ranks: bool = False,
        speculative: bool | None = None,
    ) -> Request:
        """Validate a request and build its state; raises InvalidRequestError at once.

        Safe from any thread: it reads only the engine's fixed configuration.
        """
        prompt = self._check_prompt(prompt_token_ids, stop)
        try:
            sampling.validate_for_vocab(self.vocab_size)
        except SamplingParamsError as exc:
            raise InvalidRequestError(str(exc), exc.param) from exc
        for token_id in stop.stop_token_ids:
            if token_id >= self.vocab_size:
                raise InvalidRequestError(
                    f"stop_token_ids must be < {self.vocab_size}, got {token_id}",
                    "stop_token_ids",
                )
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {prompt_logprobs}",
                "prompt_logprobs",
            )
        has_speculation = self.config.speculative_method != "none"
        if speculative and not has_speculation:
            raise InvalidRequestError(
                "speculative decoding is not configured on this server (start it with "
                "--speculative-method ngram or draft)",
                "speculative",
            )
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise InvalidRequestError(
                f"timeout must be in (0, {MAX_TIMEOUT_SECONDS}] seconds, got {timeout}", "timeout"
            )
        max_new = stop.max_new_tokens
        if max_new is None:
            max_new = self.max_model_len - len(prompt)
        request_id = request_id or uuid.uuid4().hex
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling,
            stop=stop,
            max_total_tokens=len(prompt) + max_new,
            sink=sink,
            priority=priority,
            client_id=client_id,
            group_id=group_id or request_id,
            prompt_logprobs=prompt_logprobs,
            prompt_logprob_ranks=prompt_logprob_ranks,
            speculative=has_speculation if speculative is None else speculative,
        )
        if timeout is not None:
            request.deadline = request.arrival_time + timeout
        return request

    def _check_prompt(self, prompt_token_ids: Sequence[int], stop: StopParams) -> list[int]:
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty: give at least one token", "prompt")
        for token_id in prompt:
            if not is_int(token_id):
                raise InvalidRequestError("prompt token ids must be integers", "prompt")
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    f"prompt token id {token_id} is outside the vocabulary [0, {self.vocab_size})",
                    "prompt",
                )
        limit = self.max_model_len
        max_new = 1 if stop.max_new_tokens is None else stop.max_new_tokens
        if len(prompt) + max_new <= limit:
            return prompt
        if max_new == 0 and len(prompt) == limit + 1:
            return prompt  # only scored: its last token is never an input (Request.num_feed_tokens)
        if self.config.truncate_prompt and max_new < limit:
            return prompt[len(prompt) - (limit - max_new) :]
        raise PromptTooLongError(len(prompt), max_new, limit)

    # --------------------------------------------------------------------- engine thread

    def add(self, request: Request) -> None:
        """Queue a request built by `make_request`."""
        self.output_processor.prepare(request)
        self.scheduler.add(request)
        if request.deadline is not None:
            heapq.heappush(
                self._deadlines, (request.deadline, request.arrival_index, request.request_id)
            )
            if len(self._deadlines) > 2 * max(
                64, self.scheduler.num_running + len(self.scheduler.waiting)
            ):
                self._drop_finished_deadlines()

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        stop: StopParams,
        sink: Sink = _discard,
        request_id: str | None = None,
        **options: object,
    ) -> Request:
        """`make_request` and `add` in one call (for a caller that owns the engine)."""
        request = self.make_request(
            prompt_token_ids,
            sampling,
            stop,
            sink,
            request_id,
            **options,  # type: ignore[arg-type]
        )
        self.add(request)
        return request

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Event | None:
        """End a waiting or running request now and free its slot; returns its last event."""
        request = self.scheduler.get(request_id)
        if request is None:
            return None
        request.finish_reason = reason
        self._end(request)
        return request, request.final_output()

    def set_paused(self, request_id: str, is_paused: bool) -> None:
        """Pause a running request (it keeps its slot but takes no steps) or resume it."""
        request = self.scheduler.get(request_id)
        if request is not None:
            request.is_paused = is_paused

    def _end(self, request: Request) -> None:
        """Take a request out for good."""
        self.scheduler.finish(request)
        self.runner.release(request.request_id)
        self._notify("on_request_finished", request)

    def _notify(self, hook: str, *args: object) -> None:
        """Call `hook` on every listener; a failing listener is logged, never stops the engine."""
        for listener in self.listeners:
            try:
                getattr(listener, hook)(*args)
            except Exception:
                logger.exception("engine listener %r failed in %s", listener, hook)

    def step(self) -> list[Event]:
        """Run one forward step for everyone scheduled; returns the events it produced."""
        events = self._expire(time.monotonic())
        work = self.scheduler.schedule()
        for request in work.preempted:  # its slot's contents are another request's now
            self.runner.preempted(request.request_id)
        self._admitted(work)
        self.last_step_num_rows = work.num_rows
        if work.is_empty:
            return events
        try:
            result = self.runner.execute(work)
        except Exception as exc:  # one bad step must not take the other requests down
            logger.exception("forward step failed; failing its %d requests", work.num_rows)
            return events + self._fail(work, exc)
        return events + self._process(work, result)

    def _expire(self, now: float) -> list[Event]:
        """End the requests whose deadline has passed."""
        events = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request_id = heapq.heappop(self._deadlines)
            event = self.abort(request_id, FinishReason.TIMEOUT)  # None: it ended already
            if event is not None:
                events.append(event)
        return events

    def _drop_finished_deadlines(self) -> None:
        self._deadlines = [entry for entry in self._deadlines if self.scheduler.get(entry[2])]
        heapq.heapify(self._deadlines)

    def _admitted(self, work: SchedulerOutput) -> None:
        for request in work.admitted:
            if request.prompt_logprobs is not None and not request.prompt_logprob_entries:
                first = request.prompt_token_ids[0]
                request.prompt_logprob_entries = [PromptLogprob(first, None)]
            if not request.was_scheduled:  # once: not again after a preemption
                request.was_scheduled = True
                self._notify("on_request_scheduled", request)

    def _process(self, work: SchedulerOutput, result: StepResult) -> list[Event]:
        events: list[Event] = []
        now = time.monotonic()
        for request_id, entries in result.prompt_logprobs.items():
            live = self.scheduler.get(request_id)
            if live is not None:
                live.prompt_logprob_entries.extend(entries)
        ready: list[Request] = []
        for chunk in work.prefills:
            chunk.request.num_computed_tokens += chunk.length
            if chunk.completes_tokens:
                ready.append(chunk.request)
        for request in work.decodes:
            verified = result.accepted.get(request.request_id)
            # the last token, and the accepted guesses with it (all but the token drawn last)
            request.num_computed_tokens += len(verified) if verified else 1
            ready.append(request)
        num_generated = 0
        for request in ready:
            tokens = result.accepted.get(request.request_id)
            if tokens is None:
                token = result.sampled.get(request.request_id)
                tokens = [token] if token is not None else []
            for event in self._outputs(request, tokens, now, events):
                events.append((request, event))
            num_generated += len(tokens)
        self._notify("on_step", work.num_rows, work.num_prefill_tokens, num_generated)
        if result.accepted:
            stats = self.runner.speculator.stats if self.runner.speculator else None
            if stats is not None:
                self._notify("on_speculation", stats.num_draft_tokens, stats.num_accepted_tokens)
        return events

    def _outputs(
        self, request: Request, tokens: list[SampledToken], now: float, events: list[Event]
    ) -> list[RequestOutput]:
        """The events of a request's new tokens (none: its prompt was only scored)."""
        outputs: list[RequestOutput] = []
        try:
            if not tokens:  # the prompt is scored and nothing is to be generated
                request.finish_reason = FinishReason.LENGTH
                outputs.append(request.final_output())
            for token in tokens:
                outputs.append(self.output_processor.process(request, token))
                self._notify("on_token", request, now)
                if request.first_token_time is None:
                    request.first_token_time = now
                request.last_token_time = now
                if outputs[-1].finished:
                    break  # a stop ends it: guesses after the stop are dropped
        except Exception as exc:  # fail this request alone, keep the others going
            logger.exception("output processing failed for %s", request.request_id)
            events.append((request, self._fail_request(request, exc)))
            return []
        if request.prompt_logprobs is not None and not request.is_prompt_logprobs_sent:
            outputs[0].prompt_logprobs = request.prompt_logprob_entries
            request.is_prompt_logprobs_sent = True
        if outputs[-1].finished:
            self._end(request)
        return outputs

    def _fail_request(self, request: Request, exc: Exception) -> RequestOutput:
        """End one request with a StepFailedError."""
        request.finish_reason = FinishReason.ERROR
        self._end(request)
        error = StepFailedError(f"the forward step failed: {type(exc).__name__}: {exc}")
        return request.final_output(error)

    def _fail(self, work: SchedulerOutput, exc: Exception) -> list[Event]:
        requests = [chunk.request for chunk in work.prefills] + work.decodes
        slots = [r.slot for r in requests if r.slot is not None]
        slots += [copy.target for copy in work.copies]
        events = [(r, self._fail_request(r, exc)) for r in requests if not r.is_finished]
        # What the step wrote into these slots cannot be trusted for reuse.
        self.scheduler.forget_slot_contents(slots)
        return events

    def fail_all(self, error: EngineError) -> list[Event]:
        """End every live request with `error` (the engine loop is going down)."""
        live = self.scheduler.live_requests()
        for request in live:
            request.finish_reason = FinishReason.ERROR
            self._end(request)
        return [(request, request.final_output(error)) for request in live]

    def warm_up(self) -> None:
        """Check the model's logits are finite, run a full batch of short requests once so the
        first real ones are not slow, then capture the fast decode path's CUDA graphs; raises
        the first failure it met."""
        self.runner.check_logits()
        max_new = min(2, self.max_model_len - 1)
        stop = StopParams(max_new_tokens=max_new, ignore_eos=True)
        listeners, self.listeners = self.listeners, []  # warm-up is not traffic: keep it out
        error: EngineError | None = None
        try:
            for index in range(self.config.max_batch_size):
                # Distinct prompts: warm-up should run every row, not reuse one prefix.
                length = max(1, min(8, self.max_model_len - max_new))
                prompt = [(index * 8 + i) % self.vocab_size for i in range(length)]
                self.add_request(prompt, SamplingParams(temperature=0.0), stop)
            while self.has_work():
                for _, event in self.step():
                    error = error or event.error
        finally:
            self.listeners = listeners
        for slot in range(self.scheduler.num_slots):  # warm-up prompts are nobody's prefix
            self.scheduler.pool.forget(slot)
        if error is not None:
            raise error
        self.capture_decode_graphs()

    def capture_decode_graphs(self) -> None:
        """With the fast decode path, capture its CUDA graphs (once; on the engine thread)."""
        self.runner.capture_decode_graphs()
