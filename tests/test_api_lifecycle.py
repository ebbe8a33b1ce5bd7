"""Readiness while the engine starts, and health once its loop has died."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from api_fixtures import live_server, make_engine, wait_until

pytestmark = pytest.mark.timeout(60)


def test_report_not_ready_until_the_engine_has_started() -> None:
    engine = make_engine()
    gate = threading.Event()
    start = engine.start

    async def gated_start(warm_up: bool = True) -> None:  # a warm-up that takes until `gate`
        while not gate.is_set():
            await asyncio.sleep(0.01)
        await start(warm_up)

    engine.start = gated_start  # type: ignore[method-assign]
    with (
        live_server(engine=engine, wait_ready=False) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert client.get("/health").status_code == 200  # alive while starting
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["error"]["code"] == "not_ready"
        refused = client.post("/generate", json={"prompt": "x"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        gate.set()
        assert wait_until(lambda: client.get("/ready").status_code == 200, timeout=10)
        assert client.post("/generate", json={"prompt": "x"}).status_code == 200


def test_report_unhealthy_once_the_engine_loop_died() -> None:
    with live_server() as server, httpx.Client(base_url=server.url, timeout=30) as client:
        llm_engine = server.engine.engine

        def broken_step() -> list:
            raise RuntimeError("the scheduler is corrupt")

        llm_engine.step = broken_step  # type: ignore[method-assign]
        failed = client.post("/generate", json={"prompt": "x"})
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "engine_dead"
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        assert client.post("/generate", json={"prompt": "x"}).status_code == 503
