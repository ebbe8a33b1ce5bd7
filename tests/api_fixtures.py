"""Helpers for the API tests: a tiny engine, and the app served by a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn

from model.config import GPTConfig
from model.gpt2 import GPT
from model.tokenizer import Tokenizer
from service.api.app import create_app
from service.api.connections import limited_protocol
from service.api.loader import engine_config, serve_engine
from service.api.settings import Settings
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine
from service.engine.request import Request
from service.engine.stats import EngineListener

# Tiny but with a long context, so a request can run long enough to be interrupted.
TEST_CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, block_size=1024)
MODEL_NAME = "tiny-test"


def make_tiny_model(seed: int = 0) -> GPT:
    """A random-weight model in eval mode."""
    torch.manual_seed(seed)
    return GPT(TEST_CONFIG).init_weights(seed).eval()


@dataclass
class Finished:
    """What a test listener saw of a finished request."""

    request_id: str
    finish_reason: str | None
    num_output_tokens: int


@dataclass
class FinishRecorder(EngineListener):
    """Records every request the engine finishes (called on the engine thread)."""

    finished: list[Finished] = field(default_factory=list)

    def on_request_finished(self, request: Request) -> None:
        reason = request.finish_reason.value if request.finish_reason else None
        self.finished.append(Finished(request.request_id, reason, request.num_output_tokens))


def make_engine(
    max_batch_size: int = 4,
    max_queue_size: int = 16,
    listeners: tuple[EngineListener, ...] = (),
    **options: Any,
) -> AsyncEngine:
    """An engine (not started) over the tiny model; `options` go to AsyncEngine."""
    config = EngineConfig(max_batch_size=max_batch_size, max_queue_size=max_queue_size)
    engine = LLMEngine(make_tiny_model(), Tokenizer.default(), config, listeners)
    return AsyncEngine(engine, **options)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class LiveServer:
    """An app served by uvicorn on a thread; `url` is its base address."""

    url: str
    engine: AsyncEngine
    recorder: FinishRecorder
    settings: Settings

    @property
    def num_live(self) -> int:
        """Requests running or waiting in the engine."""
        scheduler = self.engine.engine.scheduler
        return scheduler.num_running + scheduler.num_waiting


@contextmanager
def live_server(
    max_batch_size: int = 4,
    max_queue_size: int = 16,
    engine: AsyncEngine | None = None,
    wait_ready: bool = True,
    **settings: Any,
) -> Iterator[LiveServer]:
    """Serve a fresh app over a tiny engine on a free port of 127.0.0.1 until the block ends."""
    recorder = FinishRecorder()
    app_settings = Settings(
        **{"warm_up": False, "max_batch_size": max_batch_size, "max_queue": max_queue_size}
        | settings
    )
    if engine is None:
        config = engine_config(app_settings, torch.device("cpu"))
        llm = LLMEngine(make_tiny_model(), Tokenizer.default(), config, (recorder,))
        engine = serve_engine(llm, app_settings)
    app = create_app(app_settings, engine, MODEL_NAME)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        http=limited_protocol(app_settings.header_timeout, app_settings.max_connections),
        timeout_keep_alive=app_settings.keep_alive_timeout,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not wait_until(lambda: server.started and (engine.is_ready or not wait_ready), 30):
            raise RuntimeError("the test server did not start")
        yield LiveServer(f"http://127.0.0.1:{port}", engine, recorder, app_settings)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@contextmanager
def serve_process(args: list[str], log_path: Any, ready_timeout: float = 90) -> Iterator[str]:
    """Run `gptserve serve ARGS --port 0` as a real process until the block ends; yields its
    base URL once /ready answers 200. Stops it with SIGTERM and checks it exits 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    repo_root = Path(__file__).resolve().parent.parent
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0", *args],
            cwd=repo_root,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert process.stdout is not None
            url = ""
            for line in process.stdout:  # the first lines say where it listens
                if "listening on http://" in line:
                    url = line.split("listening on ", 1)[1].split()[0].rstrip(",\"'")
                    break
            assert url, f"the server did not say where it listens; see {log_path}"
            deadline = time.monotonic() + ready_timeout
            while httpx.get(f"{url}/ready").status_code != 200:
                assert time.monotonic() < deadline, f"not ready in {ready_timeout} s"
                time.sleep(0.2)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=60)
        assert exit_code == 0
