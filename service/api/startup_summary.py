"""The one line `gptserve serve` prints once it listens: where, what model, and how it is sized."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import FastAPI
from starlette.routing import Match
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from model.batch_invariant import InvariantLinear
from model.bf16x3_linear import Bf16x3Linear
from model.dtypes import dtype_name
from model.kernel_choice import Int8Choice, KernelChoice
from model.packed_linear import PackedLinear
from model.quantize import RoutedInt8Linear
from model.weight_layout import is_column_major
from service.engine.runner import ModelRunner
from service.engine.speculation import Speculator

MIB = 1024 * 1024


@dataclass(frozen=True)
class StartupSummary:
    """What a person starting the server needs to know, as fields (also the JSON line's)."""

    url: str
    docs_url: str
    playground_url: str  # empty when the app serves no page at /
    model: str  # the served name
    model_source: str  # bundled | folder | checkpoint | hub
    model_path: str  # what --model named; empty for the bundled model
    num_parameters: int
    device: str
    dtype: str
    quantization: str  # none | int8
    packed_weights: bool
    linear_kernels: str  # which matrix kernel runs at which row count
    decode_step: str  # "torch", or up to which row count the compiled step runs
    batch_invariant: bool
    speculation: str  # "off", or the method and its limits
    num_threads: int  # torch's CPU threads
    context_window: int  # tokens
    batch_slots: int
    kv_cache_bytes: int
    kv_cache_dtype: str  # the keys' and values' dtype (the model's unless set otherwise)
    max_queue: int

    def message(self) -> str:
        """The human line; it starts with `listening on <url> ` for scripts that wait for it."""
        if self.model_source == "bundled":
            source = "the bundled model"
        else:
            source = f"{self.model_source} {self.model_path}"
        pages = f"docs at {self.docs_url}"
        kv_dtype = "" if self.kv_cache_dtype == self.dtype else f" {self.kv_cache_dtype}"
        if self.playground_url:
            pages = f"playground at {self.playground_url}, {pages}"
        return (
            f"listening on {self.url} ({pages}); "
            f"model {self.model} ({source}, {format_count(self.num_parameters)} parameters); "
            f"{self.device} {self.dtype}, quantization {self.quantization}, "
            f"packed weights {'on' if self.packed_weights else 'off'} "
            f"({self.linear_kernels}), decode step {self.decode_step}, "
            f"batch-invariant {'on' if self.batch_invariant else 'off'}, "
            f"speculative decoding {self.speculation}, "
            f"{self.num_threads} threads; "
            f"context {self.context_window} tokens, {self.batch_slots} batch slots, "
            f"KV cache {self.kv_cache_bytes / MIB:.1f} MiB{kv_dtype}, queue {self.max_queue}"
        )

    def fields(self) -> dict[str, object]:
        """The fields for a structured (JSON) log line."""
        return asdict(self)


def format_count(count: int) -> str:
    """7259008 -> 7.26M, 1557611200 -> 1.56B."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def model_source(spec: str | None) -> str:
    """Where `--model` points: the bundled model, a folder, a checkpoint file, or a Hub name."""
    if not spec:
        return "bundled"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "checkpoint"
    return "hub"


def quantization_of(model: nn.Module) -> str:
    """int8 when the linear layers run on int8 weights (model/quantize.py), else none."""
    is_int8 = any(isinstance(module, DynamicInt8Linear) for module in model.modules())
    return "int8" if is_int8 else "none"


def decode_step_of(runner: ModelRunner) -> str:
    """Which decode step the runner takes: torch's, or the compiled one up to some rows."""
    route = runner.decode_step.native
    if route is None or not route.step.supports(runner.cache):
        return "torch"
    return route.describe()


def linear_kernels_of(model: nn.Module) -> str:
    """Which kernel the linear layers run on, as the start-up line says it."""
    if quantization_of(model) == "int8":
        routed = [m for m in model.modules() if isinstance(m, RoutedInt8Linear)]
        if routed:
            few, many, rows = torch.backends.quantized.engine, routed[0].engine, routed[0].min_rows
            return Int8Choice(few, many, rows).describe()
        return Int8Choice(torch.backends.quantized.engine).describe()
    if any(isinstance(module, InvariantLinear) for module in model.modules()):
        return "oneDNN packed at every row count, batch-invariant"
    amx = [m for m in model.modules() if isinstance(m, Bf16x3Linear)]
    if amx and is_batch_invariant(model):
        return "float32 as bf16x3 on AMX at every row count, batch-invariant"
    if amx:
        column_major = is_column_major(amx[0].weight)
        return KernelChoice(
            None, column_major=column_major, bf16x3_min_rows=amx[0].min_rows
        ).describe()
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if packed:
        column_major = is_column_major(packed[0].weight)
        return KernelChoice(packed[0].min_rows, column_major=column_major).describe()
    return "MKL" if model_device_type(model) == "cpu" else "cuBLAS"


def has_packed_weights(model: nn.Module) -> bool:
    """Whether the linear layers keep a second, packed copy of their weights: oneDNN's, or
    the bf16x3 kernels' hi and lo halves."""
    kinds = (PackedLinear, Bf16x3Linear, InvariantLinear)
    return any(isinstance(module, kinds) for module in model.modules())


def is_batch_invariant(model: nn.Module) -> bool:
    """Whether the model computes in batch-invariant mode (model.batch_invariant)."""
    return any(getattr(module, "batch_invariant", False) for module in model.modules())


def speculation_of(speculator: Speculator | None) -> str:
    """One phrase for the start-up line: off, or how guesses are made and within what limits."""
    if speculator is None:
        return "off"
    method = "prompt lookup" if speculator.method == "ngram" else "draft model"
    return (
        f"{method}, up to {speculator.num_tokens} guesses, "
        f"in steps of at most {speculator.max_batch_size} requests"
    )


def model_device_type(model: nn.Module) -> str:
    """The type of the device the first parameter lives on."""
    return next(model.parameters()).device.type


def http_url(host: str, port: int) -> str:
    """http://host:port, with IPv6 addresses in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serves_page(app: FastAPI, path: str) -> bool:
    """Whether a GET of `path` reaches a route of the app."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def startup_summary(app: FastAPI, host: str, port: int) -> StartupSummary:
    """The summary of a started app (its `state.gptserve`) once it listens on host:port."""
    state = app.state.gptserve
    settings = state.settings
    engine = state.engine.engine
    model = engine.model
    url = http_url(host, port)
    return StartupSummary(
        url=url,
        docs_url=f"{url}/docs",
        playground_url=f"{url}/" if serves_page(app, "/") else "",
        model=state.model_name,
        model_source=model_source(settings.model),
        model_path=settings.model or "",
        num_parameters=model.config.num_parameters,
        device=str(model.device),
        dtype=dtype_name(model.dtype),
        quantization=quantization_of(model),
        packed_weights=has_packed_weights(model),
        linear_kernels=linear_kernels_of(model),
        decode_step=decode_step_of(engine.runner),
        batch_invariant=is_batch_invariant(model),
        speculation=speculation_of(engine.runner.speculator),
        num_threads=torch.get_num_threads(),
        context_window=engine.max_model_len,
        batch_slots=engine.config.max_batch_size,
        kv_cache_bytes=engine.runner.cache.num_bytes,
        kv_cache_dtype=dtype_name(engine.runner.cache.k.dtype),
        max_queue=engine.config.max_queue_size,
    )
