"""Run the app under uvicorn, with a SIGTERM that drains before it stops.

uvicorn's own SIGTERM handling stops at once (after waiting for open connections). Here the first
SIGTERM or SIGINT stops admitting (/ready and new generation requests answer 503), lets in-flight
requests finish for up to `drain_timeout` seconds, aborts whatever is left, and then lets uvicorn
shut down; the process exits 0. A second signal is a forced exit: one warning line, every request
still in the engine aborted (open streams get their error event and `[DONE]`), then the process
exits with 128 + the signal's number, without waiting for connections or tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.connections import limited_protocol
from service.api.logging_config import STARTUP_LOGGER
from service.api.settings import Settings
from service.api.startup_summary import startup_summary
from service.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
startup_logger = logging.getLogger(STARTUP_LOGGER)

# After the drain, how long uvicorn waits for responses to finish sending before cancelling them.
GRACEFUL_SHUTDOWN_SECONDS = 5
# On a forced exit, how long aborted streams get to send their error event before the loop stops,
# and how long the app's own shutdown (engine thread) gets after that.
FORCED_EXIT_FLUSH_SECONDS = 0.3
FORCED_EXIT_APP_SHUTDOWN_SECONDS = 2.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal drains the engine first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.drain_timeout = drain_timeout
        self.listening: list[tuple[str, int]] = []
        self.forced_by: int | None = None  # the signal that forced the exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._is_draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving, then say where and what, in one line."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.listening.append((host, port))
        state = getattr(self.fastapi_app.state, "gptserve", None)
        if state is None or not self.started:
            return
        for host, port in self.listening:
            summary = startup_summary(self.fastapi_app, host, port)
            startup_logger.info(summary.message(), extra=summary.fields())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown; on a forced exit, still end the app's lifespan (briefly)."""
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            # uvicorn skips the lifespan shutdown when forced, and the lifespan task would then
            # be cancelled at exit, with a traceback in the log.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.lifespan.shutdown(), FORCED_EXIT_APP_SHUTDOWN_SECONDS)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then exit. Second signal: exit now."""
        # Not calling super(): it records the signal and re-raises it after shutdown, which
        # would turn a clean drain into death by SIGTERM instead of exit code 0.
        if self._loop is None:  # not serving yet: nothing to drain
            self.should_exit = True
            return
        if not self._is_draining:
            self._is_draining = True
            state = getattr(self.fastapi_app.state, "gptserve", None)
            if state is not None:
                state.engine.is_draining = True  # a plain flag: /ready and submits see it at once
            # A signal handler may interrupt the event loop anywhere: hand the rest to the loop.
            self._loop.call_soon_threadsafe(self._begin_drain)
        elif self.forced_by is None:
            self.forced_by = sig
            self.force_exit = True  # uvicorn stops waiting for connections and tasks
            self._loop.call_soon_threadsafe(self._begin_forced_exit)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        state = getattr(self.fastapi_app.state, "gptserve", None)
        if state is not None:
            engine = state.engine
            logger.info(
                "draining for up to %.1f s (a second Ctrl-C or SIGTERM exits at once)",
                self.drain_timeout,
            )
            if not await engine.drain(self.drain_timeout):
                logger.warning("drain timeout: aborting the requests still running")
                await engine.shutdown()
            logger.info("drained; shutting down")
        self.should_exit = True

    def _begin_forced_exit(self) -> None:
        asyncio.ensure_future(self._forced_exit())

    async def _forced_exit(self) -> None:
        name = signal.Signals(self.forced_by or signal.SIGINT).name
        state = getattr(self.fastapi_app.state, "gptserve", None)
        num_live = 0
        if state is not None:
            scheduler = state.engine.engine.scheduler
            num_live = scheduler.num_running + scheduler.num_waiting
        logger.warning("second %s: exiting now, aborting %d request(s)", name, num_live)
        if self._drain_task is not None:
            self._drain_task.cancel()
        if state is not None:
            # Aborting happens before shutdown's first await; its thread join is not waited for.
            asyncio.ensure_future(state.engine.shutdown())
            await asyncio.sleep(FORCED_EXIT_FLUSH_SECONDS)  # let streams send their error event
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0 picks a free one), not yet listening.

    Binding claims the port, so a taken port fails here, before the model loads; uvicorn starts
    listening on the socket once the app is ready.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run_server(
    settings: Settings,
    engine: AsyncEngine | None = None,
    model_name: str | None = None,
    sock: socket.socket | None = None,
) -> int:
    """Serve until a signal; returns the exit code (0 after a clean drain).

    `sock` is a socket bound beforehand with `bind_socket`; without it, one is bound here.
    """
    if sock is None:
        try:
            sock = bind_socket(settings.host, settings.port)
        except OSError as exc:
            print(
                f"gptserve serve: cannot listen on {settings.host}:{settings.port}: {exc}",
                file=sys.stderr,
            )
            return 1
    app = create_app(settings, engine, model_name)
    config = uvicorn.Config(
        app,
        log_config=None,  # configure_logging() already set up the root logger
        access_log=False,  # the middleware writes access lines with request ids and tokens
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        http=limited_protocol(settings.header_timeout, settings.max_connections),
        # uvicorn annotates this int but only hands it to loop.call_later: fractions work.
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, app, settings.drain_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if server.forced_by is not None:
        return 128 + server.forced_by
    return 0 if server.started else 1
