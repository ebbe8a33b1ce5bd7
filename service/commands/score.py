"""`gptserve score`: the loss and perplexity of a text file, computed by a running server.

The text is tokenized here with GPT-2's tokenizer and cut into windows; each window is sent to
the server's /v1/completions as token ids with `echo: true, logprobs: 0, max_tokens: 0`, which
scores every token of the window given the tokens before it in the window (the first token of a
window is context only). The mean negative log-probability over the scored tokens is the loss in
nats per token; its exponential is the perplexity.

By default the windows are consecutive and as long as the server's context window plus one (the
last token of a window is scored, never fed). `--val-fraction` keeps only the end of the token
stream, and `--windows N --window-tokens T` takes N windows of T inputs spread evenly over it:
exactly the validation windows `gptserve train` evaluates with `--eval-batches N / batch size`,
so the loss printed matches the one a training run recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONCURRENCY = 8


@dataclass
class ScoreResult:
    """What a scoring run measured."""

    num_windows: int
    num_scored_tokens: int
    total_logprob: float
    seconds: float

    @property
    def loss(self) -> float:
        """Mean negative log-probability, nats per token."""
        return -self.total_logprob / self.num_scored_tokens

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `score` subcommand."""
    parser = subparsers.add_parser(
        "score",
        help="loss and perplexity of a text file through a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--text", type=Path, required=True, metavar="FILE", help="UTF-8 text file to score")
    add("--base-url", default="http://127.0.0.1:8000", metavar="URL", help="(default: %(default)s)")
    add("--model", metavar="NAME", help="model name to send (default: the server's only one)")
    add("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    add(
        "--val-fraction",
        type=float,
        metavar="F",
        help="score only the last F of the tokens (gptserve train's validation part)",
    )
    add("--windows", type=int, metavar="N", help="N windows spread evenly over the tokens")
    add(
        "--window-tokens",
        type=int,
        metavar="T",
        help="inputs per window (each window scores T tokens, sending T + 1); default: the "
        "server's context window",
    )
    add(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="windows in flight at once (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def spread_windows(tokens: Sequence[int], num_windows: int, window_tokens: int) -> list[list[int]]:
    """`num_windows` windows of `window_tokens + 1` tokens, starts spread evenly (as the
    validation batches of `gptserve train`)."""
    import torch

    from model.data import fixed_batches

    tensor = torch.tensor(list(tokens), dtype=torch.long)
    windows = []
    for inputs, targets in fixed_batches(tensor, 1, window_tokens, num_windows):
        windows.append(inputs[0].tolist() + [int(targets[0, -1])])
    return windows


def consecutive_windows(tokens: Sequence[int], window_tokens: int) -> list[list[int]]:
    """Windows of `window_tokens + 1` tokens, each starting at the previous one's last token,
    so every token but the first is scored exactly once."""
    windows = []
    for start in range(0, max(1, len(tokens) - 1), window_tokens):
        window = list(tokens[start : start + window_tokens + 1])
        if len(window) >= 2:
            windows.append(window)
    return windows


async def score_windows(
    base_url: str,
    model: str | None,
    windows: list[list[int]],
    concurrency: int = DEFAULT_CONCURRENCY,
    api_key: str | None = None,
) -> ScoreResult:
    """Score every window through the server's completions API."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers=headers,
        timeout=600,
        limits=limits,
        trust_env=False,
    ) as client:
        if model is None:
            listed = await client.get("/v1/models")
            listed.raise_for_status()
            model = listed.json()["data"][0]["id"]
        semaphore = asyncio.Semaphore(concurrency)

        async def one(window: list[int]) -> float:
            body = {"model": model, "prompt": window, "echo": True, "logprobs": 0}
            body["max_tokens"] = 0
            async with semaphore:
                response = await client.post("/v1/completions", json=body)
            if response.status_code != 200:
                message = response.json().get("error", {}).get("message", response.text)
                raise RuntimeError(f"the server answered {response.status_code}: {message}")
            scored = response.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
            return float(sum(scored))

        started = time.perf_counter()
        totals = await asyncio.gather(*(one(window) for window in windows))
        seconds = time.perf_counter() - started
    num_scored = sum(len(window) - 1 for window in windows)
    return ScoreResult(len(windows), num_scored, sum(totals), seconds)


async def _context_window(base_url: str, api_key: str | None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"), headers=headers, timeout=30
    ) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return int(response.json()["data"][0]["max_model_len"])


def run(args: argparse.Namespace) -> int:
    """Tokenize, cut into windows, score through the server, print the loss."""
    from model.data import DataError, read_text
    from model.tokenizer import Tokenizer

    try:
        text, sha256 = read_text(args.text)
    except DataError as exc:
        print(f"gptserve score: {exc}", file=sys.stderr)
        return 2
    tokens = Tokenizer.default().encode(text)
    if args.val_fraction is not None:
        if not 0 < args.val_fraction < 1:
            print("gptserve score: --val-fraction must be in (0, 1)", file=sys.stderr)
            return 2
        tokens = tokens[len(tokens) - int(round(len(tokens) * args.val_fraction)) :]
    try:
        window_tokens = args.window_tokens or asyncio.run(
            _context_window(args.base_url, args.api_key)
        )
        if args.windows is not None:
            windows = spread_windows(tokens, args.windows, window_tokens)
        else:
            windows = consecutive_windows(tokens, window_tokens)
        result = asyncio.run(
            score_windows(args.base_url, args.model, windows, args.concurrency, args.api_key)
        )
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"gptserve score: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.text} (sha256 {sha256[:12]}): {result.num_scored_tokens:,} tokens scored in "
        f"{result.num_windows} windows of {window_tokens} in {result.seconds:.1f} s: "
        f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f}"
    )
    return 0
