"""The synchronous step loop: schedule, run the model, turn tokens into events.

`step()` runs on one thread (the engine thread); `add_request()` and `abort()` may be called
from another, so the scheduler's state is guarded by one lock. The forward pass itself runs
outside the lock, so submits and aborts never wait for the model.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from model.gpt2 import GPT
from model.sampling import SamplingParams
from model.sampling_params import SamplingParamsError
from model.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.engine.errors import (
    EngineError,
    InvalidRequestError,
    PromptTooLongError,
    StepFailedError,
)
from service.engine.output_processor import OutputProcessor
from service.engine.params import StopParams
from service.engine.request import FinishReason, Request, RequestOutput
from service.engine.runner import ModelRunner, SampledToken
from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.stats import EngineListener, EngineStats

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


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
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        block_size = model.config.block_size
        self.max_model_len = min(self.config.max_model_len or block_size, block_size)
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        self.scheduler = Scheduler(
            num_slots=self.config.max_batch_size,
            max_waiting=self.config.max_queue_size,
            max_prefill_tokens=self.config.max_prefill_tokens,
        )
        self.runner = ModelRunner(
            model,
            num_slots=self.config.max_batch_size,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_id=tokenizer.eos_token_id,
            fast_decode=self.config.fast_decode,
        )
        self.output_processor = OutputProcessor(tokenizer, tokenizer.eos_token_id)
        self.stats = EngineStats()
        self.listeners: list[EngineListener] = [self.stats, *listeners]
        self._lock = threading.Lock()

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        stop: StopParams,
        sink: Sink = _discard,
        request_id: str | None = None,
    ) -> Request:
        """Validate and queue a request; raises InvalidRequestError or QueueFullError at once."""
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
        max_new = stop.max_new_tokens or self.max_model_len - len(prompt)
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt,
            sampling=sampling,
            stop=stop,
            max_total_tokens=len(prompt) + max_new,
            sink=sink,
        )
        self.output_processor.prepare(request)
        with self._lock:
            self.scheduler.add(request)
        return request

    def _check_prompt(self, prompt_token_ids: Sequence[int], stop: StopParams) -> list[int]:
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty: give at least one token", "prompt")
        for token_id in prompt:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise InvalidRequestError("prompt token ids must be integers", "prompt")
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    f"prompt token id {token_id} is outside the vocabulary [0, {self.vocab_size})",
                    "prompt",
                )
        limit = self.max_model_len
        max_new = stop.max_new_tokens or 1
        if len(prompt) + max_new <= limit:
            return prompt
        if self.config.truncate_prompt and max_new < limit:
            return prompt[len(prompt) - (limit - max_new) :]
        raise PromptTooLongError(
            f"the prompt has {len(prompt)} tokens and {max_new} new tokens were asked for: "
            f"{len(prompt) + max_new} in all, more than the context window of {limit} tokens; "
            "shorten the prompt or lower max_new_tokens",
            "prompt",
        )

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> Request | None:
        """End a waiting or running request now and free its slot; returns it, if it was live."""
        with self._lock:
            request = self.scheduler.get(request_id)
            if request is None:
                return None
            request.finish_reason = FinishReason.ABORT
            self._end(request)
        return request

    def _end(self, request: Request) -> None:
        """Take a request out for good; the caller holds the lock."""
        self.scheduler.finish(request)
        # A step in flight may recreate the request's generator; _process releases it again.
        self.runner.release(request.request_id)
        self._notify("on_request_finished", request)

    def _notify(self, hook: str, *args: object) -> None:
        """Call `hook` on every listener; a failing listener is logged, never stops the engine."""
        for listener in self.listeners:
            try:
                getattr(listener, hook)(*args)
            except Exception:
                logger.exception("engine listener %r failed in %s", listener, hook)

    def step(self) -> list[tuple[Request, RequestOutput]]:
        """Run one forward step for everyone scheduled; returns the events it produced."""
        with self._lock:
            work = self.scheduler.schedule()
        if work.is_empty:
            return []
        for chunk in work.prefills:
            if chunk.start == 0:  # admitted this step
                self._notify("on_request_scheduled", chunk.request)
        try:
            sampled = self.runner.execute(work)
        except Exception as exc:  # one bad step must not take the other requests down
            logger.exception("forward step failed; failing its %d requests", work.num_rows)
            return self._fail(work, exc)
        return self._process(work, sampled)

    def _process(
        self, work: SchedulerOutput, sampled: dict[str, SampledToken]
    ) -> list[tuple[Request, RequestOutput]]:
        events: list[tuple[Request, RequestOutput]] = []
        now = time.monotonic()
        num_prompt_tokens = sum(chunk.length for chunk in work.prefills)
        with self._lock:
            for chunk in work.prefills:
                chunk.request.num_computed_tokens += chunk.length
            for request in work.decodes:
                request.num_computed_tokens += 1
            for request in [chunk.request for chunk in work.prefills] + work.decodes:
                if request.is_finished:  # aborted while the step ran
                    self.runner.release(request.request_id)
                    continue
                token = sampled.get(request.request_id)
                if token is None:  # a prompt chunk that does not reach the end of the prompt
                    continue
                try:
                    event = self.output_processor.process(request, token)
                except Exception as exc:  # fail this request alone, keep the others going
                    logger.exception("output processing failed for %s", request.request_id)
                    events.append((request, self._fail_request(request, exc)))
                    continue
                self._notify("on_token", request, now)
                if request.first_token_time is None:
                    request.first_token_time = now
                request.last_token_time = now
                if event.finished:
                    self._end(request)
                events.append((request, event))
        self._notify("on_step", work.num_rows, num_prompt_tokens, len(sampled))
        return events

    def _fail_request(self, request: Request, exc: Exception) -> RequestOutput:
        """End one request with a StepFailedError; the caller holds the lock."""
        request.finish_reason = FinishReason.ERROR
        self._end(request)
        error = StepFailedError(f"the forward step failed: {type(exc).__name__}: {exc}")
        return request.final_output(error)

    def _fail(self, work: SchedulerOutput, exc: Exception) -> list[tuple[Request, RequestOutput]]:
        with self._lock:
            requests = [chunk.request for chunk in work.prefills] + work.decodes
            return [
                (request, self._fail_request(request, exc))
                for request in requests
                if not request.is_finished
            ]

    def fail_all(self, error: EngineError) -> list[tuple[Request, RequestOutput]]:
        """End every live request with `error` (the engine loop is going down)."""
        with self._lock:
            live = list(self.scheduler.waiting) + list(self.scheduler.running)
            for request in live:
                request.finish_reason = FinishReason.ERROR
                self._end(request)
        return [(request, request.final_output(error)) for request in live]

    def warm_up(self) -> None:
        """Run a full batch of short requests once, so the first real ones are not slow, then
        capture the fast decode path's CUDA graphs; raises the first step failure it met."""
        max_new = min(2, self.max_model_len - 1)
        stop = StopParams(max_new_tokens=max_new, ignore_eos=True)
        prompt = list(range(max(1, min(8, self.max_model_len - max_new))))
        listeners, self.listeners = self.listeners, []  # warm-up is not traffic: keep it out
        error: EngineError | None = None
        try:
            for _ in range(self.config.max_batch_size):
                self.add_request(prompt, SamplingParams(temperature=0.0), stop)
            while self.has_work():
                for _, event in self.step():
                    error = error or event.error
        finally:
            self.listeners = listeners
        if error is not None:
            raise error
        self.capture_decode_graphs()

    def capture_decode_graphs(self) -> None:
        """With the fast decode path, capture its CUDA graphs (once; on the engine thread)."""
        self.runner.capture_decode_graphs()
