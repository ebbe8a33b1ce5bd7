"""Per-level statistics from request results, and the table they are printed as."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.bench.client import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks; None if empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


@dataclass
class LevelSummary:
    """What one concurrency level measured; latencies in milliseconds."""

    concurrency: int
    num_ok: int
    num_failed: int
    wall_seconds: float
    num_generated_tokens: int
    num_prompt_tokens: int | None  # as the server reported it in usage, when every request did
    output_tokens_per_second: float
    requests_per_second: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    num_usage_reported: int  # ok requests whose token count came from the server's usage
    first_error: str | None = None
    errors: dict[str, int] = field(default_factory=dict)  # message -> count
    # The load client's own CPU time over the level, in % of one core: on the server's machine,
    # what the measurement took from the server.
    client_cpu_percent: float | None = None


def summarize(
    concurrency: int,
    results: Sequence[RequestResult],
    wall_seconds: float,
    client_cpu_seconds: float | None = None,
) -> LevelSummary:
    """Aggregate the results of one level; only successful requests count towards throughput."""
    ok = [result for result in results if result.is_ok]
    failed = [result for result in results if not result.is_ok]
    num_generated = sum(result.num_generated_tokens for result in ok)
    ttfts = [t for result in ok if (t := result.time_to_first_token) is not None]
    itls = [gap for result in ok for gap in result.inter_token_latencies]
    e2es = [result.e2e_latency for result in ok]
    prompt_counts = [result.usage_prompt_tokens for result in ok]
    num_prompt = (
        sum(count for count in prompt_counts if count is not None)
        if ok and None not in prompt_counts
        else None
    )
    # Failures are ordered by when they happened, so "first" is the first one seen.
    errors = Counter(
        result.error or "unknown error" for result in sorted(failed, key=lambda r: r.end)
    )
    return LevelSummary(
        concurrency=concurrency,
        num_ok=len(ok),
        num_failed=len(failed),
        wall_seconds=wall_seconds,
        num_generated_tokens=num_generated,
        num_prompt_tokens=num_prompt,
        output_tokens_per_second=num_generated / wall_seconds if wall_seconds > 0 else 0.0,
        requests_per_second=len(ok) / wall_seconds if wall_seconds > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)),
        ttft_p99_ms=_ms(percentile(ttfts, 99)),
        itl_p50_ms=_ms(percentile(itls, 50)),
        itl_p99_ms=_ms(percentile(itls, 99)),
        e2e_p50_ms=_ms(percentile(e2es, 50)),
        e2e_p99_ms=_ms(percentile(e2es, 99)),
        num_usage_reported=sum(result.usage_completion_tokens is not None for result in ok),
        first_error=next(iter(errors), None),
        errors=dict(errors),
        client_cpu_percent=(
            100.0 * client_cpu_seconds / wall_seconds
            if client_cpu_seconds is not None and wall_seconds > 0
            else None
        ),
    )


# (header, width, LevelSummary attribute, format); numbers are right-aligned under their header.
COLUMNS: list[tuple[str, int, str, str]] = [
    ("concurrency", 11, "concurrency", "d"),
    ("ok", 5, "num_ok", "d"),
    ("failed", 6, "num_failed", "d"),
    ("wall s", 8, "wall_seconds", ".2f"),
    ("tok/s", 9, "output_tokens_per_second", ".1f"),
    ("req/s", 7, "requests_per_second", ".2f"),
    ("TTFT p50 ms", 11, "ttft_p50_ms", ".1f"),
    ("TTFT p99 ms", 11, "ttft_p99_ms", ".1f"),
    ("ITL p50 ms", 10, "itl_p50_ms", ".2f"),
    ("ITL p99 ms", 10, "itl_p99_ms", ".2f"),
    ("E2E p50 ms", 10, "e2e_p50_ms", ".1f"),
    ("client CPU %", 12, "client_cpu_percent", ".0f"),
]


def format_header() -> str:
    """The table's header line and the rule under it."""
    header = "  ".join(title.rjust(width) for title, width, _, _ in COLUMNS)
    return f"{header}\n{'-' * len(header)}"


def format_row(summary: LevelSummary) -> str:
    """One level as a table row; '-' where there is nothing to measure."""
    cells = []
    for _, width, attribute, spec in COLUMNS:
        value = getattr(summary, attribute)
        cells.append(("-" if value is None else format(value, spec)).rjust(width))
    return "  ".join(cells)


def format_errors(summary: LevelSummary, label: str | None = None) -> str | None:
    """A line naming the level's first error and how many requests failed, or None."""
    if not summary.num_failed:
        return None
    label = label or f"concurrency {summary.concurrency}"
    kinds = f", {len(summary.errors)} distinct errors" if len(summary.errors) > 1 else ""
    return (
        f"{label}: {summary.num_failed} of {summary.num_ok + summary.num_failed} failed{kinds}; "
        f"first error: {summary.first_error}"
    )


def format_table(summaries: Sequence[LevelSummary]) -> str:
    """The whole table, followed by one error line for each level that had failures."""
    lines = [format_header(), *(format_row(summary) for summary in summaries)]
    lines += [line for summary in summaries if (line := format_errors(summary)) is not None]
    return "\n".join(lines)
