"""The asyncio front of the engine: submit, stream outputs, abort; the model runs on a thread.

The step loop runs on one dedicated thread, so the event loop keeps answering (health checks,
new submits, disconnects) while the model computes. Each step's events are handed to the event
loop in one `call_soon_threadsafe`, where they go into each request's queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence

from model.sampling import SamplingParams
from service.engine.cpu_threads import release_openmp_threads
from service.engine.errors import EngineDeadError, EngineNotReadyError
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams
from service.engine.request import Request, RequestOutput

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 0.5


class RequestStream:
    """The outputs of one request, as an async iterator; leaving it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request: Request, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request = request
        self._queue: asyncio.Queue[RequestOutput] = queue

    @property
    def request_id(self) -> str:
        """The engine's id of this request."""
        return self.request.request_id

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                output = await self._queue.get()
                if output.error is not None:
                    finished = True
                    raise output.error
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            # A consumer that stops reading (client disconnect, cancellation) frees the slot now.
            if not finished:
                self.engine.abort(self.request_id)


class AsyncEngine:
    """Owns the engine thread; safe to use from one asyncio event loop."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self.is_ready = False
        self.is_draining = False
        self.error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        """Whether the engine loop is running (false once it died or was shut down)."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

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

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        stop: StopParams,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; raises at once if it is invalid, the queue is full or not ready."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")
        if not self.is_ready or self.is_draining or not self.is_alive:
            raise EngineNotReadyError("the engine is not accepting requests (starting or draining)")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request = self.engine.add_request(
            prompt_token_ids, sampling, stop, sink=queue.put_nowait, request_id=request_id
        )
        if self.error is not None:  # the loop died while this request was being queued
            self.engine.abort(request.request_id)
            raise EngineDeadError(f"the engine loop died: {self.error!r}")
        self._wakeup.set()
        return RequestStream(self, request, queue)

    def abort(self, request_id: str) -> None:
        """Cancel a waiting or running request; its slot is free at once."""
        request = self.engine.abort(request_id)
        if request is not None and self._loop is not None and not self._loop.is_closed():
            # Through the loop's queue, behind the token events a step already handed over.
            self._loop.call_soon(request.sink, request.final_output())

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait up to `timeout` s for live requests; True if all finished."""
        self.is_draining = True
        deadline = time.monotonic() + timeout
        while self.engine.has_work() and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.engine.has_work()

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine thread."""
        self.is_ready = False
        for request in list(self.engine.scheduler.waiting) + list(self.engine.scheduler.running):
            self.abort(request.request_id)
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def _run(self, warm_up: bool, ready: concurrent.futures.Future[None]) -> None:
        # Once running, the future cannot be cancelled (a cancelled start() just stops waiting).
        waited_for = ready.set_running_or_notify_cancel()
        try:
            started = time.monotonic()
            if warm_up:
                self.engine.warm_up()
                logger.info("warm-up took %.2f s", time.monotonic() - started)
            else:
                self.engine.capture_decode_graphs()
        except BaseException as exc:  # start() raises it; the loop never starts
            logger.exception("the engine failed to warm up")
            self.error = exc
            if waited_for:
                ready.set_exception(exc)
            return
        if waited_for:
            ready.set_result(None)
        try:
            while not self._stop.is_set():
                if not self.engine.has_work():
                    self._wakeup.wait(IDLE_WAIT_SECONDS)
                    self._wakeup.clear()
                    continue
                events = self.engine.step()
                if events:
                    self._call_in_loop(self._dispatch, events)
        except BaseException as exc:  # the loop is dead: tell everyone waiting, then health
            logger.exception("engine loop died")
            self.error = exc
            dead = EngineDeadError(f"the engine loop died: {exc!r}")
            self._call_in_loop(self._dispatch, self.engine.fail_all(dead))

    def _call_in_loop(self, callback, *args) -> None:  # type: ignore[no-untyped-def]
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    @staticmethod
    def _dispatch(events: list[tuple[Request, RequestOutput]]) -> None:
        for request, output in events:
            request.sink(output)
