"""`gptserve bench`: load an OpenAI-compatible server and print a latency / throughput table."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Closed-loop load generator for any OpenAI-compatible completion server (gptserve, vLLM,
llama.cpp server). For each concurrency level, that many workers send streamed
POST {base_url}/v1/completions requests back to back until the level's requests are done,
then one table row is printed: requests ok / failed, wall time, generated tokens/s, requests/s,
time to first token (TTFT) and inter-token latency (ITL, the gaps between streamed chunks)
p50 / p99, end-to-end latency p50, and this client's own CPU use in % of one core (run on the
server's machine, that much was taken from the server). Generated tokens are the server's usage
count when it sends one (stream_options.include_usage), else the number of chunks with text.
Every request gets a distinct prompt of exactly --prompt-tokens GPT-2 tokens. Only the given
URL is ever contacted (no proxies from the environment, no redirects)."""


def _concurrency_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,8,32, got {text!r}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return levels


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible completions server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--base-url",
        default="http://127.0.0.1:8000",
        metavar="URL",
        help="server to load; a trailing /v1 is accepted (default: %(default)s)",
    )
    add(
        "--model",
        metavar="NAME",
        help="model name to send (default: the first one GET /v1/models lists)",
    )
    add("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    add(
        "--concurrency",
        type=_concurrency_levels,
        default=(1,),
        metavar="N[,N...]",
        help="concurrency levels to run, in order, e.g. 1,8,32 (default: 1)",
    )
    add(
        "--num-requests",
        type=int,
        metavar="N",
        help="requests per level (default: max(16, 4 x concurrency), i.e. at least 4 rounds)",
    )
    add(
        "--prompt-tokens",
        type=int,
        default=128,
        metavar="N",
        help="prompt length (default: %(default)s)",
    )
    add(
        "--max-tokens",
        type=int,
        default=128,
        metavar="N",
        help="output length (default: %(default)s)",
    )
    add(
        "--prompt-format",
        choices=("ids", "text"),
        default="ids",
        help="send prompts as token-id lists or as decoded text, for servers that take no ids "
        "(default: %(default)s)",
    )
    add("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM / llama.cpp)")
    add(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature (default: %(default)s, greedy)",
    )
    add(
        "--warmup",
        type=int,
        default=2,
        metavar="N",
        help="requests sent before measuring (default: 2)",
    )
    add(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds per request (default: 300)",
    )
    add("--seed", type=int, default=0, metavar="N", help="seed of the random prompts (default: 0)")
    add("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    add("--no-progress", action="store_true", help="no progress bar on stderr")
    add("--json-out", type=Path, metavar="FILE", help="also save settings and results as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit code 0 if any measured request succeeded, else 1."""
    from service.bench import BenchConfig, BenchError, run_benchmark
    from service.bench.report import format_errors, format_header, format_row

    try:
        config = BenchConfig(
            base_url=args.base_url,
            model=args.model,
            concurrency_levels=args.concurrency,
            num_requests=args.num_requests,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            prompt_format=args.prompt_format,
            ignore_eos=args.ignore_eos,
            api_key=args.api_key,
            temperature=args.temperature,
            warmup=args.warmup,
            timeout=args.timeout,
            include_usage=not args.no_usage,
            seed=args.seed,
        )
    except BenchError as error:
        print(f"gptserve bench: error: {error}", file=sys.stderr)
        return 2
    if args.json_out is not None and not args.json_out.parent.is_dir():
        print(f"gptserve bench: error: no folder for --json-out {args.json_out}", file=sys.stderr)
        return 2

    def on_start(model: str) -> None:
        print(
            f"{config.completions_url}  model={model}  prompt={config.prompt_tokens} tokens "
            f"({config.prompt_format})  max_tokens={config.max_tokens}  "
            f"ignore_eos={config.ignore_eos}  temperature={config.temperature:g}"
        )
        print(format_header(), flush=True)

    try:
        result = asyncio.run(
            run_benchmark(
                config,
                show_progress=not args.no_progress,
                on_start=on_start,
                on_level_done=lambda summary: print(format_row(summary), flush=True),
            )
        )
    except BenchError as error:
        print(f"gptserve bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gptserve bench: interrupted", file=sys.stderr)
        return 130
    if result.warmup is not None and (warmup_errors := format_errors(result.warmup, "warm-up")):
        print(warmup_errors)
    for summary in result.levels:
        if (errors := format_errors(summary)) is not None:
            print(errors)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"results saved to {args.json_out}")
    return 0 if any(summary.num_ok for summary in result.levels) else 1
