"""Prometheus metrics move as requests flow through a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from api_fixtures import LiveServer, live_server, make_engine, wait_until
from prometheus_client.parser import text_string_to_metric_families

from model.tokenizer import Tokenizer
from service.api.app import create_app
from service.api.settings import Settings

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(max_batch_size=4) as running:
        yield running


def scrape(url: str) -> Samples:
    """Every sample of /metrics by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((f"gptserve_{name}", frozenset(labels.items())), 0.0)


def test_count_tokens_latencies_and_successes(server: LiveServer) -> None:
    prompt = "Counting the tokens of this prompt"
    num_prompt_tokens = len(Tokenizer.default().encode(prompt))
    before = scrape(server.url)
    body = {"prompt": prompt, "max_new_tokens": 5, "ignore_eos": True}
    assert httpx.post(f"{server.url}/generate", json=body, timeout=30).status_code == 200
    after = scrape(server.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("request_success_total", finish_reason="length") == 1
    assert moved("generation_tokens_total") == 5
    assert moved("prompt_tokens_total") == num_prompt_tokens
    assert moved("time_to_first_token_seconds_count") == 1
    assert moved("inter_token_latency_seconds_count") == 4
    assert moved("e2e_request_latency_seconds_count") == 1
    assert moved("request_queue_time_seconds_count") == 1
    assert moved("batch_size_count") == 5  # alone: one step per token
    assert moved("e2e_request_latency_seconds_sum") >= moved("time_to_first_token_seconds_sum")
    assert value(after, "num_requests_running") == 0
    assert value(after, "kv_cache_usage_ratio") == 0


async def _hold_a_stream_open(url: str) -> tuple[Samples, Samples]:
    body = {"prompt": "x", "max_new_tokens": 900, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream("POST", "/stream", json=body) as response,
    ):
        lines = response.aiter_lines()  # kept alive: dropping it would close the connection
        while not (await lines.__anext__()).startswith("data: "):
            pass
        during = await asyncio.to_thread(scrape, url)
    after = await asyncio.to_thread(scrape, url)
    return during, after


def test_report_running_requests_and_aborts(server: LiveServer) -> None:
    before = scrape(server.url)
    during, _ = asyncio.run(_hold_a_stream_open(server.url))
    assert value(during, "num_requests_running") == 1
    assert value(during, "num_requests_waiting") == 0
    assert value(during, "kv_cache_usage_ratio") == pytest.approx(1 / 4)
    assert wait_until(lambda: server.num_live == 0, timeout=3.0)
    after = scrape(server.url)
    aborted = value(after, "request_failure_total", reason="abort")
    assert aborted - value(before, "request_failure_total", reason="abort") == 1
    assert value(after, "num_requests_running") == 0


def test_count_rejected_requests(server: LiveServer) -> None:
    before = scrape(server.url)
    body = {"prompt": "x", "max_new_tokens": 5000}
    assert httpx.post(f"{server.url}/generate", json=body, timeout=30).status_code == 400
    after = scrape(server.url)
    rejected = value(after, "request_failure_total", reason="invalid_request")
    assert rejected - value(before, "request_failure_total", reason="invalid_request") == 1


def test_keep_metrics_of_each_app_apart() -> None:
    first = create_app(Settings(), make_engine(), "a")
    second = create_app(Settings(), make_engine(), "b")
    assert first.state.metrics.registry is not second.state.metrics.registry
    first.state.metrics.count_failure("queue_full")
    assert b'reason="queue_full"} 1.0' in first.state.metrics.render()
    assert b'reason="queue_full"} 0.0' in second.state.metrics.render()


def test_count_prefix_cache_hits_and_timeouts(server: LiveServer) -> None:
    prompt = list(range(400, 460))  # 60 tokens
    before = scrape(server.url)
    for _ in range(2):
        body = {"prompt": prompt, "max_new_tokens": 2, "temperature": 0}
        answer = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 59  # all but the last
    timed_out = {"prompt": "x", "max_new_tokens": 900, "ignore_eos": True, "timeout": 0.2}
    answer = httpx.post(f"{server.url}/generate", json=timed_out, timeout=30).json()
    assert answer["finish_reason"] == "timeout" and 0 < answer["usage"]["completion_tokens"] < 900
    after = scrape(server.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("prefix_cache_queries_total") == 2 * 60 + 1
    assert moved("prefix_cache_hits_total") == 59
    assert moved("request_failure_total", reason="timeout") == 1
