"""Closed-loop load: per level, `concurrency` workers send requests back to back."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from model.tokenizer import Tokenizer
from service.bench.client import RequestResult, build_payload, fetch_model_name, send_request
from service.bench.config import BenchConfig
from service.bench.http import ConnectionPool
from service.bench.prompts import PromptFactory
from service.bench.report import LevelSummary, summarize


@dataclass
class BenchResult:
    """A whole run: the settings, the model that was asked for, warm-up and per-level results."""

    config: BenchConfig
    model: str
    warmup: LevelSummary | None
    levels: list[LevelSummary]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for --json-out; the API key is left out."""
        config = asdict(self.config)
        config.pop("api_key")
        config["concurrency_levels"] = list(self.config.concurrency_levels)
        return {
            "config": config,
            "model": self.model,
            "warmup": asdict(self.warmup) if self.warmup is not None else None,
            "levels": [asdict(level) for level in self.levels],
        }


class _LoadGenerator:
    """Sends the requests of each level and collects their results."""

    def __init__(
        self,
        client: ConnectionPool,
        config: BenchConfig,
        model: str,
        prompts: PromptFactory,
        prompt_indices: Iterator[int],
    ) -> None:
        self.client = client
        self.config = config
        self.model = model
        self.prompts = prompts
        self.prompt_indices = prompt_indices  # shared across levels: every request is distinct

    async def run_level(
        self, concurrency: int, num_requests: int, label: str, show_progress: bool
    ) -> LevelSummary:
        """Run `num_requests` requests with `concurrency` in flight; summarize them."""
        results: list[RequestResult] = []
        # Tickets are taken without awaiting, so no two workers ever take the same one.
        tickets = iter(range(num_requests))
        with tqdm(
            total=num_requests,
            desc=label,
            unit="req",
            file=sys.stderr,
            leave=False,  # the finished level is a table row; its bar would only clutter
            disable=not show_progress,
        ) as progress:

            async def work() -> None:
                for _ in tickets:
                    results.append(await self._send_one())
                    progress.update(1)

            start, cpu_start = time.perf_counter(), time.process_time()
            await asyncio.gather(*(work() for _ in range(min(concurrency, num_requests))))
            wall_seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start
        return summarize(concurrency, results, wall_seconds, cpu_seconds)

    async def _send_one(self) -> RequestResult:
        index = next(self.prompt_indices)
        prompt: list[int] | str
        if self.config.prompt_format == "text":
            prompt = self.prompts.text(index)
        else:
            prompt = self.prompts.token_ids(index)
        return await send_request(
            self.client,
            self.config.completions_url,
            build_payload(self.config, self.model, prompt),
            self.config.headers(),
            self.config.timeout,
        )


async def run_benchmark(
    config: BenchConfig,
    *,
    show_progress: bool = True,
    on_start: Callable[[str], None] | None = None,
    on_level_done: Callable[[LevelSummary], None] | None = None,
    tokenizer: Tokenizer | None = None,
) -> BenchResult:
    """Warm up, then run every concurrency level in order against `config.base_url` only.

    `on_start` gets the model name once warm-up is done; `on_level_done` gets each level's summary.
    """
    prompts = PromptFactory(tokenizer or Tokenizer.default(), config.prompt_tokens, config.seed)
    max_concurrency = max(config.concurrency_levels)
    # One keep-alive connection per worker, so requests never queue inside the client; only the
    # given URL: no proxies from the environment, no redirects.
    client = ConnectionPool(connect_timeout=config.timeout)
    try:
        model = config.model or await fetch_model_name(client, config)
        load = _LoadGenerator(client, config, model, prompts, itertools.count())
        warmup = None
        if config.warmup:
            warmup_concurrency = min(config.warmup, max_concurrency)
            warmup = await load.run_level(
                warmup_concurrency, config.warmup, "warmup", show_progress
            )
        if on_start is not None:
            on_start(model)
        summaries = []
        for concurrency in config.concurrency_levels:
            label = f"concurrency {concurrency}"
            summary = await load.run_level(
                concurrency, config.requests_for(concurrency), label, show_progress
            )
            summaries.append(summary)
            if on_level_done is not None:
                on_level_done(summary)
    finally:
        await client.aclose()
    return BenchResult(config=config, model=model, warmup=warmup, levels=summaries)
