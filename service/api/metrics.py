"""Prometheus metrics: an engine listener that feeds one registry per app.

Latencies are measured on the engine's monotonic clock, from when a request reached the engine:
time to first token, the gaps between tokens, queue time (arrival to first scheduled) and
end-to-end time of requests that completed (finish reason stop or length). The gauges are read
from the scheduler when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.engine.llm_engine import LLMEngine
from service.engine.request import FinishReason, Request
from service.engine.stats import EngineListener

PREFIX = "gptserve_"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SUCCESS_REASONS = (FinishReason.STOP.value, FinishReason.LENGTH.value)
# Failures counted by the engine (abort, error) and rejections counted by the HTTP layer.
# timeout: the request's deadline passed; stalled: its reader stopped reading its stream.
FAILURE_REASONS = (
    "abort",
    "timeout",
    "stalled",
    "error",
    "queue_full",
    "invalid_request",
    "not_ready",
)


class Metrics(EngineListener):
    """The service's metrics in their own registry, so several apps can live in one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.engine: LLMEngine | None = None

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, registry=self.registry)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between two tokens of a request.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Arrival to finish of completed requests.",
            REQUEST_BUCKETS,
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS
        )
        self.batch_size = histogram("batch_size", "Requests per forward step.", BATCH_BUCKETS)
        self.num_requests_running = gauge("num_requests_running", "Requests holding a slot.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests queued for a slot.")
        self.kv_cache_usage_ratio = gauge(
            "kv_cache_usage_ratio", "Fraction of KV-cache slots held by requests."
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", registry=self.registry
        )
        self.prefix_cache_queries = Counter(
            PREFIX + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (admitted requests' prompts).",
            registry=self.registry,
        )
        self.prefix_cache_hits = Counter(
            PREFIX + "prefix_cache_hits",
            "Prompt tokens reused from the prefix cache instead of computed; "
            "hit rate = hits / queries.",
            registry=self.registry,
        )
        self.spec_decode_draft_tokens = Counter(
            PREFIX + "spec_decode_num_draft_tokens",
            "Guessed tokens checked by speculative decoding.",
            registry=self.registry,
        )
        self.spec_decode_accepted_tokens = Counter(
            PREFIX + "spec_decode_num_accepted_tokens",
            "Guessed tokens the model agreed with; acceptance rate = accepted / draft.",
            registry=self.registry,
        )
        self._spec_totals = (0, 0)
        self.request_success = Counter(
            PREFIX + "request_success",
            "Requests that completed, by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.request_failure = Counter(
            PREFIX + "request_failure",
            "Requests that failed, were aborted or were rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in SUCCESS_REASONS:
            self.request_success.labels(finish_reason=reason)
        for reason in FAILURE_REASONS:
            self.request_failure.labels(reason=reason)

    def attach(self, engine: LLMEngine) -> None:
        """Listen to `engine` and read its gauges from its scheduler; call before it starts."""
        if self not in engine.listeners:
            engine.listeners.append(self)
        self.engine = engine
        scheduler = engine.scheduler
        self.num_requests_running.set_function(lambda: scheduler.num_running)
        self.num_requests_waiting.set_function(lambda: scheduler.num_waiting)
        self.kv_cache_usage_ratio.set_function(
            lambda: 1.0 - scheduler.num_free_slots / scheduler.num_slots
        )

    def count_failure(self, reason: str) -> None:
        """Count a request that failed before or outside the engine (e.g. rejected)."""
        self.request_failure.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------ engine events (engine thread)

    def on_step(self, num_rows: int, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        self.batch_size.observe(num_rows)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generated_tokens)

    def on_request_scheduled(self, request: Request) -> None:
        self.prefix_cache_queries.inc(request.num_prompt_tokens)
        self.prefix_cache_hits.inc(request.num_cached_tokens)
        if request.first_scheduled_time is not None:
            self.request_queue_time.observe(request.first_scheduled_time - request.arrival_time)

    def on_token(self, request: Request, now: float) -> None:
        if request.first_token_time is None:
            self.time_to_first_token.observe(now - request.arrival_time)
        elif request.last_token_time is not None:
            self.inter_token_latency.observe(now - request.last_token_time)

    def on_speculation(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        drafts, accepted = self._spec_totals
        self.spec_decode_draft_tokens.inc(num_draft_tokens - drafts)
        self.spec_decode_accepted_tokens.inc(num_accepted_tokens - accepted)
        self._spec_totals = (num_draft_tokens, num_accepted_tokens)

    def on_request_finished(self, request: Request) -> None:
        reason = request.finish_reason.value if request.finish_reason else "error"
        if reason in SUCCESS_REASONS:
            self.request_success.labels(finish_reason=reason).inc()
            if request.finish_time is not None:
                self.e2e_request_latency.observe(request.finish_time - request.arrival_time)
        else:
            self.request_failure.labels(reason=reason).inc()
