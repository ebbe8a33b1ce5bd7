"""Settings of one benchmark run, validated once when they are built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

PromptFormat = Literal["ids", "text"]
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Each level runs at least this many rounds of `concurrency` requests by default, so that the
# ramp-up (workers starting together) and the tail (the last few requests running alone) weigh
# little against the steady state.
DEFAULT_ROUNDS_PER_LEVEL = 4
MIN_REQUESTS_PER_LEVEL = 16


class BenchError(ValueError):
    """A benchmark cannot start: bad settings or a server that cannot be asked for its model."""


@dataclass(frozen=True)
class BenchConfig:
    """What to send, where, and how many at once; see `gptserve bench --help`."""

    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # None: ask GET /v1/models and take the first
    concurrency_levels: tuple[int, ...] = (1,)
    num_requests: int | None = None  # per level; None: requests_for(concurrency)
    prompt_tokens: int = 128
    max_tokens: int = 128
    prompt_format: PromptFormat = "ids"
    ignore_eos: bool = False
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0
    warmup: int = 2
    timeout: float = 300.0  # seconds, for each whole request
    include_usage: bool = True  # ask for stream_options.include_usage
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        if not self.concurrency_levels:
            raise BenchError("give at least one concurrency level")
        if any(level < 1 for level in self.concurrency_levels):
            raise BenchError(
                f"concurrency levels must be >= 1, got {list(self.concurrency_levels)}"
            )
        if self.num_requests is not None and self.num_requests < 1:
            raise BenchError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.prompt_tokens < 1:
            raise BenchError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.max_tokens < 1:
            raise BenchError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.prompt_format not in ("ids", "text"):
            raise BenchError(f"prompt_format must be 'ids' or 'text', got {self.prompt_format!r}")
        if not self.temperature >= 0.0:
            raise BenchError(f"temperature must be >= 0, got {self.temperature}")
        if self.warmup < 0:
            raise BenchError(f"warmup must be >= 0, got {self.warmup}")
        if not self.timeout > 0.0:
            raise BenchError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.model is not None and not self.model:
            raise BenchError("model must not be empty; leave it out to ask the server")

    def requests_for(self, concurrency: int) -> int:
        """The number of requests to send at one concurrency level."""
        if self.num_requests is not None:
            return self.num_requests
        return max(MIN_REQUESTS_PER_LEVEL, DEFAULT_ROUNDS_PER_LEVEL * concurrency)

    @property
    def completions_url(self) -> str:
        """The one endpoint that requests are sent to."""
        return f"{self.base_url}/v1/completions"

    @property
    def models_url(self) -> str:
        """Where the model name is looked up when none is given."""
        return f"{self.base_url}/v1/models"

    def headers(self) -> dict[str, str]:
        """HTTP headers sent with every request."""
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        return {}


def normalize_base_url(base_url: str) -> str:
    """Check that a base URL is http(s) with a host, and drop a trailing '/' or '/v1'."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(
            f"base URL must look like http://HOST:PORT (optionally with a path), got {base_url!r}"
        )
    if parts.query or parts.fragment:
        raise BenchError(f"base URL must not have a query or fragment, got {base_url!r}")
    url = base_url.rstrip("/")
    # OpenAI clients take base URLs ending in /v1; accept that spelling too.
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url
