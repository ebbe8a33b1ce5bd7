"""The deployment's settings: read once from `GPTSERVE_*` environment variables and CLI flags."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseSettings):
    """How `gptserve serve` runs; every field is also `GPTSERVE_<FIELD>` in the environment.

    List fields (`api_keys`, `cors_origins`) take a comma-separated value in the environment.
    """

    model_config = SettingsConfigDict(env_prefix="GPTSERVE_", extra="forbid")

    model: str | None = Field(
        default=None,
        description="model folder, checkpoint file or Hub name; default: the bundled model",
    )
    served_model_name: str | None = Field(
        default=None,
        description="name in /v1/models and responses; default: the loaded model's name",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(
        default=8000, ge=0, le=65535, description="port to listen on (0: any free port)"
    )
    device: Device = Field(default="auto", description="auto: cuda when available, else cpu")
    dtype: DType = Field(
        default="auto", description="auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU"
    )
    quantization: Literal["none", "int8"] = Field(
        default="none", description="int8: int8 linear weights (CPU float32 only), faster decoding"
    )
    pack_weights: bool = Field(
        default=True,
        description="CPU: also keep the linear weights in oneDNN's packed layout, for steps of "
        "4+ rows (faster batched decoding; a second copy of the weights in memory)",
    )
    fast_decode: bool = Field(
        default=False,
        description="replay the decode step as CUDA graphs at bucketed batch sizes (CUDA only); "
        "eager if capturing fails",
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="requests decoding together (KV-cache slots)"
    )
    max_queue: int = Field(default=256, ge=0, description="requests waiting for a slot before 429")
    max_prefill_tokens: int = Field(default=512, ge=1, description="prompt tokens per engine step")
    max_model_len: int | None = Field(
        default=None, ge=2, description="context window; default: the model's positions"
    )
    truncate_prompt: bool = Field(
        default=False, description="left-truncate prompts that do not fit instead of answering 400"
    )
    warm_up: bool = Field(default=True, description="run a warm-up batch before reporting ready")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer keys; none: no authentication"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS; none: CORS off"
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1, description="largest request body accepted"
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="seconds in-flight requests get to finish after SIGTERM"
    )
    keepalive_interval: float = Field(
        default=15.0, gt=0, description="seconds of silence before an SSE keep-alive comment"
    )
    retry_after: int = Field(default=1, ge=0, description="Retry-After seconds sent with 429")
    log_format: Literal["text", "json"] = Field(default="text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level"
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
