"""Build the engine a deployment asks for: pick the model, device and dtype, load, size."""

from __future__ import annotations

import logging

import torch

from model.batch_invariant import (
    BatchInvarianceError,
    check_batch_invariance,
    make_batch_invariant,
)
from model.dtypes import DTYPES, dtype_name
from model.gpt2 import GPT
from model.kernel_choice import (
    PROBE_ROW_COUNTS,
    choose_native_decode,
    int8_kv_cache_dtype,
    use_fastest_float32_kernels,
    use_fastest_int8_kernels,
)
from model.kv_cache import resolve_kv_cache_dtype
from model.loading import load_model
from model.native_decode import set_enabled as set_native_enabled
from model.packed_linear import PACKABLE_DTYPES, pack_linears, packing_available
from model.tokenizer import GPT2_ASSETS_DIR, Tokenizer
from service.api.settings import Settings
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.cpu_memory import keep_freed_memory
from service.engine.cpu_threads import release_openmp_threads
from service.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

BUNDLED_MODEL_DIR = GPT2_ASSETS_DIR.parent / "bundled"  # model/assets/bundled
BUNDLED_MODEL_NAME = "gpt2-tiny-shakespeare"  # what /v1/models calls the bundled model


class ServeConfigError(ValueError):
    """The deployment asks for something this machine or installation cannot give."""


def resolve_model_spec(spec: str | None) -> str:
    """`spec`, or the bundled model when none is given."""
    if spec:
        return spec
    if (BUNDLED_MODEL_DIR / "gptserve.json").is_file():
        return str(BUNDLED_MODEL_DIR)
    raise ServeConfigError(
        f"no model given and the bundled model is not installed ({BUNDLED_MODEL_DIR}); "
        "pass --model (a model folder, a checkpoint file or a Hugging Face name such as gpt2) "
        "or set GPTSERVE_MODEL"
    )


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ServeConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ServeConfigError("float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def engine_config(
    settings: Settings, device: torch.device, kv_cache_dtype: str | None = None
) -> EngineConfig:
    """The engine's limits from the deployment's settings (fast decode only on CUDA);
    `kv_cache_dtype`, when given, is what the start-up chose for the setting's `auto`."""
    fast_decode = settings.fast_decode
    if fast_decode and device.type != "cuda":
        logger.warning("--fast-decode captures CUDA graphs; on %s it is off", device.type)
        fast_decode = False
    return EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_model_len=settings.max_model_len,
        truncate_prompt=settings.truncate_prompt,
        fast_decode=fast_decode,
        max_slots_per_request=settings.max_slots_per_request,
        reuse_prefixes=settings.prefix_caching,
        speculative_method=settings.speculative_method,
        num_speculative_tokens=settings.num_speculative_tokens,
        speculative_max_batch_size=settings.speculative_max_batch_size,
        kv_cache_dtype=kv_cache_dtype or settings.kv_cache_dtype,
    )


def load_engine(settings: Settings) -> tuple[AsyncEngine, str]:
    """Load the model and tokenizer and build the engine (not started); returns it and the name."""
    spec = resolve_model_spec(settings.model)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:  # before the weights load: a combination that cannot run fails at once
        cache_dtype = resolve_kv_cache_dtype(settings.kv_cache_dtype, dtype)
    except ValueError as exc:
        raise ServeConfigError(f"--kv-cache-dtype: {exc}") from exc
    # (auto under --batch-invariant is float32, or the dtype check below refuses the model)
    named = settings.kv_cache_dtype != "auto"
    if settings.batch_invariant and named and cache_dtype != torch.float32:
        raise ServeConfigError(
            "--batch-invariant keeps a float32 KV cache (its attention is proved bit-exact on "
            f"float32 keys and values), not {settings.kv_cache_dtype}"
        )
    logger.info("loading %s on %s as %s", spec, device, dtype_name(dtype))
    loaded = load_model(spec, device, dtype)
    model = loaded.model
    check_finite_weights(model, spec)
    if device.type == "cpu":
        # after loading, so the checkpoint's transient copies are given back to the system first
        keep_freed_memory()
    # off: nothing compiled, the bf16x3 linears (in the same library) included
    set_native_enabled(settings.native_decode != "off")
    # Kernels are timed up to this many rows: prompt chunks and speculative checks have many
    # rows whatever the batch cap.
    probe_rows = max(settings.max_batch_size, PROBE_ROW_COUNTS[-1])
    kv_cache_dtype: str = settings.kv_cache_dtype
    if settings.quantization != "none":
        if settings.batch_invariant:
            raise ServeConfigError(
                "--batch-invariant works on float32 weights; int8's dynamic quantization "
                "scales activations over the whole batch, so it is not offered with int8"
            )
        if device.type != "cpu" or dtype != torch.float32:
            raise ServeConfigError(
                f"--quantization {settings.quantization} needs --device cpu and float32"
            )
        # measured: the fastest int8 engine at one row and at many rows differ by CPU
        model = use_fastest_int8_kernels(model, probe_rows)
        kv_cache_dtype = int8_kv_cache_dtype(model, kv_cache_dtype, settings.max_batch_size)
    elif settings.batch_invariant:
        if device.type != "cpu" or dtype != torch.float32:
            raise ServeConfigError("--batch-invariant needs --device cpu and float32 weights")
        try:
            make_batch_invariant(model, settings.float32_matmul_precision)
            check_batch_invariance(model, min(model.config.block_size, 256))
        except BatchInvarianceError as exc:
            raise ServeConfigError(f"--batch-invariant: {exc}") from exc
    elif settings.pack_weights and device.type == "cpu" and dtype in PACKABLE_DTYPES:
        if not packing_available():
            logger.warning("this torch build has no oneDNN linear ops; weights stay unpacked")
        elif settings.packed_min_rows is not None:  # forced: row-major weights, as always
            pack_linears(model, settings.packed_min_rows)
        else:  # measured: the one-row layout and where oneDNN starts to win depend on the CPU
            use_fastest_float32_kernels(model, probe_rows, settings.float32_matmul_precision)
    if (
        settings.native_decode != "off"
        and not settings.batch_invariant
        and device.type == "cpu"
        and dtype == torch.float32
    ):  # last: it reads the weights where the choices above left them
        rows = max(settings.max_batch_size, settings.num_speculative_tokens + 1)
        force = settings.native_decode == "on"
        cache = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        choose_native_decode(
            model, rows, force=force, kv_cache_dtype=cache, batch_rows=settings.max_batch_size
        )
    if loaded.tokenizer_dir is not None:
        tokenizer = Tokenizer.for_model_dir(loaded.tokenizer_dir)
    else:
        tokenizer = Tokenizer.default()
    draft = load_draft_model(settings, model, device, dtype)
    config = engine_config(settings, device, kv_cache_dtype)
    engine = LLMEngine(model, tokenizer, config, draft_model=draft)
    release_openmp_threads()  # loading ran here; the steps will run on the engine thread
    default_name = BUNDLED_MODEL_NAME if settings.model is None else loaded.name
    return serve_engine(engine, settings), settings.served_model_name or default_name


def load_draft_model(
    settings: Settings, model: GPT, device: torch.device, dtype: torch.dtype
) -> GPT | None:
    """The draft model of `--speculative-method draft`, checked against the served model."""
    if settings.speculative_method != "draft":
        if settings.draft_model is not None:
            raise ServeConfigError("--draft-model is used with --speculative-method draft")
        return None
    if settings.draft_model is None:
        raise ServeConfigError("--speculative-method draft needs --draft-model")
    draft = load_model(settings.draft_model, device, dtype).model
    check_finite_weights(draft, settings.draft_model)
    if draft.config.vocab_size < model.config.vocab_size:
        raise ServeConfigError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) is smaller than the "
            f"served model's ({model.config.vocab_size}): it cannot propose every token"
        )
    on_cpu = device.type == "cpu" and dtype in PACKABLE_DTYPES
    if on_cpu and settings.pack_weights:  # the draft mostly runs one row: measure it as well
        use_fastest_float32_kernels(draft, PROBE_ROW_COUNTS[-1], settings.float32_matmul_precision)
    logger.info(
        "draft model %s: %s parameters", settings.draft_model, f"{draft.config.num_parameters:,}"
    )
    return draft


def serve_engine(engine: LLMEngine, settings: Settings) -> AsyncEngine:
    """The asyncio front of `engine`, with the deployment's admission and stream limits."""
    return AsyncEngine(
        engine,
        max_queued_prompt_tokens=settings.max_queued_prompt_tokens,
        stream_buffer=settings.stream_buffer,
        stall_timeout=settings.stalled_stream_timeout,
    )


def check_finite_weights(model: torch.nn.Module, spec: str) -> None:
    """Refuse weights holding NaN or infinity: they would serve garbage (or NaN logprobs)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise ServeConfigError(
                f"the weights of {spec} are damaged: {name} holds NaN or infinite values"
            )
