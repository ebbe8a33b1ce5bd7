"""The loads a comparison sends to each server; each returns named figures for the table.

All use the OpenAI completions API with token-id prompts, so every server gets exactly the same
tokens; greedy, end-of-text ignored where output length matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import statistics
import time
from typing import Any

import httpx

from service.bench import BenchConfig, run_benchmark
from service.bench.report import format_errors

Figures = dict[str, float | None]
DIGEST = "digest"  # not a figure: a fingerprint of the outputs, compared across servers


def _client(concurrency: int, timeout: float = 600.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


async def _complete(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"{url}/v1/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
    return response.json()


async def _bounded(jobs: list, concurrency: int) -> list:  # type: ignore[type-arg]
    """Run coroutine factories with at most `concurrency` in flight; results in order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(job):  # type: ignore[no-untyped-def]
        async with semaphore:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


def random_tokens(count: int, rng: random.Random) -> list[int]:
    """Token ids of ordinary BPE tokens (no end-of-text)."""
    return [rng.randrange(256, 50000) for _ in range(count)]


# -------------------------------------------------------------------------------- decode


def decode(
    url: str, model: str, levels: tuple[int, ...], prompt_tokens: int, max_tokens: int
) -> Figures:
    """Streamed generation at each concurrency level: tokens/s, and TTFT p50 at the last."""
    config = BenchConfig(
        base_url=url,
        model=model,
        concurrency_levels=levels,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        ignore_eos=True,
        warmup=2,
    )
    result = asyncio.run(run_benchmark(config, show_progress=False))
    figures: Figures = {}
    for level in result.levels:
        figures[f"tok/s @{level.concurrency}"] = level.output_tokens_per_second
        if level.num_failed:
            figures[f"failed @{level.concurrency}"] = float(level.num_failed)
            print(f"#   {format_errors(level)}", flush=True)
    last = result.levels[-1]
    figures[f"TTFT p50 @{last.concurrency} ms"] = last.ttft_p50_ms
    # What the load client took from the machine it shares with the server.
    figures[f"client CPU % @{last.concurrency}"] = last.client_cpu_percent
    return figures


# -------------------------------------------------------------------------------- burst


def burst(url: str, model: str, num_requests: int) -> Figures:
    """`num_requests` at once (10x what the server holds): how fast the refusals come.

    A plain asyncio HTTP/1.1 client: httpx's connection pool spends time quadratic in its size,
    which at thousands of connections is tens of seconds of client time that would be read as
    the server's. The connections are opened first, a few hundred at a time (thousands of
    simultaneous connects overflow the listen backlog and wait on SYN retries), then every
    request is written at once and timed from its write to the end of its answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)

    async def post(
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], index: int
    ) -> tuple[int, float]:
        reader, writer = connection
        body = {"model": model, "prompt": [1000 + index, 7], "max_tokens": 64}
        payload = json.dumps(body | {"ignore_eos": True, "temperature": 0}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        started = time.perf_counter()
        try:
            writer.write(head.encode() + payload)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            status = 0  # refused, reset or cut: no answer at all
        return status, time.perf_counter() - started

    async def main() -> Figures:
        connections = []
        for start in range(0, num_requests, 256):
            count = min(256, num_requests - start)
            opening = (asyncio.open_connection(host, int(port)) for _ in range(count))
            connections += await asyncio.gather(*opening)
        try:
            answers = await asyncio.gather(
                *(post(connection, i) for i, connection in enumerate(connections))
            )
        finally:
            for _, writer in connections:
                writer.close()
        latencies: dict[int, list[float]] = {}
        for status, seconds in answers:
            latencies.setdefault(status, []).append(seconds)
        refused = sorted(latencies.get(429, []))
        figures: Figures = {
            "sent": float(num_requests),
            "200": float(len(latencies.get(200, []))),
            "429": float(len(refused)),
            "503": float(len(latencies.get(503, []))),
            "no answer": float(len(latencies.get(0, []))),
        }
        if refused:
            figures["429 p50 ms"] = statistics.median(refused) * 1000
            figures["429 p99 ms"] = refused[min(len(refused) - 1, int(0.99 * len(refused)))] * 1000
        return figures

    return asyncio.run(main())


# ------------------------------------------------------------------------------- scoring


def scoring(
    url: str, model: str, num_prompts: int, prompt_tokens: int, concurrency: int, echo_zero: bool
) -> Figures:
    """Score `num_prompts` prompts (echo + logprobs; with `echo_zero`, max_tokens 0), against
    generating one greedy token for each of the same prompts."""
    rng = random.Random(7)
    prompts = [random_tokens(prompt_tokens, rng) for _ in range(num_prompts)]

    async def run(kind: str) -> float:
        async with _client(concurrency) as client:
            jobs = []
            for prompt in prompts:
                body: dict[str, Any] = {"model": model, "prompt": prompt, "temperature": 0}
                if kind == "score":
                    body |= {"echo": True, "logprobs": 1, "max_tokens": 0 if echo_zero else 1}
                else:
                    body |= {"max_tokens": 1}

                async def job(body: dict[str, Any] = body) -> dict[str, Any]:
                    return await _complete(client, url, body)

                jobs.append(job)
            started = time.perf_counter()
            answers = await _bounded(jobs, concurrency)
            elapsed = time.perf_counter() - started
            if kind == "score":
                scored = answers[0]["choices"][0]["logprobs"]["token_logprobs"]
                if len(scored) < prompt_tokens:
                    raise RuntimeError(f"scoring returned {len(scored)} entries")
            return elapsed

    asyncio.run(run("generate"))  # warm-up: first requests build kernels
    generate_seconds = asyncio.run(run("generate"))
    score_seconds = asyncio.run(run("score"))
    return {
        "generate 1 tok: prompts/s": num_prompts / generate_seconds,
        "score: prompts/s": num_prompts / score_seconds,
        "score / generate time": score_seconds / generate_seconds,
    }


# -------------------------------------------------------------------------------- prefix


def multiple_choice(
    url: str, model: str, num_questions: int, context_tokens: int, num_choices: int
) -> Figures:
    """lm-evaluation-harness's multiple choice: per question, its choices scored as concurrent
    requests (echo + logprobs=1 + max_tokens=1), one question after another."""
    rng = random.Random(11)

    def make_questions() -> list[tuple[list[int], list[list[int]]]]:
        return [
            (
                random_tokens(context_tokens, rng),
                [random_tokens(10, rng) for _ in range(num_choices)],
            )
            for _ in range(num_questions)
        ]

    async def main(questions: list[tuple[list[int], list[list[int]]]]) -> float:
        async with _client(num_choices) as client:
            started = time.perf_counter()
            for context, choices in questions:
                bodies = [
                    {"model": model, "prompt": context + choice, "echo": True, "logprobs": 1}
                    | {"max_tokens": 1, "temperature": 0}
                    for choice in choices
                ]
                await asyncio.gather(*(_complete(client, url, body) for body in bodies))
            return time.perf_counter() - started

    asyncio.run(main(make_questions()))  # warm-up on other questions: nothing is cached
    seconds = asyncio.run(main(make_questions()))
    return {"questions/s": num_questions / seconds, "seconds": seconds}


def few_shot(
    url: str, model: str, header_tokens: int, num_requests: int, tail_tokens: int, max_tokens: int
) -> Figures:
    """A shared few-shot header with different tails, all at once: generated tokens/s."""
    rng = random.Random(13)

    async def main(seed: int) -> tuple[float, float]:
        local = random.Random(seed)
        header = random_tokens(header_tokens, local)
        async with _client(num_requests) as client:
            bodies = [
                {"model": model, "prompt": header + random_tokens(tail_tokens, local)}
                | {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
                for _ in range(num_requests)
            ]
            started = time.perf_counter()
            answers = await asyncio.gather(*(_complete(client, url, body) for body in bodies))
            seconds = time.perf_counter() - started
        generated = sum(answer["usage"]["completion_tokens"] for answer in answers)
        return generated / seconds, seconds

    asyncio.run(main(rng.randrange(1 << 30)))  # warm-up with another header
    tokens_per_second, seconds = asyncio.run(main(rng.randrange(1 << 30)))
    return {"tok/s": tokens_per_second, "seconds": seconds}


# ---------------------------------------------------------------------------- repetitive


def repetitive(url: str, model: str, num_requests: int, max_tokens: int) -> Figures:
    """One stream at a time on prompts that repeat a passage, the case prompt lookup is for
    (quoting, summarising, editing): generated tokens/s, and the texts, to compare."""
    rng = random.Random(17)

    async def main() -> tuple[float, list[str]]:
        outputs = []
        generated = 0
        async with _client(1) as client:
            started = time.perf_counter()
            for _ in range(num_requests):
                passage = random_tokens(48, rng)
                body = {"model": model, "prompt": passage * 3, "max_tokens": max_tokens}
                body |= {"temperature": 0, "ignore_eos": True}
                answer = await _complete(client, url, body)
                generated += answer["usage"]["completion_tokens"]
                outputs.append(answer["choices"][0]["text"])
            seconds = time.perf_counter() - started
        return generated / seconds, outputs

    asyncio.run(main())
    tokens_per_second, texts = asyncio.run(main())
    digest = int(hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12], 16)
    figures: Figures = {"tok/s @1": tokens_per_second, DIGEST: float(digest)}
    drafted = _metric(url, "gptserve_spec_decode_num_draft_tokens_total")
    accepted = _metric(url, "gptserve_spec_decode_num_accepted_tokens_total")
    if drafted:  # a server that speculates: how many of its guesses were kept
        figures["guesses accepted %"] = 100 * (accepted or 0) / drafted
    return figures


def _metric(url: str, name: str) -> float | None:
    """A counter from the server's Prometheus page (None when it has no such counter)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------------------ loss


def validation_loss(url: str, model: str) -> Figures:
    """The bundled model's validation loss through the server (gptserve score's windows)."""
    from pathlib import Path

    from model.data import load_splits
    from model.tokenizer import Tokenizer
    from service.commands.score import score_windows, spread_windows

    corpus = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
    splits = load_splits(corpus, Tokenizer.default(), 0.1, 256)
    windows = spread_windows(splits.val.tolist(), 64, 256)
    result = asyncio.run(score_windows(url, model, windows))
    return {"val loss": result.loss, "scored tokens": float(result.num_scored_tokens)}
