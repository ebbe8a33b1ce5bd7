"""The deployment's settings: read once from `GPTSERVE_*` environment variables and CLI flags.

This class is the one place for each setting's type, default, choices and help: `gptserve serve`
builds one flag per field from it (see `service/commands/serve.py`), so a new field here is a new
flag and a new environment variable with no other edit. A description names the default itself,
as `(default: ...)`, only where the value alone would not say it (None, an empty list).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]


class Settings(BaseSettings):
    """How `gptserve serve` runs; every field is also `GPTSERVE_<FIELD>` in the environment.

    List fields (`api_keys`, `cors_origins`) take a comma-separated value in the environment. An
    empty variable counts as unset, so `GPTSERVE_MODEL=` (as compose passes an unset variable
    through) means the default.
    """

    model_config = SettingsConfigDict(env_prefix="GPTSERVE_", extra="forbid", env_ignore_empty=True)

    model: str | None = Field(
        default=None,
        description="model folder, checkpoint file or Hub name (default: the bundled model)",
    )
    served_model_name: str | None = Field(
        default=None,
        description="name in /v1/models and responses (default: the loaded model's name)",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(
        default=8000, ge=0, le=65535, description="port to listen on; 0 picks a free one"
    )
    device: Device = Field(default="auto", description="auto: cuda when available, else cpu")
    dtype: DType = Field(
        default="auto", description="auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU"
    )
    quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: int8 weights for the linear layers (CPU, float32 only; 2-4x faster "
        "decoding, logits no longer bit-exact)",
    )
    pack_weights: bool = Field(
        default=True,
        description="CPU (float32, unquantized): keep a oneDNN-packed copy of the linear weights "
        "for steps of several rows (from a row count measured at start-up), and store the "
        "weights column-major where that makes one-row steps faster; about 1.7x the tokens/s at "
        "4-16 concurrent, for a second copy of the weights in memory",
    )
    packed_min_rows: int | None = Field(
        default=None,
        ge=1,
        description="with packed weights: the row count from which the oneDNN-packed copy is "
        "used instead of MKL (default: measured on this machine at start-up, with the one-row "
        "weight layout; forced, the weights stay row-major)",
    )
    float32_matmul_precision: Literal["high", "highest"] = Field(
        default="high",
        description="CPU float32, where the kernels are measured at start-up (packed weights "
        "without a forced --packed-min-rows) or batch-invariant: high lets batches of rows run "
        "their linear layers on AMX tiles (Intel Sapphire Rapids and later) as three bfloat16 "
        "products per float32 product (bf16x3, 16 bits of mantissa; torch's name for it), "
        "where measured faster than both float32 kernels at the most rows probed, from the row "
        "count from which they beat MKL (batch-invariant: every row count), and where "
        "the served model's logits stay within 1e-4 (or 1e-5 of the largest logit) of float32 "
        "kernels' (checked at start-up); highest: float32 kernels only",
    )
    native_decode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="CPU float32 and int8 (batch-invariant: not the whole step, but the "
        "attention kernel for prompts and decode steps alike, the cache writes and the bf16x3 "
        "linears): run decode steps of few rows "
        "as one C function compiled for this CPU at start-up (needs a C compiler, else a build "
        "made in advance for the CPU's level, as in the container image; cached), and "
        "batched steps' cache writes, int8 GELU and attention (each row over only its own keys, "
        "a shared prompt prefix read once) through it. auto: the whole step for the row counts, "
        "and the attention, where measured faster than torch; on: up to 16 rows and the "
        "attention, unmeasured; off: torch only, nothing compiled (no bf16x3 linears, "
        "and batch-invariant attention in torch)",
    )
    fast_decode: bool = Field(
        default=False,
        description="CUDA only: capture the decode step as CUDA graphs at bucketed batch sizes "
        "and replay them; eager if capturing fails; ignored (with a warning) on CPU",
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="requests decoding together (KV-cache slots)"
    )
    max_queue: int = Field(default=256, ge=0, description="requests waiting for a slot before 429")
    max_prefill_tokens: int = Field(default=512, ge=1, description="prompt tokens per engine step")
    max_model_len: int | None = Field(
        default=None, ge=2, description="context window (default: the model's positions)"
    )
    truncate_prompt: bool = Field(
        default=False, description="left-truncate prompts that do not fit instead of answering 400"
    )
    warm_up: bool = Field(default=True, description="run a warm-up batch before reporting ready")
    batch_invariant: bool = Field(
        default=False,
        description="CPU float32: compute every request's logits with the same bits whatever "
        "else runs beside it (oneDNN for every row count, per-query attention); checked at "
        "start-up; costs some speed, most on long prompts",
    )
    speculative_method: Literal["none", "ngram", "draft"] = Field(
        default="none",
        description="speculative decoding: ngram guesses the next tokens by prompt lookup (free; "
        "strong when the output repeats its context), draft asks --draft-model; each step "
        "checks the guesses in one pass (exact for greedy, the same distribution for sampling); "
        "requests may opt out with speculative: false",
    )
    num_speculative_tokens: int = Field(
        default=8,
        ge=1,
        le=16,
        description="the most guesses checked per step with speculative decoding; each request's "
        "count adapts: up to two more than its last proposal after a check that kept them all, "
        "one fewer after a rejection",
    )
    speculative_max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="speculate only in steps that decode at most this many requests (default: 4 "
        "on a CPU, where beyond a few rows a step is compute-bound and guesses cost more than "
        "they gain; no limit on a GPU)",
    )
    draft_model: str | None = Field(
        default=None,
        description="the draft model for --speculative-method draft: a smaller model with the "
        "same vocabulary (folder, checkpoint or Hub name)",
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="keys and values of the KV cache: auto is the model's dtype, except with "
        "--quantization int8, where it is bfloat16 if the start-up measures batched attention "
        "faster so; bfloat16 or float16 under a float32 model halve the cache's memory and the "
        "bytes batched decode steps read for attention (on CPU only bfloat16 also runs faster, "
        "where attention is a large share of a step: int8 weights, long contexts), for logits "
        "no longer bit-exact",
    )
    prefix_caching: bool = Field(
        default=True,
        description="start a prompt from the longest prefix still cached in a KV-cache slot "
        "(idle or in use) instead of computing it again; decode rows read a shared prompt "
        "prefix once",
    )
    max_slots_per_request: int | None = Field(
        default=None,
        ge=1,
        description="most KV-cache slots one API request (its n choices and prompts) holds at "
        "once; its other choices wait (default: no cap below max-batch-size)",
    )
    max_queued_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="most prompt tokens admitted but not yet computed; 429 beyond it "
        "(default: no limit beyond max-queue)",
    )
    request_timeout: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="seconds a request may wait and run in all before it ends with finish "
        "reason timeout; a request's own 'timeout' field overrides it (default: none)",
    )
    logprobs_mode: LogprobsMode = Field(
        default="raw_logprobs",
        description="what log-probabilities describe when a request does not say: "
        "raw_logprobs (the model's softmax) or processed_logprobs (the distribution sampled "
        "from, after penalties, temperature and top-k/top-p/min-p)",
    )
    stream_buffer: int = Field(
        default=64,
        ge=1,
        description="unread stream events per request before its generation pauses for the "
        "reader to catch up",
    )
    stalled_stream_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a stream may stay unread (paused) before it is aborted",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted bearer key, repeatable (default: none, no authentication)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origin allowed by CORS, repeatable (default: none, CORS off)",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1, description="largest request body accepted"
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a connection has to send a request line and headers; then 408 "
        "and the connection closes (slow or stuck clients cannot hold connections open)",
    )
    keep_alive_timeout: float = Field(
        default=5.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    max_connections: int | None = Field(
        default=1024,
        ge=1,
        description="open connections at most; more are answered 503 and closed",
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="seconds in-flight requests get to finish after SIGTERM"
    )
    keepalive_interval: float = Field(
        default=15.0, gt=0, description="seconds of silence before an SSE keep-alive comment"
    )
    retry_after: int = Field(default=1, ge=0, description="Retry-After seconds sent with 429")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="log line format; json: one JSON object per line on stdout and stderr",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="log level; the probe routes (/health, /ready, /metrics) log at debug",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        """Accept `a,b` from the environment as well as a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, keys: list[str]) -> list[str]:
        """Refuse empty or whitespace-padded keys: they are typos that would lock clients out."""
        for key in keys:
            if not key or key != key.strip():
                raise ValueError("API keys must be non-empty and have no surrounding whitespace")
        return keys
