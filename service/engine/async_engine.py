"""The asyncio front of the engine: admit, stream outputs, abort; the model runs on a thread.

The engine thread owns the LLMEngine. The event loop never touches its state: new requests,
aborts and pauses reach it as commands on a thread-safe queue, drained at the top of every step
(as vLLM's engine core does), and each step's events come back in one `call_soon_threadsafe`.
Admission is decided on the event loop from counts it keeps itself (requests in flight, prompt
tokens not yet computed), so a request that must be refused is refused in microseconds even
while a long step runs.

Each API request is one `RequestGroup` (its n choices and prompts): one queue of
`(index, output)` on the event loop; a request ended by an abort ends with an output whose
finish reason says so (abort, stalled), like any other. A group whose reader falls behind (a client that stops
reading its stream) is paused in the engine: its requests keep their slots but take no steps
until the reader catches up. A group paused for longer than `stall_timeout` seconds is aborted.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from model.sampling import SamplingParams
from service.engine.cpu_threads import release_openmp_threads
from service.engine.errors import (
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    StepFailedError,
)
from service.engine.llm_engine import Event, LLMEngine
from service.engine.params import StopParams
from service.engine.request import FinishReason, Request, RequestOutput

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 0.5
PAUSED_WAIT_SECONDS = 0.02  # how often a step with nothing runnable looks again
DEFAULT_STREAM_BUFFER = 64  # unread events per request before its group is paused
DEFAULT_STALL_TIMEOUT = 30.0  # seconds a group may stay paused before it is aborted


@dataclass
class RequestSpec:
    """One engine request of an API request: its prompt and settings."""

    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    stop: StopParams
    prompt_logprobs: int | None = None
    prompt_logprob_ranks: bool = False  # each prompt token's rank too
    speculative: bool | None = None  # None: as the server's speculative decoding says


class RequestGroup:
    """The outputs of one API request's engine requests, as `(index, output)` in arrival order.

    Leaving the iteration early, or `close()`, aborts the requests that have not finished.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        requests: list[Request],
        max_buffered: int,
        stall_timeout: float,
    ) -> None:
        self.engine = engine
        self.requests = requests
        self._index = {request.request_id: i for i, request in enumerate(requests)}
        self._buffer: collections.deque[tuple[int, RequestOutput]] = collections.deque()
        self._waiter: asyncio.Future[bool] | None = None  # True: outputs came; False: idle
        self._num_open = len(requests)
        self._finished: set[str] = set()
        self._max_buffered = max_buffered
        self._stall_timeout = stall_timeout
        self._stall_timer: asyncio.TimerHandle | None = None
        self.is_paused = False
        self.stalled_callbacks: list[Callable[[], None]] = []

    @property
    def request_ids(self) -> list[str]:
        """The engine ids of the group's requests, by index."""
        return [request.request_id for request in self.requests]

    def push(self, output: RequestOutput) -> None:
        """An output arrived from the engine (on the event loop)."""
        index = self._index[output.request_id]
        if output.finished:
            self._finished.add(output.request_id)
        self._buffer.append((index, output))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
        if not self.is_paused and len(self._buffer) > self._max_buffered * self._num_open_live:
            self._pause()

    @property
    def _num_open_live(self) -> int:
        return max(1, len(self.requests) - len(self._finished))

    def _pause(self) -> None:
        self.is_paused = True
        self.engine.set_paused(self._live_ids(), True)
        self._restart_stall_timer()

    def _restart_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        loop = asyncio.get_running_loop()
        self._stall_timer = loop.call_later(self._stall_timeout, self._on_stalled)

    def _resume(self) -> None:
        self.is_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.engine.set_paused(self._live_ids(), False)

    def _on_stalled(self) -> None:
        if not self.is_paused:
            return
        logger.warning(
            "a client stopped reading for %.0f s: aborting its %d requests",
            self._stall_timeout,
            len(self._live_ids()),
        )
        for request_id in self._live_ids():
            self.engine.abort(request_id, FinishReason.STALLED)
        for callback in self.stalled_callbacks:
            callback()

    def _live_ids(self) -> list[str]:
        return [r.request_id for r in self.requests if r.request_id not in self._finished]

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate(None)  # type: ignore[return-value]

    def with_idle(self, idle_after: float) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        """The outputs, and None whenever none came for `idle_after` seconds (a stream's
        keep-alive), without a task per item."""
        return self._iterate(idle_after)

    async def _iterate(
        self, idle_after: float | None
    ) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        loop = asyncio.get_running_loop()
        try:
            while self._num_open:
                if not self._buffer:
                    waiter = self._waiter = loop.create_future()
                    timer = None
                    if idle_after is not None:
                        timer = loop.call_later(idle_after, _resolve, waiter, False)
                    got_output = await waiter
                    self._waiter = None
                    if timer is not None:
                        timer.cancel()
                    if not got_output:
                        yield None
                    continue
                index, output = self._buffer.popleft()
                if self.is_paused:
                    if len(self._buffer) <= self._max_buffered * self._num_open_live // 2:
                        self._resume()
                    else:  # reading, if slowly: the stall is measured from the last read
                        self._restart_stall_timer()
                if output.error is not None:
                    raise output.error
                if output.finished:
                    self._num_open -= 1
                yield index, output
        finally:
            self.close()

    def close(self) -> None:
        """Abort every request of the group still live (a no-op once all finished)."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        for request_id in self._live_ids():
            self.engine.abort(request_id)
        self._finished.update(self.request_ids)


class RequestStream:
    """The outputs of one request, as an async iterator; leaving it early aborts the request."""

    def __init__(self, group: RequestGroup) -> None:
        self.group = group
        self.request = group.requests[0]

    @property
    def request_id(self) -> str:
        """The engine's id of this request."""
        return self.request.request_id

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for _, output in self.group:
            yield output


class AsyncEngine:
    """Owns the engine thread; safe to use from one asyncio event loop."""

    def __init__(
        self,
        engine: LLMEngine,
        max_queued_prompt_tokens: int | None = None,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        self.engine = engine
        config = engine.config
        self.max_live = config.max_batch_size + config.max_queue_size
        self.max_queued_prompt_tokens = max_queued_prompt_tokens
        self.stream_buffer = stream_buffer
        self.stall_timeout = stall_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._commands: collections.deque[Callable[[LLMEngine], Event | None]] = collections.deque()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        # Event-loop state: what admission decides from.
        self._live: dict[str, Request] = {}
        self._unstarted_prompt_tokens: dict[str, int] = {}
        self.num_queued_prompt_tokens = 0
        self.is_ready = False
        self.is_draining = False
        self.error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        """Whether the engine loop is running (false once it died or was shut down)."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_live(self) -> int:
        """Requests admitted and not yet finished (as the event loop knows)."""
        return len(self._live)

    async def start(self, warm_up: bool = True) -> None:
        """Start the engine thread, which warms the model up first; returns once it is ready.

        Every forward pass, the warm-up's included, runs on that one thread: a second thread
        doing compute would give the process a second OpenMP team (see `cpu_threads`). Raises
        what the warm-up raised, or EngineNotReadyError if `shutdown()` came first.
        """
        self._loop = asyncio.get_running_loop()
        release_openmp_threads()  # whatever this thread computed (loading), its team goes
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(warm_up, ready), name="engine-loop", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)
        if self._stop.is_set():
            raise EngineNotReadyError("the engine was shut down while it was starting")
        self.is_ready = True

    # ------------------------------------------------------------------ event-loop side

    def _check_accepting(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")
        if not self.is_ready or self.is_draining or not self.is_alive:
            raise EngineNotReadyError("the engine is not accepting requests (starting or draining)")

    def submit_group(
        self,
        specs: Sequence[RequestSpec],
        group_id: str,
        *,
        client_id: str = "",
        priority: int = 0,
        timeout: float | None = None,
    ) -> RequestGroup:
        """Admit one API request's engine requests, all or none; raises at once if any is
        invalid, the queue is full or the engine is not ready."""
        self._check_accepting()
        if len(self._live) + len(specs) > self.max_live:
            raise QueueFullError(
                f"the server is at capacity ({self.max_live} requests in flight, "
                f"{self.engine.config.max_queue_size} of them waiting); retry later"
            )
        requests = [
            self.engine.make_request(
                spec.prompt_token_ids,
                spec.sampling,
                spec.stop,
                request_id=f"{group_id}-{index}" if len(specs) > 1 else group_id,
                priority=priority,
                client_id=client_id,
                group_id=group_id,
                timeout=timeout,
                prompt_logprobs=spec.prompt_logprobs,
                prompt_logprob_ranks=spec.prompt_logprob_ranks,
                speculative=spec.speculative,
            )
            for index, spec in enumerate(specs)
        ]
        for request in requests:
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already in use")
        new_prompt_tokens = sum(request.num_prompt_tokens for request in requests)
        limit = self.max_queued_prompt_tokens
        if limit is not None and self.num_queued_prompt_tokens + new_prompt_tokens > limit:
            raise QueueFullError(
                f"the server has {self.num_queued_prompt_tokens} prompt tokens waiting to be "
                f"computed and this request would add {new_prompt_tokens}, over the limit of "
                f"{limit}; retry later"
            )
        group = RequestGroup(self, requests, self.stream_buffer, self.stall_timeout)
        for request in requests:
            request.sink = group.push
            self._live[request.request_id] = request
            self._unstarted_prompt_tokens[request.request_id] = request.num_prompt_tokens
            self._command(functools.partial(_add, request=request))
        self.num_queued_prompt_tokens += new_prompt_tokens
        return group

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        stop: StopParams,
        request_id: str | None = None,
        **options: object,
    ) -> RequestStream:
        """Admit one request; raises at once if it is invalid, the queue is full or not ready."""
        spec = RequestSpec(prompt_token_ids, sampling, stop)
        if "prompt_logprobs" in options:
            spec.prompt_logprobs = options.pop("prompt_logprobs")  # type: ignore[assignment]
        group_id = request_id or f"req-{time.monotonic_ns()}-{id(spec)}"
        return RequestStream(self.submit_group([spec], group_id, **options))  # type: ignore[arg-type]

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Cancel a waiting or running request; the engine frees its slot before its next step."""
        if request_id in self._live:
            self._command(lambda engine: engine.abort(request_id, reason))

    def set_paused(self, request_ids: Sequence[str], is_paused: bool) -> None:
        """Pause (or resume) requests whose reader is behind."""
        ids = [request_id for request_id in request_ids if request_id in self._live]
        if ids:
            self._command(lambda engine: _set_paused(engine, ids, is_paused))

    def _command(self, command: Callable[[LLMEngine], Event | None]) -> None:
        self._commands.append(command)
        self._wakeup.set()

    def _dispatch(self, events: list[Event]) -> None:
        """Hand a step's events to their groups (on the event loop)."""
        for request, output in events:
            request_id = output.request_id
            unstarted = self._unstarted_prompt_tokens.pop(request_id, None)
            if unstarted is not None:
                self.num_queued_prompt_tokens -= unstarted
            if output.finished:
                self._live.pop(request_id, None)
            try:
                request.sink(output)
            except Exception:  # a broken reader must not stop the others' outputs
                logger.exception("delivering an output of %s failed", request_id)

    def _fail_live(self, error: EngineDeadError) -> None:
        """End every request the event loop still counts as live with `error`."""
        for request in list(self._live.values()):
            request.finish_reason = FinishReason.ERROR
            self._dispatch([(request, request.final_output(error))])

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait up to `timeout` s for live requests; True if all finished."""
        self.is_draining = True
        deadline = time.monotonic() + timeout
        while self._live and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._live

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine thread."""
        self.is_ready = False
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        await asyncio.sleep(0)  # let the last dispatch run

    # ---------------------------------------------------------------------- engine thread

    def _run(self, warm_up: bool, ready: concurrent.futures.Future[None]) -> None:
        # Once running, the future cannot be cancelled (a cancelled start() just stops waiting).
        waited_for = ready.set_running_or_notify_cancel()
        try:
            started = time.monotonic()
            if warm_up:
                self.engine.warm_up()
                logger.info("warm-up took %.2f s", time.monotonic() - started)
            else:
                self.engine.runner.check_logits()
                self.engine.capture_decode_graphs()
        except BaseException as exc:  # start() raises it; the loop never starts
            logger.exception("the engine failed to warm up")
            self.error = exc
            if waited_for:
                ready.set_exception(exc)
            return
        if waited_for:
            ready.set_result(None)
        engine = self.engine
        try:
            while not self._stop.is_set():
                events = self._apply_commands()
                ran = False
                if engine.has_work():
                    events += engine.step()
                    ran = engine.last_step_num_rows > 0
                if events:
                    self._call_in_loop(self._dispatch, events)
                if not ran and not self._commands:
                    wait = PAUSED_WAIT_SECONDS if engine.has_work() else IDLE_WAIT_SECONDS
                    self._wakeup.wait(wait)
                    self._wakeup.clear()
            events = self._apply_commands()
            for request in engine.scheduler.live_requests():
                event = engine.abort(request.request_id)
                if event is not None:
                    events.append(event)
            if events:
                self._call_in_loop(self._dispatch, events)
        except BaseException as exc:  # the loop is dead: tell everyone waiting, then health
            logger.exception("engine loop died")
            self.error = exc
            dead = EngineDeadError(f"the engine loop died: {exc!r}")
            try:
                events = engine.fail_all(dead)
            except BaseException:  # the engine's state is beyond use: the loop ends them all
                logger.exception("failing the live requests failed")
                events = []
            self._call_in_loop(self._dispatch, events)
            # Requests whose add command never ran are known only to the event loop.
            self._call_in_loop(self._fail_live, dead)

    def _apply_commands(self) -> list[Event]:
        events: list[Event] = []
        while self._commands:
            command = self._commands.popleft()
            try:
                event = command(self.engine)
            except Exception:  # a command is plain bookkeeping: log it, keep the loop alive
                logger.exception("an engine command failed")
                continue
            if event is not None:
                events.append(event)
        return events

    def _call_in_loop(self, callback, *args) -> None:  # type: ignore[no-untyped-def]
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(callback, *args)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _add(engine: LLMEngine, request: Request) -> Event | None:
    """Queue a request in the engine; if that fails, end it with the error instead."""
    try:
        engine.add(request)
    except Exception as exc:
        logger.exception("queueing request %s failed", request.request_id)
        request.finish_reason = FinishReason.ERROR
        return request, request.final_output(StepFailedError(f"queueing failed: {exc!r}"))
    return None


def _set_paused(engine: LLMEngine, request_ids: list[str], is_paused: bool) -> None:
    for request_id in request_ids:
        engine.set_paused(request_id, is_paused)
