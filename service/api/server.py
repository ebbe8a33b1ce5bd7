"""Run the app under uvicorn, with a SIGTERM that drains before it stops.

uvicorn's own SIGTERM handling stops at once (after waiting for open connections). Here the first
SIGTERM or SIGINT stops admitting (/ready and new generation requests answer 503), lets in-flight
requests finish for up to `drain_timeout` seconds, aborts whatever is left, and then lets uvicorn
shut down; the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.settings import Settings
from service.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

# After the drain, how long uvicorn waits for responses to finish sending before cancelling them.
GRACEFUL_SHUTDOWN_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal drains the engine first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.drain_timeout = drain_timeout
        self.listening: list[tuple[str, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._is_draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving, then say where."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.listening.append((host, port))
        for host, port in self.listening:
            shown = f"[{host}]" if ":" in host else host
            print(f"gptserve: listening on http://{shown}:{port} (docs at /docs)", flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then exit. Second signal: exit now."""
        # Not calling super(): it records the signal and re-raises it after shutdown, which
        # would turn a clean drain into death by SIGTERM instead of exit code 0.
        if self._is_draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._is_draining
            return
        self._is_draining = True
        state = getattr(self.fastapi_app.state, "gptserve", None)
        if state is not None:
            state.engine.is_draining = True  # a plain flag: /ready and submits see it at once
        # A signal handler may interrupt the event loop anywhere: hand the rest to the loop.
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        state = getattr(self.fastapi_app.state, "gptserve", None)
        if state is not None:
            engine = state.engine
            logger.info("draining for up to %.1f s", self.drain_timeout)
            if not await engine.drain(self.drain_timeout):
                logger.warning("drain timeout: aborting the requests still running")
                await engine.shutdown()
            logger.info("drained; shutting down")
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one."""
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
    settings: Settings, engine: AsyncEngine | None = None, model_name: str | None = None
) -> int:
    """Serve until a signal; returns the exit code (0 after a clean drain)."""
    app = create_app(settings, engine, model_name)
    config = uvicorn.Config(
        app,
        log_config=None,  # configure_logging() already set up the root logger
        access_log=False,  # the middleware writes access lines with request ids and tokens
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = DrainingServer(config, app, settings.drain_timeout)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        print(
            f"gptserve serve: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1
