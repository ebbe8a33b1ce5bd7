"""A hostile or careless client cannot stall the others: fast refusals, fair slots, bounded cost
and memory per request, timeouts for half-sent requests, a cap on connections."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from api_fixtures import MODEL_NAME, LiveServer, live_server, make_tiny_model, wait_until

from model.loading import save_checkpoint
from model.tokenizer import Tokenizer
from service.api.loader import ServeConfigError, load_engine
from service.api.settings import Settings
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.errors import ModelNotUsableError
from service.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.timeout(120)

LONG = {"max_new_tokens": 900, "ignore_eos": True}


def hold_steps(server: LiveServer, seconds: float) -> threading.Event:
    """Make every forward step take at least `seconds`; returns an event set at each step."""
    runner = server.engine.engine.runner
    execute = runner.execute
    stepped = threading.Event()

    def slow(*args: object, **kwargs: object) -> object:
        stepped.set()
        time.sleep(seconds)
        return execute(*args, **kwargs)

    runner.execute = slow  # type: ignore[method-assign]
    return stepped


def test_refuse_at_capacity_in_milliseconds_while_a_step_runs() -> None:
    with live_server(max_batch_size=1, max_queue_size=0) as server:
        stepped = hold_steps(server, 0.5)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            busy = threading.Thread(
                target=client.post, args=("/generate",), kwargs={"json": {"prompt": "x", **LONG}}
            )
            busy.start()
            assert stepped.wait(5)  # a half-second step is running now
            latencies = []
            for _ in range(20):
                started = time.perf_counter()
                response = client.post("/generate", json={"prompt": "y", "max_new_tokens": 2})
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 429
                assert response.headers["retry-after"] == "1"
            assert statistics.median(latencies) < 0.010, latencies
            for request in list(server.engine._live):
                server.engine.abort(request)
            busy.join(timeout=30)


async def _many_choices(url: str, body: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await client.post("/v1/completions", json=body)


def test_short_request_overtakes_two_huge_ones() -> None:
    with live_server(max_batch_size=8, max_queue_size=300) as server:
        body = {"model": MODEL_NAME, "prompt": [f"p{i}" for i in range(8)], "n": 16}
        body |= {"max_tokens": 400, "ignore_eos": True, "temperature": 0}

        def run_huge() -> None:
            asyncio.run(_many_choices(server.url, body))

        huge = [threading.Thread(target=run_huge) for _ in range(2)]
        for thread in huge:
            thread.start()
        assert wait_until(lambda: server.engine.engine.scheduler.num_waiting > 200, 10)
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            response = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 4})
        elapsed = time.monotonic() - started
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
        assert elapsed < 2.0, elapsed
        for request in list(server.engine._live):
            server.engine.abort(request)
        for thread in huge:
            thread.join(timeout=60)


def test_slot_cap_per_request_leaves_room_for_others() -> None:
    with live_server(max_batch_size=4, max_queue_size=64, max_slots_per_request=2) as server:
        body = {"model": MODEL_NAME, "prompt": "x", "n": 8, "max_tokens": 300, "ignore_eos": True}

        def run_big() -> None:
            asyncio.run(_many_choices(server.url, body))

        big = threading.Thread(target=run_big)
        big.start()
        scheduler = server.engine.engine.scheduler
        assert wait_until(lambda: scheduler.num_running == 2 and scheduler.num_waiting == 6, 10)
        assert scheduler.num_free_slots == 2  # its other choices wait; they are not refused
        for request in list(server.engine._live):
            server.engine.abort(request)
        big.join(timeout=30)


def test_huge_logit_bias_costs_its_own_request_only() -> None:
    with (
        live_server(max_batch_size=4) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        plain = {"prompt": "The", "max_new_tokens": 30, "ignore_eos": True, "temperature": 0}
        client.post("/generate", json=plain)  # warm
        started = time.perf_counter()
        client.post("/generate", json=plain)
        alone = time.perf_counter() - started
        bias = {str(token): -0.5 for token in range(50257)}  # every token: about 600 KB
        heavy = {"prompt": "The", "logit_bias": bias, **LONG, "max_new_tokens": 200}
        content = json.dumps(heavy).encode()
        assert len(content) < 1_048_576
        done = threading.Event()

        def run_heavy() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as other:
                headers = {"content-type": "application/json"}
                assert other.post("/generate", content=content, headers=headers).status_code == 200
            done.set()

        thread = threading.Thread(target=run_heavy)
        thread.start()
        assert wait_until(lambda: server.engine.engine.scheduler.num_running == 1, 10)
        started = time.perf_counter()
        response = client.post("/generate", json=plain)
        beside = time.perf_counter() - started
        assert response.status_code == 200
        assert beside < 2 * alone + 0.05, (alone, beside)
        thread.join(timeout=120)
        assert done.is_set()


def raw_stream_request(url: str, body: dict, receive_buffer: int = 4096) -> socket.socket:
    """Send a streaming POST over a raw socket that will never be read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_reader_that_never_reads_is_paused_then_aborted() -> None:
    settings = {"stream_buffer": 4, "stalled_stream_timeout": 1.5}
    with live_server(max_batch_size=16, max_queue_size=200, **settings) as server:
        body = {"model": MODEL_NAME, "prompt": [f"p{i}" for i in range(8)], "n": 16}
        body |= {"max_tokens": 900, "ignore_eos": True, "stream": True, "logprobs": 5}
        sock = raw_stream_request(server.url, body)
        try:
            engine: AsyncEngine = server.engine
            assert wait_until(lambda: len(engine._live) == 128, 10)
            groups = {request.sink.__self__ for request in engine._live.values()}  # type: ignore[attr-defined]
            (group,) = groups
            assert wait_until(lambda: group.is_paused, 10), "never paused"
            # while paused, what is held for it is bounded: stream_buffer events per request,
            # plus at most a step that was already running
            for _ in range(10):
                assert len(group._buffer) <= 4 * 128 + 2 * 16
                time.sleep(0.05)
            assert wait_until(lambda: not engine._live, 10), "not aborted"
            reasons = {f.finish_reason for f in server.recorder.finished}
            assert reasons == {"stalled"}
            assert all(f.num_output_tokens < 900 for f in server.recorder.finished)
            metrics = httpx.get(f"{server.url}/metrics").text
            assert 'gptserve_request_failure_total{reason="stalled"} 128.0' in metrics
        finally:
            sock.close()


def test_half_sent_request_is_closed_after_the_header_timeout() -> None:
    with live_server(header_timeout=0.5) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /hea")
            started = time.monotonic()
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            elapsed = time.monotonic() - started
        assert data.startswith(b"HTTP/1.1 408")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_timeout"
        assert 0.3 < elapsed < 3.0
        # a complete request on a fresh connection is served as usual
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_connections_over_the_cap_get_503_in_the_error_shape() -> None:
    with live_server(max_connections=2, header_timeout=5) as server:
        host, port = server.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.1)
            with socket.create_connection((host, int(port)), timeout=5) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                data = b""
                while chunk := extra.recv(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 503")
            error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == "too_many_connections"
            # an HTTP client gets the answer, not a reset connection, also with a body
            answer = httpx.post(f"{server.url}/generate", json={"prompt": "x" * 4000})
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.1)
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_refuse_nan_weights_at_load(tmp_path: Path) -> None:
    model = make_tiny_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("nan")
    save_checkpoint(model, tmp_path / "broken")
    with pytest.raises(ServeConfigError, match="NaN or infinite"):
        load_engine(Settings(model=str(tmp_path / "broken"), device="cpu"))


def test_refuse_to_start_when_logits_are_not_finite() -> None:
    model = make_tiny_model()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("inf"))
    engine = AsyncEngine(LLMEngine(model, Tokenizer.default(), EngineConfig(max_batch_size=2)))

    async def start() -> None:
        await engine.start(warm_up=True)

    with pytest.raises(ModelNotUsableError, match="not finite"):
        asyncio.run(start())
