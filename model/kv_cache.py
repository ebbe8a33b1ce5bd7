"""A key/value cache preallocated once for a fixed number of request slots.

Each request owns one slot for its lifetime; a forward call can mix rows of different slots,
each at its own position. `BatchLayout` turns a batch's plain-Python description (slot, start
position and number of new tokens per row) into the index tensors every layer reuses.

The cache may hold keys and values in a 16-bit dtype under a float32 model (`kv_cache_dtype`):
half the memory, and half the bytes that batched decode steps read for attention, which on a
CPU is most of a long-context step's non-matmul time. The model then rounds each key and value
as it stores them and attends in the cache's dtype, so its logits are no longer bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model import huge_pages
from model.config import GPTConfig
from model.dtypes import DTYPES, dtype_name

KV_CACHE_DTYPES = ("auto", *DTYPES)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a model's KV cache by name: "auto" is the model's own dtype; another one is
    for float32 models (a 16-bit model's cache is in its own dtype)."""
    if name == "auto":
        return model_dtype
    if name not in DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; choose one of {KV_CACHE_DTYPES}")
    dtype = DTYPES[name]
    if model_dtype != torch.float32 and dtype != model_dtype:
        raise ValueError(
            f"a {dtype_name(model_dtype)} model keeps its KV cache in its own "
            f"dtype (kv_cache_dtype auto); a {name} cache is for float32 models"
        )
    return dtype


class KVCache:
    """Keys and values of every layer for `num_slots` sequences of up to `max_seq_len` tokens."""

    def __init__(
        self,
        config: GPTConfig,
        num_slots: int,
        max_seq_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_seq_len = config.block_size if max_seq_len is None else max_seq_len
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= max_seq_len <= config.block_size:
            raise ValueError(
                f"max_seq_len must be in [1, {config.block_size}] (the model's positions), "
                f"got {max_seq_len}"
            )
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        shape = (config.n_layer, num_slots, config.n_head, max_seq_len, config.head_dim)
        # Zeros, not empty: rows shorter than the longest in a batch read (masked) stale
        # positions, and a NaN there would leak through the zero attention weight. On huge
        # pages where the system has them (see model.huge_pages).
        self.k = huge_pages.zeros(shape, dtype, device)  # (L, S, nh, M, hs)
        self.v = huge_pages.zeros(shape, dtype, device)  # (L, S, nh, M, hs)

    def copy_prefix(self, source: int, target: int, num_tokens: int) -> None:
        """Copy the keys and values of positions [0, num_tokens) of one slot to another."""
        if source == target or num_tokens <= 0:
            return
        self.k[:, target, :, :num_tokens].copy_(self.k[:, source, :, :num_tokens])
        self.v[:, target, :, :num_tokens].copy_(self.v[:, source, :, :num_tokens])

    @property
    def num_bytes(self) -> int:
        """Memory held by the cache."""
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class BatchLayout:
    """Where each row of a cached forward call reads and writes the cache.

    Row b holds `num_new[b]` new tokens (left-aligned, the rest is padding) at positions
    `start_pos[b] ...`, and attends to positions `0 .. start_pos[b] + num_new[b] - 1` of
    its slot. Keys are read only up to the longest context in the batch, not the whole cache.
    """

    positions: torch.Tensor  # (B, T) position of every token, padding clamped in range
    write_rows: torch.Tensor  # (N,) batch row of each real (non-padding) token
    write_cols: torch.Tensor  # (N,) column in the input of each real token
    write_slots: torch.Tensor  # (N,) cache slot each real token's key/value goes to
    write_pos: torch.Tensor  # (N,) cache position each real token's key/value goes to
    read_slots: torch.Tensor | slice  # rows' slots; a slice when they are consecutive (a view)
    context_len: int  # longest context in the batch: keys read per row
    attn_mask: torch.Tensor  # (B, 1, T, context_len) True where a query may attend a key
    last_index: torch.Tensor  # (B,) column of each row's last real token
    row_slots: list[int] | None = None  # the same as plain lists, for per-query attention
    row_positions: list[list[int]] | None = None  # positions of each row's real tokens

    @classmethod
    def build(
        cls,
        slots: Sequence[int],
        start_pos: Sequence[int],
        num_new: Sequence[int],
        max_seq_len: int,
        device: torch.device | str = "cpu",
    ) -> BatchLayout:
        """Validate a batch description and build its index tensors once for all layers."""
        if not (len(slots) == len(start_pos) == len(num_new)) or not slots:
            raise ValueError("slots, start_pos and num_new must be non-empty and of equal length")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot may appear only once per batch, got {list(slots)}")
        for row_start, row_count in zip(start_pos, num_new, strict=True):
            if row_count < 1 or row_start < 0 or row_start + row_count > max_seq_len:
                raise ValueError(
                    f"row with start {row_start} and {row_count} new tokens does not fit "
                    f"a cache of {max_seq_len} positions"
                )
        width = max(num_new)
        context_len = max(s + n for s, n in zip(start_pos, num_new, strict=True))
        start = torch.tensor(start_pos, dtype=torch.long, device=device)
        count = torch.tensor(num_new, dtype=torch.long, device=device)
        cols = torch.arange(width, device=device)
        positions = start[:, None] + cols[None, :]  # (B, T)
        is_real = cols[None, :] < count[:, None]  # (B, T)
        rows, write_cols = is_real.nonzero(as_tuple=True)
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=device)
        keys = torch.arange(context_len, device=device)
        attn_mask = keys[None, None, :] <= positions[:, :, None]  # (B, T, context_len)
        first = slots[0]
        consecutive = list(slots) == list(range(first, first + len(slots)))
        return cls(
            positions=positions.clamp(max=max_seq_len - 1),
            write_rows=rows,
            write_cols=write_cols,
            write_slots=slot_tensor[rows],
            write_pos=positions[rows, write_cols],
            read_slots=slice(first, first + len(slots)) if consecutive else slot_tensor,
            context_len=context_len,
            attn_mask=attn_mask.unsqueeze(1),
            last_index=count - 1,
            row_slots=list(slots),
            row_positions=[
                list(range(row_start, row_start + row_count))
                for row_start, row_count in zip(start_pos, num_new, strict=True)
            ],
        )
