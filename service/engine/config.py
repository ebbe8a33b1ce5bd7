"""How the engine is sized: batch, queue, per-step prompt budget and context window."""

from __future__ import annotations

from dataclasses import dataclass

from model.kv_cache import KV_CACHE_DTYPES
from model.validation import is_int


@dataclass(frozen=True)
class EngineConfig:
    """Deployment-side engine limits (the model's architecture lives in GPTConfig)."""

    max_batch_size: int = 32  # requests decoding together; also the number of KV-cache slots
    max_queue_size: int = 256  # requests waiting for a slot before submit() fails fast
    max_prefill_tokens: int = 512  # prompt tokens per step, so long prompts are chunked
    max_model_len: int | None = None  # context window; None = the model's positions
    truncate_prompt: bool = False  # left-truncate prompts that do not fit instead of failing
    fast_decode: bool = False  # decode at bucketed shapes, replayed as CUDA graphs on CUDA
    max_slots_per_request: int | None = None  # slots one API request's choices may hold at once
    # start prompts from a prefix cached in a slot, when one is; decode rows with a long common
    # prefix read its keys and values once
    reuse_prefixes: bool = True
    speculative_method: str = "none"  # none, ngram (prompt lookup) or draft (a draft model)
    num_speculative_tokens: int = 8  # the most guesses checked per step (see speculation.py)
    # speculate only in steps that decode at most this many requests; None: a few on a CPU,
    # any number on a GPU (see speculation.py)
    speculative_max_batch_size: int | None = None
    ngram_max: int = 4  # prompt lookup matches the last ngram_max .. ngram_min tokens
    ngram_min: int = 1
    # keys and values in the model's dtype (auto), or float32 / bfloat16 / float16 under a
    # float32 model
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_prefill_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_slots_per_request is not None and self.max_slots_per_request < 1:
            raise ValueError(
                f"max_slots_per_request must be >= 1 or None, got {self.max_slots_per_request}"
            )
        if self.speculative_method not in ("none", "ngram", "draft"):
            raise ValueError(
                f"speculative_method must be none, ngram or draft, got {self.speculative_method!r}"
            )
        if self.num_speculative_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("num_speculative_tokens must be >= 1 and 1 <= ngram_min <= ngram_max")
        limit = self.speculative_max_batch_size
        if limit is not None and (not is_int(limit) or limit < 1):
            raise ValueError(f"speculative_max_batch_size must be an integer >= 1, got {limit!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
