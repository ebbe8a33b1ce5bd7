"""The decode step compiled for this CPU: one C function per step instead of ~200 torch calls.

The same library holds the bf16x3 float32 linears for CPUs with AMX (`native/matmul_bf16x3.c`,
used through model.bf16x3_linear).

At one stream on a CPU a decode step should take as long as reading the weights once (gpt2:
~500 MB, ~16-20 ms on a 2-core machine). Through torch it also pays for every op's dispatch, a
parallel region per linear layer whose threads start and stop, and the small ops in between:
~3-4 ms more. `model/native/decode_step.c` runs a whole step of up to 16 rows in one OpenMP
parallel region (see its header), reading the weights where torch keeps them, in either layout
(model.weight_layout), and the KV cache in place.

int8 models (model.quantize) run on the same integers and scales, read one byte per weight.
Where the build has the CPU's int8 dot products (AVX512-VNNI), each row's activations are
rounded to 8 bits on their own scale and multiplied with them (torch's int8 layers round the
whole batch on one 7-bit scale): one gpt2 token took ~2.7 ms against torch's ~5.7 on an
AVX-512 Xeon. Elsewhere the weights are widened to float32 in registers: the logits of the
float32 model with the dequantized weights. Whether either beats torch's int8 kernels is
measured at start-up like the rest.

It is built at start-up with the system's C compiler, for this CPU (`-march=native`), into a
cache folder keyed by the source, the compiler and the CPU's flags, so later starts only load it
(~0.1 s instead of ~1-2 s). It links libgomp.so.1, which is the OpenMP runtime torch's CPU
wheels load (torch/lib/libgomp.so.1), so both share one team of threads; a torch that ships its
libgomp under another name would give it a second team (slower, not wrong). Where there is no
compiler (the container image), a portable build made in advance for a CPU level this CPU
supports (x86-64-v4 with AMX, with VNNI or plain, or v3; `python -m model.native_prebuild`) is loaded
instead. Where there is
neither, the build fails, or the model is one it does not cover (not float32 on the CPU,
batch-invariant linears, a float16 KV cache), `NativeUnavailable` says why and the torch decode
step (model.decode) runs as before: it stays the reference this one is tested against (logits
within 1e-4).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import nn

from model.gpt2 import GPT
from model.kv_cache import KVCache
from model.quantize import DynamicInt8Linear, RoutedInt8Linear
from model.weight_layout import is_column_major

logger = logging.getLogger(__name__)

# compiled together into one library: the decode step and the AMX float32 matmul
SOURCES: tuple[Path, ...] = tuple(
    Path(__file__).parent / "native" / name for name in ("decode_step.c", "matmul_bf16x3.c")
)
ABI = 4  # GPTSERVE_NATIVE_ABI in the source: the structs below match that version
CFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
if platform.machine().lower() in ("x86_64", "amd64"):
    # For recent Intel cores GCC and clang vectorise the `omp simd` loops (those that stream the
    # weights) with 256-bit vectors unless told otherwise; with 512-bit ones a one-row step of
    # gpt2 took ~15.0 instead of ~16.2 ms on an AVX-512 Xeon. Without AVX-512 it changes nothing.
    CFLAGS += ("-mprefer-vector-width=512",)
BUILD_TIMEOUT_S = 120
# Portable builds for a machine without a C compiler (the container image), best first: each
# -march level with the CPU flags (/proc/cpuinfo) it needs. `python -m model.native_prebuild`
# makes them into PREBUILT, which is not in git.
PREBUILT = Path(__file__).parent / "native" / "prebuilt"
_AVX2 = ("avx2", "fma", "bmi1", "bmi2", "f16c", "movbe")
_AVX512 = _AVX2 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
PORTABLE_TARGETS: dict[str, tuple[str, ...]] = {
    # AMX's bfloat16 tiles too (model/native/matmul_bf16x3.c): Sapphire Rapids and later
    "x86-64-v4-amx": _AVX512 + ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"),
    "x86-64-v4-vnni": _AVX512 + ("avx512_vnni",),  # the int8 dot products too
    "x86-64-v4": _AVX512,
    "x86-64-v3": _AVX2,
}
_TARGET_FLAGS = {
    "x86-64-v4-amx": (
        "-march=x86-64-v4",
        "-mavx512vnni",
        "-mavx512bf16",
        "-mamx-tile",
        "-mamx-bf16",
    ),
    "x86-64-v4-vnni": ("-march=x86-64-v4", "-mavx512vnni"),
    "x86-64-v4": ("-march=x86-64-v4",),
    "x86-64-v3": ("-march=x86-64-v3",),
}
STALE_BUILD_S = 7 * 24 * 3600  # other builds untouched this long are removed after a build


class NativeUnavailable(RuntimeError):
    """The compiled decode step cannot run here; the message says why."""


class _Linear(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("in_features", ctypes.c_int),
        ("out_features", ctypes.c_int),
        ("column_major", ctypes.c_int),
        ("qweight", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("wsum", ctypes.c_void_p),
        ("int8_dot", ctypes.c_int),
    ]


class _Block(ctypes.Structure):
    _fields_ = [
        ("ln_1_weight", ctypes.c_void_p),
        ("ln_1_bias", ctypes.c_void_p),
        ("qkv", _Linear),
        ("out", _Linear),
        ("ln_2_weight", ctypes.c_void_p),
        ("ln_2_bias", ctypes.c_void_p),
        ("up", _Linear),
        ("down", _Linear),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layer", ctypes.c_int),
        ("n_embd", ctypes.c_int),
        ("n_head", ctypes.c_int),
        ("vocab_size", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("wte", ctypes.c_void_p),
        ("wte_column_major", ctypes.c_int),
        ("wpe", ctypes.c_void_p),
        ("blocks", ctypes.POINTER(_Block)),
        ("ln_f_weight", ctypes.c_void_p),
        ("ln_f_bias", ctypes.c_void_p),
        ("head", _Linear),
    ]


def cache_dir() -> Path:
    """Where built libraries are kept: $GPTSERVE_CACHE_DIR, else $XDG_CACHE_HOME/gptserve, else
    ~/.cache/gptserve."""
    if os.environ.get("GPTSERVE_CACHE_DIR"):
        return Path(os.environ["GPTSERVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gptserve"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler() -> str:
    name = os.environ.get("CC", "cc")
    path = shutil.which(name) or shutil.which("gcc")
    if path is None:
        raise NativeUnavailable(f"no C compiler found ({name}, gcc)")
    return path


def build_library(compiler: str | None = None, folder: Path | None = None) -> Path:
    """Compile the source for this CPU (or find it compiled already); returns the library."""
    compiler = compiler or _compiler()
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"the C compiler {compiler} does not run: {exc}") from exc
    key = hashlib.sha256(
        b"\0".join(
            [
                *(source.read_bytes() for source in SOURCES),
                compiler.encode(),
                version.encode(),
                " ".join(CFLAGS).encode(),
            ]
            + [_cpu_flags().encode()]
        )
    ).hexdigest()[:16]
    folder = folder or cache_dir() / "native"
    target = folder / f"decode_step-{key}.so"
    if target.is_file():
        with contextlib.suppress(OSError):  # marks it as in use (see _remove_stale_builds)
            os.utime(target)
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out_dir = folder
    except OSError:  # a read-only home: build into a temporary folder, every start
        out_dir = Path(tempfile.mkdtemp(prefix="gptserve-native-"))
        target = out_dir / target.name
    _compile(compiler, CFLAGS, target)
    _remove_stale_builds(out_dir, keep=target)
    return target


def _compile(compiler: str, flags: Sequence[str], target: Path) -> None:
    """Compile SOURCES with `flags` into `target`, which appears whole or not at all."""
    partial = target.parent / f".{target.name}.{os.getpid()}.tmp"
    command = [compiler, *flags, *map(str, SOURCES), "-o", str(partial), "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"compiling the decode step failed: {exc}") from exc
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise NativeUnavailable(f"compiling the decode step failed: {' / '.join(detail)}")
    os.replace(partial, target)  # atomic: a concurrent start sees the whole file or none


def _source_key() -> str:
    return hashlib.sha256(b"\0".join(source.read_bytes() for source in SOURCES)).hexdigest()[:16]


def prebuilt_path(target: str, folder: Path | None = None) -> Path:
    """Where the portable build for `target` (a PORTABLE_TARGETS key) of this source lives."""
    return (folder or PREBUILT) / f"decode_step-{target}-{_source_key()}.so"


def build_portable(target: str, folder: Path | None = None, compiler: str | None = None) -> Path:
    """Compile the source for every CPU of a level (a PORTABLE_TARGETS key: an x86-64 level,
    x86-64-v4-vnni, which adds AVX512-VNNI, or x86-64-v4-amx, which adds AVX512-BF16 and AMX's
    bfloat16 tiles as well) rather than for this CPU, into `folder` (the
    package's prebuilt folder by default): what an image without a C compiler loads (see
    find_prebuilt). The compiling machine's CPU may lack the level's instructions; the build
    does not run anything."""
    if target not in PORTABLE_TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(PORTABLE_TARGETS)}")
    path = prebuilt_path(target, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags: list[str] = []
    for flag in CFLAGS:
        flags += _TARGET_FLAGS[target] if flag == "-march=native" else (flag,)
    _compile(compiler or _compiler(), flags, path)
    return path


def find_prebuilt(folder: Path | None = None) -> tuple[str, Path] | None:
    """The best portable build of this source that this CPU can run, as (target, path), or
    None: builds of another source, and levels whose instructions the CPU lacks, are passed
    over."""
    flags = set(_cpu_flags().split())
    for target, needs in PORTABLE_TARGETS.items():
        path = prebuilt_path(target, folder)
        if flags.issuperset(needs) and path.is_file():
            return target, path
    return None


def library_path() -> tuple[Path, str]:
    """The library to load and where it came from: built for this CPU where a C compiler
    works, else a portable build shipped with the package (the container image has one) that
    this CPU can run; NativeUnavailable where neither is there."""
    try:
        return build_library(), "for this CPU"
    except NativeUnavailable as exc:
        found = find_prebuilt()
        if found is None:
            raise
        target, path = found
        logger.info("decode step: no build for this CPU (%s); the prebuilt %s one", exc, target)
        return path, f"prebuilt for {target}"


def _remove_stale_builds(folder: Path, keep: Path) -> None:
    """Remove the folder's other builds (older sources, other CPUs, other compilers) that no
    start has used for STALE_BUILD_S; a found build is touched when it is used."""
    cutoff = time.time() - STALE_BUILD_S
    for old in folder.glob("decode_step-*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # another process removed it, or the folder is shared read-only
            continue


def load_library() -> ctypes.CDLL:
    """The compiled decode step, built if needed and loaded once per process; where that fails,
    NativeUnavailable, and the same again on every later call without trying again."""
    outcome = _load_once()
    if isinstance(outcome, NativeUnavailable):
        raise outcome
    return outcome


_enabled = True
_load_lock = threading.Lock()
_origin = "for this CPU"  # library_path's word on the loaded library


def library_origin() -> str:
    """Where the loaded library came from, for the start-up line: `for this CPU`, or
    `prebuilt for x86-64-v4` (or another level) where no compiler was found."""
    return _origin


def set_enabled(enabled: bool) -> None:
    """Allow the compiled library (the default), or not: `--native-decode off` means torch
    only, the batched steps' compiled cache writes and GELU included."""
    global _enabled
    _enabled = enabled


def _load_once() -> ctypes.CDLL | NativeUnavailable:
    if not _enabled:
        return NativeUnavailable("turned off (--native-decode off)")
    with _load_lock:  # one build at a time: threads asking at once wait for the first
        return _load_cached()


@cache
def _load_cached() -> ctypes.CDLL | NativeUnavailable:
    try:
        return _load()
    except NativeUnavailable as exc:
        return exc
    except Exception as exc:  # a file system, environment or library surprise: torch then
        logger.warning("the compiled decode step cannot be loaded: %r", exc)
        return NativeUnavailable(f"{type(exc).__name__}: {exc}")


def _load() -> ctypes.CDLL:
    if torch.get_num_threads() < 1 or "libgomp" not in _loaded_openmp():
        raise NativeUnavailable("torch does not run on GNU OpenMP here, which the step shares")
    global _origin
    path, _origin = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"loading {path.name} failed: {exc}") from exc
    if lib.gptserve_native_abi() != ABI:
        raise NativeUnavailable(f"{path.name} is of another version")
    lib.gptserve_workspace_floats.restype = ctypes.c_size_t
    lib.gptserve_workspace_floats.argtypes = [
        ctypes.POINTER(_Model),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.gptserve_decode.restype = ctypes.c_int
    lib.gptserve_decode.argtypes = [
        ctypes.POINTER(_Model),
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.gptserve_store_kv.restype = ctypes.c_int
    lib.gptserve_store_kv.argtypes = (
        [ctypes.c_void_p] * 3
        + [ctypes.c_int] * 7
        + [
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
        ]
    )
    pointer, integer, ints = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
    lib.gptserve_attend.restype = ctypes.c_int
    lib.gptserve_attend.argtypes = [pointer] * 3 + [integer] * 7 + [ints] * 3
    lib.gptserve_attend.argtypes += [integer, pointer, pointer, integer]
    lib.gptserve_attend_shared.restype = ctypes.c_int
    lib.gptserve_attend_shared.argtypes = [pointer] * 3 + [integer] * 6 + [ints] * 2
    lib.gptserve_attend_shared.argtypes += [integer, ints, integer, integer, pointer, pointer]
    lib.gptserve_attend_shared.argtypes += [integer]
    lib.gptserve_attend_floats.restype = ctypes.c_size_t
    lib.gptserve_attend_floats.argtypes = [integer, integer]
    lib.gptserve_argmax.restype = None
    lib.gptserve_argmax.argtypes = [pointer, ctypes.c_long, ctypes.c_long, pointer]
    lib.gptserve_int8_dot.restype = ctypes.c_int
    lib.gptserve_int8_dot.argtypes = []
    lib.gptserve_gelu.restype = None
    lib.gptserve_gelu.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.gptserve_bf16x3_ready.restype = ctypes.c_int
    lib.gptserve_bf16x3_ready.argtypes = []
    lib.gptserve_bf16x3_scratch_bytes.restype = ctypes.c_size_t
    lib.gptserve_bf16x3_scratch_bytes.argtypes = [integer, integer]
    lib.gptserve_bf16x3_packed_bytes.restype = ctypes.c_size_t
    lib.gptserve_bf16x3_packed_bytes.argtypes = [integer, integer]
    lib.gptserve_bf16x3_pack.restype = ctypes.c_int
    lib.gptserve_bf16x3_pack.argtypes = [pointer, integer, integer, pointer]
    lib.gptserve_bf16x3_linear.restype = ctypes.c_int
    lib.gptserve_bf16x3_linear.argtypes = [pointer] + [integer] * 3 + [pointer, integer, pointer]
    lib.gptserve_bf16x3_linear.argtypes += [integer, pointer, pointer, integer]
    logger.debug("native decode step loaded from %s", path)
    return lib


def _loaded_openmp() -> str:
    """The OpenMP runtimes mapped into this process (torch's is loaded by now)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "libgomp"  # no /proc: assume the usual build (it links libgomp)
    return " ".join(name for name in ("libgomp", "libiomp", "libomp") if name in maps)


def cache_layout_ok(cache: KVCache) -> bool:
    """A CPU cache of float32 or bfloat16 keys and values, both contiguous, of one shape
    (n_layer, num_slots, n_head, max_len, head_dim) as model.kv_cache lays it out."""
    k, v = cache.k, cache.v
    return (
        k.dim() == 5
        and k.shape == v.shape
        and k.shape[1] == cache.num_slots
        and k.shape[3] == cache.max_seq_len
        and k.dtype == v.dtype
        and k.dtype in (torch.float32, torch.bfloat16)
        and k.device.type == "cpu"
        and v.device.type == "cpu"
        and k.is_contiguous()
        and v.is_contiguous()
    )


def _check_rows(cache: KVCache, slots: Sequence[int], positions: Sequence[int]) -> None:
    """Refuse a slot or position outside the cache before the C code writes there."""
    for slot, position in zip(slots, positions, strict=True):
        if not 0 <= slot < cache.num_slots:
            raise ValueError(f"slot {slot} out of range, outside the cache's {cache.num_slots}")
        if not 0 <= position < cache.max_seq_len:
            raise ValueError(f"position {position} outside the cache's {cache.max_seq_len}")


def weights_signature(model: nn.Module) -> tuple[object, ...]:
    """Where every weight of `model` lives and how it is laid out (int8 layers: their packed
    weights' object); any change of weights, layout or quantization changes it."""
    parts: list[object] = []
    for name, module in model.named_modules():
        parts.append((name, type(module).__name__))
        packed = module.__dict__.get("_packed_params")  # an int8 layer's packed weights
        if packed is not None:
            parts.append(id(packed))
        for key, param in module.named_parameters(recurse=False):
            parts.append((key, param.data_ptr(), param.stride(), param.dtype))
    return tuple(parts)


def _float_weight(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
        raise NativeUnavailable(f"{name} is not a CPU float32 tensor")
    return tensor.detach()


class NativeDecode:
    """The compiled decode step over one model's weights, as they are laid out when it is built
    (build it after the layout and packing are final, as model.decode.DecodeStep)."""

    def __init__(self, model: GPT, int8_dot: bool | None = None) -> None:
        """`int8_dot`: int8 layers through the CPU's int8 dot products, with the activations
        rounded to 8 bits per row (True), or widened to float32 and multiplied there (False);
        None: the dot products where this build has them (AVX512-VNNI)."""
        self.lib = load_library()
        self.max_rows = int(self.lib.gptserve_max_rows())
        available = bool(self.lib.gptserve_int8_dot())
        if int8_dot and not available:
            raise NativeUnavailable("this build has no int8 dot products (AVX512-VNNI)")
        self.int8_dot = available if int8_dot is None else int8_dot
        config = model.config
        if config.n_embd % config.n_head:
            raise NativeUnavailable("n_embd is not a multiple of n_head")
        self._keep: list[torch.Tensor] = []  # every tensor the C structs point into
        transformer = model.transformer
        blocks = transformer.blocks
        self._blocks = (_Block * len(blocks))()
        for index, block in enumerate(blocks):
            if getattr(block.attn, "batch_invariant", False):
                raise NativeUnavailable("batch-invariant models attend per query (model.decode)")
            prefix = f"transformer.h.{index}"
            self._blocks[index] = _Block(
                self._vector(block.ln_1.weight, f"{prefix}.ln_1.weight"),
                self._vector(block.ln_1.bias, f"{prefix}.ln_1.bias"),
                self._linear(block.attn.c_attn, f"{prefix}.attn.c_attn"),
                self._linear(block.attn.c_proj, f"{prefix}.attn.c_proj"),
                self._vector(block.ln_2.weight, f"{prefix}.ln_2.weight"),
                self._vector(block.ln_2.bias, f"{prefix}.ln_2.bias"),
                self._linear(block.mlp.c_fc, f"{prefix}.mlp.c_fc"),
                self._linear(block.mlp.c_proj, f"{prefix}.mlp.c_proj"),
            )
        eps = {b.ln_1.eps for b in blocks} | {b.ln_2.eps for b in blocks} | {transformer.ln_f.eps}
        if len(eps) != 1:
            raise NativeUnavailable("the LayerNorms differ in eps")
        wte = _float_weight(transformer.wte.weight, "transformer.wte.weight")
        wte_column_major = is_column_major(wte)
        if not (wte.is_contiguous() or wte_column_major):
            raise NativeUnavailable("transformer.wte.weight is neither row- nor column-major")
        wpe = _float_weight(transformer.wpe.weight, "transformer.wpe.weight").contiguous()
        self._keep += [wte, wpe]
        self.vocab_size = config.vocab_size
        self.n_layer, self.n_head = len(blocks), config.n_head
        self.head_dim = config.n_embd // config.n_head
        self._model = _Model(
            len(blocks),
            config.n_embd,
            config.n_head,
            config.vocab_size,
            eps.pop(),
            wte.data_ptr(),
            int(wte_column_major),
            wpe.data_ptr(),
            self._blocks,
            self._vector(transformer.ln_f.weight, "transformer.ln_f.weight"),
            self._vector(transformer.ln_f.bias, "transformer.ln_f.bias"),
            self._linear(model.lm_head, "lm_head"),
        )
        self._workspace = torch.empty(0)
        self._lock = threading.Lock()  # one workspace: one step at a time
        self.signature = weights_signature(model)

    def matches(self, model: GPT) -> bool:
        """Whether `model`'s weights are still the ones this step reads, where and as they were
        laid out (a later quantization, reload or layout change would leave it reading others)."""
        return weights_signature(model) == self.signature

    def _vector(self, tensor: torch.Tensor | None, name: str) -> int:
        if tensor is None:
            raise NativeUnavailable(f"{name} is missing")
        vector = _float_weight(tensor, name).contiguous()
        self._keep.append(vector)
        return vector.data_ptr()

    def _linear(self, module: nn.Module, name: str) -> _Linear:
        if isinstance(module, RoutedInt8Linear):
            module = module.layer  # the same int8 weights, packed for two engines
        if isinstance(module, DynamicInt8Linear):
            return self._int8_linear(module, name)
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor):
            raise NativeUnavailable(f"{name} is not a plain or int8 linear layer")
        weight = _float_weight(weight, f"{name}.weight")
        column_major = is_column_major(weight)
        if not (weight.is_contiguous() or column_major):
            raise NativeUnavailable(f"{name}.weight is neither row- nor column-major")
        self._keep.append(weight)
        bias = 0 if module.bias is None else self._vector(module.bias, f"{name}.bias")
        return _Linear(
            weight.data_ptr(), bias, module.in_features, module.out_features, int(column_major)
        )

    def _int8_linear(self, module: DynamicInt8Linear, name: str) -> _Linear:
        """An int8 layer's own integers and per-output scales (model.quantize), in a copy of
        its own: row-major with each row's sum for the int8 dot products (each thread streams
        its band of outputs), else column-major, so that each thread streams its band of input
        features."""
        weight, bias = module._packed_params._weight_bias()
        if weight.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
            raise NativeUnavailable(f"{name} is not quantized per output channel")
        if weight.q_per_channel_axis() != 0 or bool(weight.q_per_channel_zero_points().any()):
            raise NativeUnavailable(f"{name}'s int8 weights are not symmetric per output")
        scales = weight.q_per_channel_scales().to(torch.float32).contiguous()
        bias_at = 0 if bias is None else self._vector(bias, f"{name}.bias")
        out_features, in_features = weight.shape
        if self.int8_dot:
            integers = weight.int_repr().contiguous()  # (out, in) int8
            sums = integers.sum(dim=1, dtype=torch.int32).contiguous()
            self._keep += [integers, scales, sums]
            return _Linear(
                0, bias_at, in_features, out_features, 0, integers.data_ptr(),
                scales.data_ptr(), sums.data_ptr(), 1,
            )  # fmt: skip
        integers = weight.int_repr().t().contiguous()  # (in, out) int8
        self._keep += [integers, scales]
        return _Linear(
            0, bias_at, in_features, out_features, 1, integers.data_ptr(), scales.data_ptr()
        )

    def supports(self, cache: KVCache) -> bool:
        """Whether the step can read and write this cache: float32 or bfloat16, contiguous, and
        shaped for this model (the C code trusts the layout)."""
        return (
            cache_layout_ok(cache)
            and cache.k.shape[0] == self.n_layer
            and (cache.k.shape[2:] == (self.n_head, cache.max_seq_len, self.head_dim))
        )

    def __call__(
        self,
        cache: KVCache,
        token_ids: Sequence[int],
        slots: Sequence[int],
        positions: Sequence[int],
    ) -> torch.Tensor:
        """Logits (R, vocab) after feeding token_ids[r] at positions[r] of slot slots[r]; as
        model.decode.DecodeStep, and rows of one slot at consecutive positions attend causally
        over each other (a speculative check of several guesses)."""
        rows = len(token_ids)
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"the native decode step takes 1 to {self.max_rows} rows, got {rows}")
        if not (len(slots) == len(positions) == rows):
            raise ValueError("token_ids, slots and positions must have the same length")
        if not self.supports(cache):
            raise ValueError(
                "the native decode step needs a contiguous float32 or bfloat16 CPU KV cache"
            )
        if not all(0 <= token < self.vocab_size for token in token_ids):
            raise ValueError(f"a token id out of range: {list(token_ids)}")
        _check_rows(cache, slots, positions)
        num_slots, max_len = cache.num_slots, cache.max_seq_len
        int_array = ctypes.c_int * rows
        threads = max(1, torch.get_num_threads())
        logits = torch.empty(rows, self.vocab_size)
        with self._lock:
            needed = self.lib.gptserve_workspace_floats(self._model, rows, max_len, threads)
            if self._workspace.numel() < needed:
                self._workspace = torch.empty(needed)
            status = self.lib.gptserve_decode(
                self._model,
                cache.k.data_ptr(),
                cache.v.data_ptr(),
                int(cache.k.dtype == torch.bfloat16),
                num_slots,
                max_len,
                rows,
                int_array(*token_ids),
                int_array(*slots),
                int_array(*positions),
                threads,
                self._workspace.data_ptr(),
                logits.data_ptr(),
            )
        if status != 0:
            raise RuntimeError(f"the native decode step failed ({status})")
        return logits


def compiled_gelu() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """GPT-2's GELU in place on a float32 CPU tensor, compiled (the step's own, ~5x faster than
    torch's at 32 x 3072), or None where the library cannot be built; within ~1e-6 of torch's
    tanh GELU."""
    try:
        lib = load_library()
    except NativeUnavailable:
        return None

    def gelu(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            return torch.nn.functional.gelu(x, approximate="tanh")
        lib.gptserve_gelu(x.data_ptr(), x.numel(), max(1, torch.get_num_threads()))
        return x

    return gelu


SharedRows = tuple[Sequence[int], int, int]  # rows of a step, the slot to read from, tokens


def native_argmax(x: torch.Tensor) -> torch.Tensor | None:
    """`x.argmax(dim=-1)` of a [R, V] float32 CPU tensor (ties: the lowest index; NaN: the first
    NaN's), compiled; None where the library is off or cannot be built. Right after a decode
    step, whose weight stream has pushed torch's code and data out of the caches, it takes
    ~0.12 ms against ~0.33 for torch's ops (one row of 50,257)."""
    lib = _load_once()
    if isinstance(lib, NativeUnavailable):
        return None
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or not x.shape[1]:
        raise ValueError(f"a [rows, vocab] float32 CPU tensor, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.gptserve_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


class KVStore:
    """One decode step's key and value writes, and optionally its attention, compiled: for
    steps whose layers run on torch's kernels.

    Writes: an indexed assignment per layer and tensor costs ~80 us of indexing work (~2 ms of
    a 32-row int8 step) to move a few kilobytes; here the same bytes land in the cache.

    Attention (`attend`): each row reads only its own slot's keys up to its position, where a
    batched scaled_dot_product_attention reads every row's keys up to the longest row's
    position under a mask. Scores and sums are float32 over the cache's values (a bfloat16
    cache's widened exactly), within float rounding of torch's float32 attention; torch's over a
    bfloat16 cache rounds the queries to bfloat16 too. On the Xeon this project is measured on,
    it takes about half of torch's time over a bfloat16 cache and two thirds over float32; the
    start-up measures it (model.kernel_choice.choose_native_decode)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        cache: KVCache,
        slots: Sequence[int],
        positions: Sequence[int],
        shared: Sequence[SharedRows] = (),
    ) -> None:
        rows = len(slots)
        if not rows or len(positions) != rows:
            raise ValueError("slots and positions must be non-empty and of the same length")
        _check_rows(cache, slots, positions)
        self.lib, self.cache, self.rows = lib, cache, rows
        self.n_layer, _, self.n_head, _, self.head_dim = cache.k.shape
        self._slots = (ctypes.c_int * rows)(*slots)
        self._positions = (ctypes.c_int * rows)(*positions)
        self._groups = [self._group(group, slots, positions) for group in shared]
        grouped = {row for group in shared for row in group[0]}
        rest = [row for row in range(rows) if row not in grouped]
        self._rest = (ctypes.c_int * len(rest))(*rest) if grouped else None
        self._workspace: torch.Tensor | None = None  # the attention's scores

    @staticmethod
    def _group(
        group: SharedRows, slots: Sequence[int], positions: Sequence[int]
    ) -> tuple[ctypes.Array[ctypes.c_int], int, int]:
        rows, slot, length = group
        if len(rows) < 2 or len(set(rows)) != len(rows) or min(rows) < 0:
            raise ValueError(f"a shared-prefix group needs two or more distinct rows, got {rows}")
        if max(rows) >= len(slots) or slot not in [slots[r] for r in rows]:
            raise ValueError(f"group rows {rows} and slot {slot} are not rows of this step")
        if not 0 <= length <= min(positions[r] for r in rows):
            raise ValueError(f"a shared prefix of {length} is past a row's position")
        return (ctypes.c_int * len(rows))(*rows), slot, length

    @classmethod
    def for_step(
        cls,
        cache: KVCache,
        slots: Sequence[int],
        positions: Sequence[int],
        shared: Sequence[SharedRows] = (),
    ) -> KVStore | None:
        """The compiled writes for one step over `cache`, or None where they cannot run.
        `shared`: groups of rows whose first keys and values are the same (rows, the slot to
        read them from, how many), for `attend`."""
        if not cache_layout_ok(cache):
            return None
        try:
            lib = load_library()
        except NativeUnavailable:
            return None
        return cls(lib, cache, slots, positions, shared)

    def attends_shared(self) -> bool:
        """Whether `attend` takes shared-prefix groups for this cache's head size."""
        return self.head_dim % 32 == 0 and self.head_dim <= 128

    def _check(self, qkv: torch.Tensor, layer: int) -> None:
        width = 3 * self.n_head * self.head_dim
        if qkv.shape != (self.rows, width) or qkv.dtype != torch.float32:
            raise ValueError(f"qkv must be ({self.rows}, {width}) float32, got {qkv.shape}")
        if not 0 <= layer < self.n_layer:
            raise ValueError(f"layer {layer} outside the cache's {self.n_layer}")

    def _cache_args(self, layer: int) -> tuple[int, ...]:
        """The cache and layer arguments every library call here starts with, after qkv."""
        cache = self.cache
        return (
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            int(cache.k.dtype == torch.bfloat16),
            layer,
            cache.num_slots,
            cache.max_seq_len,
            self.n_head,
            self.head_dim,
        )

    def __call__(self, qkv: torch.Tensor, layer: int) -> None:
        """Store the keys and values of `qkv` (rows, 3C), float32, in layer `layer`."""
        self._check(qkv, layer)
        qkv = qkv.contiguous()
        self.lib.gptserve_store_kv(
            qkv.data_ptr(), *self._cache_args(layer), self.rows, self._slots, self._positions
        )

    def attend(self, qkv: torch.Tensor, layer: int) -> torch.Tensor:
        """Each row's attention in layer `layer` over its own slot up to its position (keys and
        values stored), from the queries in `qkv` (rows, 3C): (rows, C) float32. The rows of a
        shared-prefix group read their prefix once, from the group's slot, together."""
        self._check(qkv, layer)
        if self._groups and not self.attends_shared():
            raise ValueError(f"no compiled shared-prefix attention for heads of {self.head_dim}")
        qkv = qkv.contiguous()
        out = torch.empty(self.rows, self.n_head * self.head_dim, dtype=torch.float32)
        threads = max(1, torch.get_num_threads())
        if self._workspace is None:  # sized once, kept for every layer of the step
            shared = int(bool(self._groups))
            floats = self.lib.gptserve_attend_floats(self.cache.max_seq_len, shared)
            self._workspace = torch.empty(threads * floats, dtype=torch.float32)
        workspace = self._workspace.data_ptr()
        where = self._cache_args(layer)
        rest = self._rest
        if rest is None or len(rest):
            count = self.rows if rest is None else len(rest)
            self.lib.gptserve_attend(
                qkv.data_ptr(), *where, self.rows, self._slots, self._positions, rest, count,
                out.data_ptr(), workspace, threads,
            )  # fmt: skip
        for rows, slot, length in self._groups:
            done = self.lib.gptserve_attend_shared(
                qkv.data_ptr(), *where, self._slots, self._positions, len(rows), rows, slot,
                length, out.data_ptr(), workspace, threads,
            )  # fmt: skip
            if done != 0:  # attends_shared() said yes: the library disagrees
                raise RuntimeError(f"the compiled shared-prefix attention refused {self.head_dim}")
        return out


@dataclass(frozen=True)
class NativeRoute:
    """Decode steps of up to `max_rows` rows (0: none) run on the compiled step; larger ones on
    torch, with the compiled attention (KVStore.attend) where `attention`."""

    step: NativeDecode
    max_rows: int
    timings: dict[int, tuple[float, float]] = field(default_factory=dict)  # rows: (torch, native)
    attention: bool = False
    attention_timings: tuple[float, float] | None = None  # ms: (torch, compiled)

    def describe(self) -> str:
        """One phrase for the start-up line."""
        steps = (
            f"compiled {library_origin()} up to {self.max_rows} "
            f"{'row' if self.max_rows == 1 else 'rows'}, torch beyond"
            if self.max_rows
            else "torch"
        )
        return f"{steps}, batched attention compiled" if self.attention else steps


_ROUTE = "native_decode_route"


def attach_route(model: GPT, route: NativeRoute | None) -> None:
    """Make `route` the decode route of `model` (None removes it); model.decode.DecodeStep
    built from the model afterwards takes it."""
    object.__setattr__(model, _ROUTE, route)


def route_of(model: GPT) -> NativeRoute | None:
    """The model's native decode route, if one is attached and still matches its weights."""
    route = getattr(model, _ROUTE, None)
    if route is None:
        return None
    if not route.step.matches(model):
        logger.warning("the weights changed since the compiled decode step was built; not used")
        return None
    return route
