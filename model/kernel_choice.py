"""Pick the fastest matrix kernels for this machine at start-up, by measuring them.

Which kernel wins depends on the CPU, not only on the shapes: MKL's matrix-vector path is the
fastest for one row everywhere measured, but where oneDNN's packed kernel starts to beat MKL
moved from 4 rows (an Intel Xeon) to 2 (an AMD EPYC, where MKL's skinny matrix products are
slow). So instead of a fixed threshold, `choose_packed_min_rows` times the model's own linear
layers (its distinct weights, as a decode step reads them) with both kernels at a few row
counts, and returns the row count from which the packed kernel wins; before that,
`choose_weight_layout` times one row on row-major and on column-major weights (see
model.weight_layout), and `use_fastest_float32_kernels` applies both. `choose_int8_engines` does
the same for the int8 kernels torch has (x86, fbgemm, oneDNN), one for few rows and one for many.
All only choose among kernels that compute the same function (float32 to float32, int8 to
int8); a kernel missing from the torch build is simply not a candidate, and with none the plain
path stays. The one choice that changes results, a bfloat16 KV cache
(`choose_kv_cache_dtype`), is made only where the logits are approximate anyway (int8 weights);
over such a cache the compiled attention (`choose_native_decode`) keeps the queries in float32
where torch's rounds them to bfloat16 too.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.bf16x3_linear import Swap, check_logits
from model.config import GPTConfig
from model.decode import DecodeStep, key_window
from model.gpt2 import GPT
from model.kv_cache import KVCache
from model.native_decode import (
    KVStore,
    NativeDecode,
    NativeRoute,
    NativeUnavailable,
    attach_route,
)
from model.packed_linear import PACK_BATCH_HINT, pack_linears, packing_available
from model.quantize import quantize_int8, route_int8_rows
from model.weight_layout import linear_layers, linear_weights, set_column_major

logger = logging.getLogger(__name__)

PROBE_ROW_COUNTS = (1, 2, 3, 4, 6, 8, 16, 32)
REPEATS = 3


@dataclass
class KernelChoice:
    """A choice and the timings it came from (milliseconds per pass over the layers)."""

    packed_min_rows: int | None  # None: MKL for every row count
    timings: dict[int, tuple[float, float]] = field(default_factory=dict)  # rows: (MKL, packed)
    reason: str = ""
    column_major: bool = False  # MKL reads the weights column-major (model.weight_layout)
    # from this many rows the bf16x3 AMX kernels (model.bf16x3_linear) instead of either
    bf16x3_min_rows: int | None = None
    bf16x3_timings: dict[int, float] = field(default_factory=dict)  # rows: ms
    bf16x3_note: str = ""  # why they are not used, or the logit check's difference

    def describe(self) -> str:
        """One phrase for the start-up line."""
        mkl = "MKL on column-major weights" if self.column_major else "MKL"
        if self.bf16x3_min_rows is not None:
            rows = self.bf16x3_min_rows
            amx = "float32 as bf16x3 on AMX"
            return (
                f"{amx} for every row count"
                if rows <= 1
                else f"{mkl} below {rows} rows, {amx} from {rows}"
            )
        if self.packed_min_rows is None:
            return f"{mkl} for every row count ({self.reason})" if self.reason else mkl
        if self.packed_min_rows <= 1:
            return "oneDNN packed for every row count"
        return f"{mkl} below {self.packed_min_rows} rows, oneDNN packed from {self.packed_min_rows}"


def _best_time(run: Callable[[], object]) -> float:
    run()  # the first call builds the kernel
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def choose_packed_min_rows(
    model: nn.Module, max_rows: int, row_counts: tuple[int, ...] = PROBE_ROW_COUNTS
) -> KernelChoice:
    """Time the model's float32 linears with MKL and with oneDNN's packed kernel; the packed
    kernel is used from the smallest probed row count from which it wins at every larger one."""
    if not packing_available():
        return KernelChoice(None, reason="this torch build has no oneDNN linear ops")
    layers = linear_layers(model)
    if not layers or any(
        layer.weight.dtype != torch.float32 or layer.weight.device.type != "cpu" for layer in layers
    ):
        return KernelChoice(None, reason="packed weights are for CPU float32 models")
    packed = [
        (
            torch.ops.mkldnn._reorder_linear_weight(
                layer.weight.detach().contiguous(), PACK_BATCH_HINT
            ),
            layer,
        )
        for layer in layers
    ]
    timings: dict[int, tuple[float, float]] = {}
    for rows in (r for r in row_counts if r <= max(1, max_rows)):
        inputs = {layer.in_features: torch.randn(rows, layer.in_features) for layer in layers}

        def mkl(inputs: dict[int, torch.Tensor] = inputs) -> None:
            for layer in layers:
                F.linear(inputs[layer.in_features], layer.weight, layer.bias)

        def onednn(inputs: dict[int, torch.Tensor] = inputs) -> None:
            for weight, layer in packed:
                x = inputs[layer.in_features]
                torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, "none", [], "")

        timings[rows] = (_best_time(mkl), _best_time(onednn))
    wins = [rows for rows, (mkl_ms, packed_ms) in timings.items() if packed_ms < mkl_ms]
    min_rows = None
    for rows in sorted(timings, reverse=True):  # the smallest count from which packed keeps winning
        if rows not in wins:
            break
        min_rows = rows
    choice = KernelChoice(min_rows, timings)
    logger.info(
        "linear kernels: %s (ms MKL/packed by rows: %s)",
        choice.describe(),
        ", ".join(f"{r}: {m:.1f}/{p:.1f}" for r, (m, p) in timings.items()),
    )
    return choice


def choose_weight_layout(model: nn.Module) -> tuple[bool, float, float]:
    """Time one row through the model's float32 linears with the weights row-major, then
    column-major (model.weight_layout), and leave them in the faster layout. Returns whether
    that is column-major, and both timings (ms). In place: no second copy of the weights."""
    layers = linear_layers(model)
    inputs = {layer.in_features: torch.randn(1, layer.in_features) for layer in layers}

    def one_row() -> None:
        for layer in layers:
            F.linear(inputs[layer.in_features], layer.weight, layer.bias)

    set_column_major(model, False)
    with torch.inference_mode():
        row_ms = _best_time(one_row)
    set_column_major(model, True)  # outside inference mode: the parameters stay plain tensors
    with torch.inference_mode():
        column_ms = _best_time(one_row)
    column_major = column_ms < row_ms
    if not column_major:
        set_column_major(model, False)
    logger.info(
        "one-row weight layout: %s (ms row-major/column-major: %.1f/%.1f)",
        "column-major" if column_major else "row-major",
        row_ms,
        column_ms,
    )
    return column_major, row_ms, column_ms


def use_fastest_float32_kernels(
    model: nn.Module, max_rows: int, matmul_precision: str = "highest"
) -> KernelChoice:
    """Measure and apply this machine's fastest float32 linear kernels to a CPU model: the
    weight layout for one row, then from which row count oneDNN's packed kernel takes over
    (the weights are packed for it). With `matmul_precision` "high", the bf16x3 AMX kernels
    (model.bf16x3_linear) are timed too and take over, instead of the packed ones, from the row
    count where they win, if the model's logits pass their check (`choose_bf16x3`). Without
    oneDNN, or for weights that are not CPU float32, the model stays as it is."""
    if not packing_available():
        return KernelChoice(None, reason="this torch build has no oneDNN linear ops")
    if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in linear_weights(model)):
        return KernelChoice(None, reason="packed weights are for CPU float32 models")
    # MKL is slower on column-major weights from 2 rows, so that layout is kept only when the
    # packed kernel takes every step of 2 rows or more; the threshold is measured on it.
    column_major, _, _ = choose_weight_layout(model)
    choice = choose_packed_min_rows(model, max_rows)
    if column_major and choice.packed_min_rows != 2:
        set_column_major(model, False)
        column_major = False
        choice = choose_packed_min_rows(model, max_rows)
    choice.column_major = column_major
    if matmul_precision == "high" and choose_bf16x3(model, choice):
        return choice
    if choice.packed_min_rows is not None:
        pack_linears(model, choice.packed_min_rows)
    return choice


def choose_bf16x3(model: nn.Module, choice: KernelChoice) -> bool:
    """Time the bf16x3 AMX kernels at the row counts `choice` timed MKL and oneDNN at. If they
    beat both at the largest count, put them in the model's linears from the count from which
    they keep beating MKL (MKL below: the compiled decode step takes the few-row steps where it
    wins), check the logits of a probe prompt against float32 kernels', and keep them if they
    pass; otherwise (or on any error) the model is left as it was. Records the outcome in
    `choice`; returns whether they were kept."""
    if not choice.timings:
        choice.bf16x3_note = "no float32 timings to compare them with"
        return False
    try:
        swap = Swap(model, min_rows=1)
    except NativeUnavailable as exc:
        return _unavailable(choice, exc)
    try:
        for rows in choice.timings:
            inputs = {
                layer.in_features: torch.randn(rows, layer.in_features) for layer in swap.layers
            }

            def amx(inputs: dict[int, torch.Tensor] = inputs) -> None:
                for layer in swap.layers:
                    layer(inputs[layer.in_features])

            with torch.inference_mode():
                choice.bf16x3_timings[rows] = _best_time(amx)
    except NativeUnavailable as exc:  # e.g. the tiles refused to this process
        choice.bf16x3_timings.clear()
        return _unavailable(choice, exc)
    # Taken only if they win where the most rows run: beside the largest probed count they
    # beat both float32 kernels. Then they run from the count from which they keep beating MKL,
    # the kernel left below them (no packed copy is kept beside them): no row count is slower
    # than with MKL alone, and between the packed kernel's threshold and that count they may
    # give up a little against it, for one extra copy of the weights instead of two.
    largest = max(choice.bf16x3_timings)
    measured = ", ".join(f"{r}: {t:.1f}" for r, t in choice.bf16x3_timings.items())
    if choice.bf16x3_timings[largest] >= min(choice.timings[largest]):
        choice.bf16x3_note = f"slower than float32 kernels at {largest} rows"
        logger.info(
            "bf16x3 linears: not used, not faster at %d rows (ms by rows: %s)", largest, measured
        )
        return False
    min_rows = largest
    for rows in sorted(choice.bf16x3_timings, reverse=True):  # from where they keep beating MKL
        if choice.bf16x3_timings[rows] >= choice.timings[rows][0]:
            break
        min_rows = rows
    # as with the packed kernel: column-major weights only where MKL runs single rows alone
    relaid = choice.column_major and min_rows != 2
    if relaid:
        set_column_major(model, False)
    for layer in swap.layers:
        layer.min_rows = min_rows
        if relaid:
            layer.relaid()
    swap.put_in()
    try:
        passed, difference = check_logits(model, min_rows)
    except NativeUnavailable as exc:
        _restore(model, swap, relaid)
        return _unavailable(choice, exc)
    except BaseException:
        _restore(model, swap, relaid)
        raise
    if not passed:
        _restore(model, swap, relaid)
        choice.bf16x3_note = f"logits {difference:.1e} off float32's"
        logger.warning(
            "bf16x3 linears: not used, the logits of a probe were %.1e off float32 kernels'",
            difference,
        )
        return False
    choice.column_major = choice.column_major and not relaid
    choice.bf16x3_min_rows = min_rows
    choice.bf16x3_note = f"logits within {difference:.1e} of float32's"
    logger.info(
        "linear kernels: %s (ms bf16x3 by rows: %s; logits within %.1e of float32 kernels')",
        choice.describe(),
        measured,
        difference,
    )
    return True


def _unavailable(choice: KernelChoice, exc: NativeUnavailable) -> bool:
    """Record (and log) why the bf16x3 kernels cannot run; they are not taken."""
    choice.bf16x3_note = str(exc)
    logger.info("bf16x3 linears: not used (%s)", exc)
    return False


def _restore(model: nn.Module, swap: Swap, relaid: bool) -> None:
    """Back to the float32 linears (and their layout) that `choose_bf16x3` found."""
    swap.take_out()
    if relaid:
        set_column_major(model, True)


NATIVE_ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)
NATIVE_PROBE_POSITION = 32  # where the probe's rows decode: a short context, as most steps


def choose_native_decode(
    model: GPT,
    max_rows: int,
    force: bool = False,
    kv_cache_dtype: torch.dtype = torch.float32,
    batch_rows: int | None = None,
) -> NativeRoute | None:
    """Time the compiled decode step (model.native_decode) against the torch one on this
    model's weights, as they are now laid out, packed or quantized, over a KV cache of the
    serving dtype, at a few row counts; attach it to the model for the row counts up to the
    largest from which down it wins at every count probed. Time the compiled attention of the
    batched steps (`time_batched_attention`, at up to `batch_rows` rows: the batch cap, default
    `max_rows`) too, and take it where it wins; decode rows that share a prompt prefix then
    attend through its shared-prefix form as well (measured on a 400-token header at 32 rows:
    ~52 against 57-61 ms a float32 step).
    `force` attaches both for every row count they take, unmeasured. Returns the route, or None
    (the torch step for every row count: the step cannot be built here, or never wins)."""
    attach_route(model, None)
    try:
        native = NativeDecode(model)
    except NativeUnavailable as exc:
        logger.info("decode step: torch (the compiled one is unavailable: %s)", exc)
        return None
    config = model.config
    length = min(config.block_size, NATIVE_PROBE_POSITION + 1)
    if not native.supports(KVCache(config, 1, length, dtype=kv_cache_dtype)):
        logger.info("decode step: torch (the compiled one has no %s KV cache)", kv_cache_dtype)
        return None
    if force:
        route = NativeRoute(native, native.max_rows, attention=True)
        attach_route(model, route)
        logger.info("decode step: %s (forced)", route.describe())
        return route
    attention = None
    batch_rows = max_rows if batch_rows is None else batch_rows
    if batch_rows > 1:  # steps of one row never attend in a batch
        try:
            rows = min(batch_rows, KV_PROBE_ROWS)
            attention = time_batched_attention(config, rows, kv_cache_dtype)
        except NativeUnavailable as exc:
            logger.info("batched attention: torch (%s)", exc)
    attend = attention is not None and attention[1] < attention[0]
    counts = [r for r in NATIVE_ROW_COUNTS if r <= min(max(1, max_rows), native.max_rows)]
    cache = KVCache(config, counts[-1], length, dtype=kv_cache_dtype)
    reference = DecodeStep(model)  # no route attached: the torch step
    reference.compiled_attention = attend  # as its batched steps will run
    timings: dict[int, tuple[float, float]] = {}
    with torch.inference_mode():
        for rows in counts:
            step = ([7] * rows, list(range(rows)), [length - 1] * rows)
            torch_ms = _best_time(partial(reference, cache, *step))
            native_ms = _best_time(partial(native, cache, *step))
            timings[rows] = (torch_ms, native_ms)
            if native_ms >= torch_ms:  # the torch step's kernels take over from here
                break
    del cache
    # The probe stops at the first loss, so the compiled step won at every count before it.
    top = max((rows for rows, (t, n) in timings.items() if n < t), default=0)
    measured = ", ".join(f"{r}: {t:.1f}/{n:.1f}" for r, (t, n) in timings.items())
    if attention is not None:
        measured += f"; {attention[0]:.1f}/{attention[1]:.1f} for a batched step's attention"
    if top == 0 and not attend:
        logger.info("decode step: torch (ms torch/compiled by rows: %s)", measured)
        return None
    route = NativeRoute(native, top, timings, attention=attend, attention_timings=attention)
    attach_route(model, route)
    logger.info("decode step: %s (ms torch/compiled by rows: %s)", route.describe(), measured)
    return route


ATTENTION_PROBE_KEYS = 128  # a decode step's context in the probe


def time_batched_attention(
    config: GPTConfig, rows: int, kv_cache_dtype: torch.dtype
) -> tuple[float, float]:
    """Milliseconds of a batched decode step's attention over KV_PROBE_LAYERS layers, `rows`
    rows at slightly different positions (as in a batch), through torch (as model.decode runs
    it: scaled_dot_product_attention over the longest row's keys, masked) and compiled
    (KVStore.attend: each row over its own keys)."""
    keys = min(config.block_size, ATTENTION_PROBE_KEYS)
    cache = KVCache(replace(config, n_layer=KV_PROBE_LAYERS), rows, keys, dtype=kv_cache_dtype)
    generator = torch.Generator().manual_seed(0)
    for tensor in (cache.k, cache.v):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    slots = list(range(rows))
    positions = [max(0, keys - 1 - row % 8) for row in slots]
    qkv = torch.randn(rows, 3 * config.n_embd, generator=generator)
    query = qkv[:, : config.n_embd].reshape(rows, config.n_head, 1, config.head_dim)
    query = query.to(kv_cache_dtype)
    store = KVStore.for_step(cache, slots, positions)
    if store is None:
        raise NativeUnavailable("the compiled attention does not take this cache")
    read, context, mask = key_window(slots, positions, 0, torch.device("cpu"))

    def torch_attention() -> None:
        for layer in range(KV_PROBE_LAYERS):
            F.scaled_dot_product_attention(
                query,
                cache.k[layer][read, :, :context],
                cache.v[layer][read, :, :context],
                attn_mask=mask,
            )

    def compiled_attention() -> None:
        for layer in range(KV_PROBE_LAYERS):
            store.attend(qkv, layer)

    with torch.inference_mode():
        return _best_time(torch_attention), _best_time(compiled_attention)


@dataclass
class Int8Choice:
    """The int8 engines chosen: one for steps of few rows, one from `min_rows` rows on (None:
    the few-row engine for every step), and the timings (ms per pass by rows, per engine)."""

    few_rows: str
    many_rows: str | None = None
    min_rows: int | None = None
    timings: dict[str, dict[int, float]] = field(default_factory=dict)

    def describe(self) -> str:
        """One phrase for the start-up line."""
        if self.many_rows is None or self.min_rows is None:
            return f"int8 {self.few_rows}"
        few, many, rows = self.few_rows, self.many_rows, self.min_rows
        return f"int8 {few} below {rows} rows, {many} from {rows}"


INT8_ROW_COUNTS = (1, 4, 8, 16, 32)


def choose_int8_engines(model: nn.Module, max_rows: int) -> Int8Choice | None:
    """Time the model's own linear layers, quantized for each of torch's int8 engines, at a few
    row counts: the fastest at one row takes the few-row steps, the fastest at the most rows
    probed the many-row ones, from the smallest count where it keeps winning. None when torch
    has fewer than two engines to choose from (the current one stays)."""
    supported = [
        e for e in ("x86", "fbgemm", "onednn") if e in torch.backends.quantized.supported_engines
    ]
    if len(supported) < 2:
        return None
    layers = linear_layers(model)
    counts = [r for r in INT8_ROW_COUNTS if r <= max(1, max_rows)]
    original = torch.backends.quantized.engine
    timings: dict[str, dict[int, float]] = {}
    try:
        for engine in supported:
            torch.backends.quantized.engine = engine
            try:  # one quantized copy at a time: each is dropped when its timing returns
                timings[engine] = _time_int8(layers, counts)
            except RuntimeError:  # an engine this CPU cannot run is not a candidate
                continue
    finally:
        torch.backends.quantized.engine = original
    if not timings:
        return None
    few = min(timings, key=lambda e: timings[e][1])
    many = min(timings, key=lambda e: timings[e][counts[-1]])
    choice = Int8Choice(few, timings=timings)
    if many != few:
        wins = [r for r in counts if timings[many][r] < timings[few][r]]
        for rows in reversed(counts):  # the smallest count from which `many` keeps winning
            if rows not in wins:
                break
            choice.many_rows, choice.min_rows = many, rows
    logger.info(
        "%s (ms by rows: %s)",
        choice.describe(),
        "; ".join(
            f"{e} " + ", ".join(f"{r}: {t:.1f}" for r, t in by_rows.items())
            for e, by_rows in timings.items()
        ),
    )
    return choice


def _time_int8(layers: list[nn.Linear], counts: list[int]) -> dict[int, float]:
    """The layers quantized for the current int8 engine: ms per pass at each row count."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            nn.ModuleList(layers), {nn.Linear: per_channel_dynamic_qconfig}, torch.qint8
        )
    shaped = [(q, layer.in_features) for q, layer in zip(quantized, layers, strict=True)]

    def one_pass(inputs: dict[int, torch.Tensor]) -> None:
        for layer, features in shaped:
            layer(inputs[features])

    timings: dict[int, float] = {}
    with torch.inference_mode():
        for rows in counts:
            inputs = {features: torch.randn(rows, features) for _, features in shaped}
            timings[rows] = _best_time(partial(one_pass, inputs))
    return timings


KV_PROBE_ROWS = 32  # decode rows probed at most: attention's share of a step grows with them
KV_PROBE_KEYS = 256
KV_PROBE_LAYERS = 4  # distinct keys and values, so they are read from memory as in a step
KV_MIN_GAIN = 0.9  # bfloat16 is taken only when it needs under 90% of float32's time


@dataclass
class KVCacheChoice:
    """The KV cache's dtype chosen ("auto": the model's), and the timings it came from (ms of
    a batched decode step's attention, by dtype)."""

    dtype: str
    timings: dict[str, float] = field(default_factory=dict)


def choose_kv_cache_dtype(n_head: int, head_dim: int, rows: int = KV_PROBE_ROWS) -> KVCacheChoice:
    """Time a decode step's attention for `rows` rows (the batch cap, up to 32) over float32
    and over bfloat16 keys and values, shaped as the model's cache holds them: bfloat16 when it
    is clearly faster on this CPU (it reads half the bytes; on CPUs without bfloat16
    instructions the conversion can cost more than that saves). For models whose logits are
    not bit-exact anyway."""
    timings: dict[str, float] = {}
    keys = KV_PROBE_KEYS
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(rows) % 8 + keys - 8  # rows at different positions, as in a batch
    mask = (torch.arange(keys)[None, :] <= positions[:, None])[:, None, None, :]
    query = torch.randn(rows, n_head, 1, head_dim, generator=generator)
    shape = (rows, n_head, keys, head_dim)
    with torch.inference_mode():
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            cache = [
                (torch.full(shape, 0.5, dtype=dtype), torch.full(shape, 0.25, dtype=dtype))
                for _ in range(KV_PROBE_LAYERS)
            ]
            try:
                timings[name] = _best_time(partial(_attend, query.to(dtype), cache, mask))
            except RuntimeError:  # no bfloat16 attention on this build
                break
            del cache
    faster = "bfloat16" in timings and timings["bfloat16"] < KV_MIN_GAIN * timings["float32"]
    choice = KVCacheChoice("bfloat16" if faster else "auto", timings)
    logger.info(
        "KV cache %s (ms of a %d-row step's attention: %s)",
        "bfloat16" if faster else "in the model's dtype",
        rows,
        ", ".join(f"{name} {ms:.1f}" for name, ms in timings.items()),
    )
    return choice


def int8_kv_cache_dtype(model: GPT, setting: str, max_batch_size: int) -> str:
    """The KV cache dtype setting an int8 model runs with: a named dtype as asked, and `auto`
    measured (`choose_kv_cache_dtype`) at the batch cap's row count, up to KV_PROBE_ROWS, where
    attention's share of a step is largest. int8's logits are approximate already, so a 16-bit
    cache takes no exactness away that the model still had."""
    if setting != "auto":
        return setting
    rows = min(max_batch_size, KV_PROBE_ROWS)
    return choose_kv_cache_dtype(model.config.n_head, model.config.head_dim, rows).dtype


def _attend(
    query: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor
) -> None:
    for keys, values in cache:
        F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)


def use_fastest_int8_kernels(model: GPT, max_rows: int) -> GPT:
    """Quantize a CPU float32 model to int8 on this machine's fastest int8 engines (see
    `choose_int8_engines`): the few-row engine packs the weights, and the many-row one gets a
    second packing from the row count where it wins. Returns the quantized model."""
    int8 = choose_int8_engines(model, max_rows)
    if int8 is not None:
        torch.backends.quantized.engine = int8.few_rows
    model = quantize_int8(model)
    if int8 is not None and int8.many_rows is not None and int8.min_rows is not None:
        route_int8_rows(model, int8.many_rows, int8.min_rows)
    return model
