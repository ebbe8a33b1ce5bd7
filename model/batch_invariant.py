"""Batch-invariant computation on the CPU: a token's logits do not depend on its batch mates.

Plain kernels give a row of a batch results that depend, in the last bits, on how many other
rows share the call: MKL switches kernels with the row count, oneDNN splits long reductions
across threads for few rows, and attention over a batch reads keys up to the longest context
and splits its reductions by that length. Here every reduction a row's result depends on has
the same length and the same order whatever the batch:

- Linear layers run every row count through one kernel that computes each row the same way for
  any number of rows. With float32 matmul precision "high" on a CPU with AMX, that is the bf16x3
  kernel (model.bf16x3_linear: each output summed over its inputs in one fixed order), checked
  for row invariance and against float32's logits at start-up. Otherwise (or "highest") it is
  oneDNN's packed kernel, with the input dimension split into chunks short enough that oneDNN
  never splits them across threads; the partial products are added in a fixed order. The chunk
  of each weight shape is chosen by probing the kernel on this machine.
- Attention is computed one query at a time over its own slot's keys. Where the compiled
  library loads (model.native_decode), its attention kernel computes each (query, head) on one
  thread over exactly the keys up to the query's position, in one order, for a prompt's
  queries as for a decode step's. Otherwise torch's: a batch of 1 x head_dim products (invariant
  to how many are batched) over exactly `bucket(position)` keys (a multiple of 16), masked past
  the query's position, with the values' reduction in fixed chunks of 256 keys.

So a request's logits are bitwise identical alone or beside any others, whatever chunk its
prompt was split into, and whether its prefix was computed or reused from a cache slot.
`check_batch_invariance` proves it on the loaded model at start-up. Costs: 1-3 row steps take
the one kernel, which is slower there than MKL's (and the compiled decode step, which is not
used); prompts compute attention per query.
Float32 on CPU only.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from model.gpt2 import GPT

logger = logging.getLogger(__name__)

ATTENTION_BUCKET = 16  # keys are read in multiples of this (16 measured faster than 32 or 64)
VALUE_CHUNK = 256  # the probabilities x values reduction runs in chunks of this many keys
QUERY_BLOCK = 32  # queries gathered at once (bounds the memory of the gathered keys)
PROBE_ROW_COUNTS = (1, 2, 3, 4, 5, 8, 16, 17, 32, 33)
K_CHUNK_CANDIDATES = (None, 1024, 768, 512, 384, 256, 128, 64)  # None: the whole dimension


class BatchInvarianceError(RuntimeError):
    """This machine's kernels cannot give batch-invariant results for the model."""


def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)


class InvariantLinear(nn.Linear):
    """An nn.Linear (same parameters and names) whose every row is computed the same way for
    any number of rows: oneDNN's packed kernel over fixed chunks of the input dimension."""

    chunk_bounds: list[tuple[int, int]]
    packed_chunks: list[torch.Tensor]

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunk: int | None) -> InvariantLinear:
        """Wrap `linear`'s own parameters (shared) with the input split into `chunk`s."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        size = chunk or linear.in_features
        layer.chunk_bounds = [
            (start, min(start + size, linear.in_features))
            for start in range(0, linear.in_features, size)
        ]
        layer.repack()
        return layer

    def repack(self) -> None:
        """Pack the weight's chunks as they are now."""
        self.packed_chunks = [_pack(self.weight[:, a:b]) for a, b in self.chunk_bounds]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        if torch.is_grad_enabled():  # training: the plain layer (oneDNN's op has no backward)
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        if len(self.chunk_bounds) == 1:
            out = _packed_linear(flat, self.packed_chunks[0], self.bias)
        else:
            out = torch.zeros(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for (start, end), packed in zip(self.chunk_bounds, self.packed_chunks, strict=True):
                out += _packed_linear(flat[:, start:end].contiguous(), packed, None)
            if self.bias is not None:
                out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def _is_row_invariant(layer: nn.Linear, generator: torch.Generator) -> bool:
    """Whether a row's output is the same bits at every row count and position probed."""
    rows = torch.randn(max(PROBE_ROW_COUNTS), layer.in_features, generator=generator)
    with torch.inference_mode():
        alone = layer(rows[:1])[0]
        for count in PROBE_ROW_COUNTS[1:]:
            batch = rows[:count].clone()
            batch[count - 1] = rows[0]  # the probed row at the end as well as at the start
            out = layer(batch)
            if not (torch.equal(out[0], alone) and torch.equal(out[count - 1], alone)):
                return False
    return True


def invariant_chunk(linear: nn.Linear) -> int | None:
    """The largest input chunk for which this machine computes `linear` row-invariantly."""
    generator = torch.Generator().manual_seed(0)
    for chunk in K_CHUNK_CANDIDATES:
        if chunk is not None and chunk >= linear.in_features:
            continue
        candidate = InvariantLinear.from_linear(linear, chunk)
        if _is_row_invariant(candidate, generator):
            return chunk
    raise BatchInvarianceError(
        f"no input chunk makes a {linear.in_features} -> {linear.out_features} linear layer "
        "batch-invariant with this machine's oneDNN kernels"
    )


def make_batch_invariant(model: nn.Module, matmul_precision: str = "highest") -> None:
    """Switch `model` to batch-invariant linears and attention, in place (float32, CPU). With
    `matmul_precision` "high", where the CPU has AMX, the linears run as bf16x3 for every row
    count (model.bf16x3_linear: each output's sum has one order whatever the rows), if they
    prove row-invariant and the logits pass their check; else oneDNN's packed kernel in chunks."""
    if matmul_precision == "high" and _use_bf16x3(model):
        _invariant_attention(model)
        logger.info("batch-invariant mode: linear layers as bf16x3 on AMX for every row count")
        return
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        raise BatchInvarianceError("batch-invariant mode needs a torch build with oneDNN")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and not isinstance(child, InvariantLinear)
    ]
    for _, name, linear in targets:
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
            raise BatchInvarianceError(
                f"batch-invariant mode is for CPU float32 models, got {name}.weight on "
                f"{linear.weight.device} as {linear.weight.dtype}"
            )
    chunks: dict[tuple[int, int, bool], int | None] = {}  # by shape: invariance is the kernel's
    for parent, name, linear in targets:
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        if shape not in chunks:
            chunks[shape] = invariant_chunk(linear)
        setattr(parent, name, InvariantLinear.from_linear(linear, chunks[shape]))
    _invariant_attention(model)
    described = ", ".join(
        f"{k}->{n}: {'whole' if c is None else f'chunks of {c}'}" for (k, n, _), c in chunks.items()
    )
    logger.info("batch-invariant mode: %d linear layers (%s)", len(targets), described)


def _invariant_attention(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "batch_invariant"):
            setattr(module, "batch_invariant", True)  # noqa: B010 - attention modules only


def _use_bf16x3(model: nn.Module) -> bool:
    """Put bf16x3 linears for every row count into `model` where they can run, prove
    row-invariant on each layer shape and keep the logits of a probe within their check of
    float32 kernels'; returns whether they were put in (else the model is as it was)."""
    from model.bf16x3_linear import Swap, check_logits
    from model.native_decode import NativeUnavailable

    try:
        swap = Swap(model, min_rows=1)
    except NativeUnavailable as exc:
        logger.info("batch-invariant mode: no bf16x3 linears (%s)", exc)
        return False
    generator = torch.Generator().manual_seed(0)
    probed: set[tuple[int, int]] = set()
    for layer in swap.layers:
        shape = (layer.in_features, layer.out_features)
        if shape not in probed and not _is_row_invariant(layer, generator):
            logger.warning("batch-invariant mode: bf16x3 linears are not row-invariant here")
            return False
        probed.add(shape)
    swap.put_in()
    passed, difference = check_logits(model, 1)
    if not passed:
        swap.take_out()
        logger.warning("batch-invariant mode: bf16x3 logits %.1e off float32's", difference)
    return passed


def bucket_length(num_keys: int, max_len: int) -> int:
    """Keys a query attending to `num_keys` keys reads: the next multiple of the bucket."""
    return min(ATTENTION_BUCKET * math.ceil(num_keys / ATTENTION_BUCKET), max_len)


class InvariantAttention:
    """Causal attention of each query over its own slot's keys, the same bits in any batch,
    laid out once per forward call and applied to every layer's cache.

    slots[b] is row b's slot; positions[b] the positions of row b's real queries (padding
    queries, past the list's end, get zeros).

    Where the compiled library loads (model.native_decode) and the cache is float32 on the CPU,
    each query runs through its attention kernel, which computes every (query, head) on one
    thread over exactly the keys up to its position, in one order: no bucketing needed, and
    about a third of the time of the torch path below in a 32-row step. Otherwise queries whose
    key buckets are equal are gathered into blocks of at most QUERY_BLOCK, and each block's
    products run as one batched torch call. Which of the two runs is fixed per process (the
    library loads or not), so every step of a server takes the same one.
    """

    def __init__(
        self, slots: list[int], positions: list[list[int]], max_len: int, device: torch.device
    ) -> None:
        if len(positions) != len(slots) or min(slots, default=0) < 0:
            raise ValueError("one list of positions per row, and slots from 0")
        if any(not 0 <= p < max_len for row in positions for p in row):
            raise ValueError(f"query positions must lie in [0, {max_len})")
        self.slots, self.positions, self.max_len = slots, positions, max_len
        self.library = _attention_library() if device.type == "cpu" else None
        self._compiled_layout: tuple[tuple[int, int], _CompiledQueries] | None = None
        self.blocks: list[_QueryBlock] = []
        if self.library is not None:
            return
        groups: dict[int, list[tuple[int, int, int]]] = {}  # key length -> (row, column, pos)
        for row in range(len(slots)):
            for column, position in enumerate(positions[row]):
                length = bucket_length(position + 1, max_len)
                groups.setdefault(length, []).append((row, column, position))
        for length, items in groups.items():
            for start in range(0, len(items), QUERY_BLOCK):
                block = items[start : start + QUERY_BLOCK]
                block_slots = [slots[item[0]] for item in block]
                # Consecutive slots are read in place (a view); others are gathered. Each key
                # block goes through the same (1 x hs) @ (hs x length) product either way.
                read: slice | torch.Tensor = slice(block_slots[0], block_slots[0] + len(block))
                if block_slots != list(range(block_slots[0], block_slots[0] + len(block))):
                    read = torch.tensor(block_slots, device=device)
                query_positions = torch.tensor([item[2] for item in block], device=device)
                future = torch.arange(length, device=device)[None, :] > query_positions[:, None]
                self.blocks.append(
                    _QueryBlock(
                        rows=torch.tensor([item[0] for item in block], device=device),
                        columns=torch.tensor([item[1] for item in block], device=device),
                        read=read,
                        length=length,
                        future=future[:, None, :],  # (count, 1, length)
                    )
                )

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """q (B, nh, T, hs); k_cache / v_cache (S, nh, M, hs) already hold this step's keys
        and values. Returns (B, nh, T, hs)."""
        if self.library is not None and _compiled_cache_ok(k_cache, v_cache, self.max_len):
            return self._compiled(q, k_cache, v_cache)
        if self.library is not None:
            raise BatchInvarianceError(
                "the compiled attention was chosen but this cache is not a contiguous float32 "
                "one: a query would take another kernel"
            )
        _, num_heads, _, head_dim = q.shape
        scaled = q * (1.0 / math.sqrt(head_dim))
        y = torch.zeros_like(q)
        for block in self.blocks:
            count, length = len(block.rows), block.length
            queries = scaled[block.rows, :, block.columns].reshape(count * num_heads, 1, head_dim)
            keys = k_cache[block.read, :, :length].reshape(count * num_heads, length, head_dim)
            values = v_cache[block.read, :, :length].reshape(count * num_heads, length, head_dim)
            scores = torch.bmm(queries, keys.transpose(1, 2)).view(count, num_heads, length)
            scores.masked_fill_(block.future, float("-inf"))
            probs = scores.softmax(dim=-1).view(count * num_heads, 1, length)
            out = torch.zeros(count * num_heads, 1, head_dim, dtype=q.dtype, device=q.device)
            for key_start in range(0, length, VALUE_CHUNK):
                key_end = key_start + VALUE_CHUNK
                out += torch.bmm(probs[:, :, key_start:key_end], values[:, key_start:key_end])
            y[block.rows, :, block.columns] = out.view(count, num_heads, head_dim)
        return y

    def _queries(self, width: int, num_slots: int) -> _CompiledQueries:
        """The compiled kernel's view of this call's queries for calls `width` columns wide over
        a cache of `num_slots` slots: row b * width + t of the (B * width, 3C) projections is row
        b's query t. Built (and checked) once per forward call, used by every layer."""
        if self._compiled_layout is None or self._compiled_layout[0] != (width, num_slots):
            if max(self.slots, default=0) >= num_slots:
                raise ValueError(f"slots {self.slots} outside the cache's {num_slots}")
            if any(len(row) > width for row in self.positions):
                raise ValueError(f"more query positions in a row than its {width} columns")
            total = len(self.slots) * width
            slots, positions, real = [0] * total, [0] * total, []
            for row, row_positions in enumerate(self.positions):
                for column, position in enumerate(row_positions):
                    index = row * width + column
                    slots[index], positions[index] = self.slots[row], position
                    real.append(index)
            layout = _CompiledQueries(
                total=total,
                slots=(ctypes.c_int * total)(*slots),
                positions=(ctypes.c_int * total)(*positions),
                real=(ctypes.c_int * len(real))(*real),
                count=len(real),
                padded=len(real) < total,
            )
            self._compiled_layout = ((width, num_slots), layout)
        return self._compiled_layout[1]

    def _compiled(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        batch, num_heads, width, head_dim = q.shape
        channels = num_heads * head_dim
        if batch != len(self.slots):
            raise ValueError(f"{batch} rows of queries for {len(self.slots)} slots")
        num_slots = k_cache.shape[0]
        layout = self._queries(width, num_slots)
        # The queries are the first third of the attention's input projections (B, T, 3C);
        # read in place where q is that view of them (a decode step's too: T = 1, whatever
        # that dimension's stride), else copied into that shape.
        expected = (width * 3 * channels, head_dim, 3 * channels, 1)
        in_place = all(
            size == 1 or stride == want
            for size, stride, want in zip(q.shape, q.stride(), expected, strict=True)
        )
        if in_place and q.dtype == torch.float32:
            base = q.data_ptr()
        else:
            projections = torch.zeros(batch, width, 3 * channels, dtype=torch.float32)
            projections[:, :, :channels] = q.transpose(1, 2).reshape(batch, width, channels)
            base = projections.data_ptr()
        make = torch.zeros if layout.padded else torch.empty  # padding queries: zeros
        out = make(batch * width, channels, dtype=torch.float32)
        lib = self.library
        assert lib is not None
        threads = max(1, torch.get_num_threads())
        workspace = _attention_workspace(lib, self.max_len, threads)
        lib.gptserve_attend(
            base, k_cache.data_ptr(), v_cache.data_ptr(), 0, 0, num_slots, self.max_len,
            num_heads, head_dim, layout.total, layout.slots, layout.positions, layout.real,
            layout.count, out.data_ptr(), workspace.data_ptr(), threads,
        )  # fmt: skip
        return out.view(batch, width, num_heads, head_dim).transpose(1, 2).to(q.dtype)


@dataclass(frozen=True)
class _CompiledQueries:
    """Which (slot, position) each row of a call's projections attends as, and which rows are
    real queries."""

    total: int
    slots: ctypes.Array[ctypes.c_int]
    positions: ctypes.Array[ctypes.c_int]
    real: ctypes.Array[ctypes.c_int]
    count: int
    padded: bool


def _attention_library() -> ctypes.CDLL | None:
    """The compiled library, for its attention kernel, or None where it does not load."""
    from model.native_decode import NativeUnavailable, load_library

    try:
        return load_library()
    except NativeUnavailable:
        return None


def _compiled_cache_ok(k_cache: torch.Tensor, v_cache: torch.Tensor, max_len: int) -> bool:
    """One layer's float32 CPU cache (S, nh, M, hs), contiguous, as the kernel reads it."""
    return (
        k_cache.dtype == torch.float32
        and v_cache.dtype == torch.float32
        and k_cache.device.type == "cpu"
        and k_cache.shape == v_cache.shape
        and k_cache.dim() == 4
        and k_cache.shape[2] == max_len
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


_workspaces = threading.local()


def _attention_workspace(lib: ctypes.CDLL, max_len: int, threads: int) -> torch.Tensor:
    """Scores for each thread of the kernel over `max_len` keys, kept per calling thread."""
    floats = threads * lib.gptserve_attend_floats(max_len, 0)
    buffer = getattr(_workspaces, "buffer", None)
    if buffer is None or buffer.numel() < floats:
        buffer = torch.empty(floats, dtype=torch.float32)
        _workspaces.buffer = buffer
    return buffer


@dataclass(frozen=True)
class _QueryBlock:
    """Queries attending over the same number of keys, computed in one batched product."""

    rows: torch.Tensor  # (count,) batch row of each query
    columns: torch.Tensor  # (count,) its column in the row
    read: slice | torch.Tensor  # the rows' slots: a view when consecutive
    length: int  # keys read per query (its bucket)
    future: torch.Tensor  # (count, 1, length) True past each query's position


@torch.inference_mode()
def check_batch_invariance(model: GPT, max_len: int, seed: int = 0) -> None:
    """Raise BatchInvarianceError unless a probe prompt's last logits are the same bits alone,
    in batches of other prompts, split into other chunks, and fed by a decode step (run once
    at start-up)."""
    from model.decode import DecodeStep
    from model.kv_cache import BatchLayout, KVCache

    config = model.config
    length = min(max_len, 6 * ATTENTION_BUCKET + 5)  # crosses key buckets
    generator = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size

    def prompt(size: int) -> list[int]:
        return torch.randint(0, vocab, (size,), generator=generator).tolist()

    target = prompt(length)
    others = [prompt(1 + (7 * i) % length) for i in range(8)]

    def last_logits(rows: list[list[int]], chunk: int) -> torch.Tensor:
        cache = KVCache(config, len(rows), max_len, model.device, model.dtype)
        done = [0] * len(rows)
        result = None
        while done[0] < len(rows[0]):
            live = [i for i, row in enumerate(rows) if done[i] < len(row)]
            counts = [min(chunk, len(rows[i]) - done[i]) for i in live]
            width = max(counts)
            tokens = [
                rows[i][done[i] : done[i] + n] + [0] * (width - n)
                for i, n in zip(live, counts, strict=True)
            ]
            starts = [done[i] for i in live]
            layout = BatchLayout.build(live, starts, counts, max_len, model.device)
            idx = torch.tensor(tokens, device=model.device)
            logits = model.forward_cached(idx, cache, layout)
            for position, i in enumerate(live):
                done[i] += counts[position]
            if done[0] >= len(rows[0]):
                result = logits[0]
        assert result is not None
        return result

    def decoded_last(rows: list[list[int]]) -> torch.Tensor:
        """The first row's last logits from a decode step, after its prompt but one."""
        cache = KVCache(config, len(rows), max_len, model.device, model.dtype)
        for slot, row in enumerate(rows):
            if len(row) == 1:  # nothing before its one token
                continue
            layout = BatchLayout.build([slot], [0], [len(row) - 1], max_len, model.device)
            model.forward_cached(torch.tensor([row[:-1]], device=model.device), cache, layout)
        step = DecodeStep(model)
        return step(
            cache, [r[-1] for r in rows], list(range(len(rows))), [len(r) - 1 for r in rows]
        )[0]

    reference = last_logits([target], length)
    for rows, chunk in (([target], 7), ([target, *others[:2]], length), ([target, *others], 13)):
        if not torch.equal(last_logits(rows, chunk), reference):
            raise BatchInvarianceError(
                "this machine's kernels gave different bits for the same prompt in another "
                f"batch ({len(rows)} rows, chunks of {chunk}): batch-invariant mode cannot be "
                "guaranteed here"
            )
    for rows in ([target], [target, *others]):
        if not torch.equal(decoded_last(rows), reference):
            raise BatchInvarianceError(
                "this machine's kernels gave a decode step other bits than the same token's "
                f"prompt ({len(rows)} rows): batch-invariant mode cannot be guaranteed here"
            )
