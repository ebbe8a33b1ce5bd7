"""The decode step, lean: one new token per row, straight through the model's layers.

`GPT.forward_cached` serves every shape (prompt chunks of any length, padding, per-row masks) and
pays for that generality on every call: a batch layout of index tensors, a mask, module calls
and views for each of 12+ layers. A decode step has one token per row, so here the same math runs
with what a single token needs: the rows' keys and values are written in place, a row alone
attends over exactly its own keys (no mask), and every layer's modules are called directly. At
one stream on a CPU, where a step reads the weights once and should take no longer than that,
this takes ~3 ms of overhead off a ~25 ms step (gpt2, float32). The layers themselves (packed,
int8, plain or batch-invariant linears) are the model's own, so every weight path goes through
here unchanged; a batch-invariant model's rows attend per query exactly as its prompts do
(`InvariantAttention`), so a token's logits are the same bits from a prompt or a decode step.

Where the start-up measured it faster (model.kernel_choice.choose_native_decode), steps of few
rows go to the same step compiled for the CPU (model.native_decode), one C function instead of a
call per op; this class stays the reference it is tested against, and takes every other step.
Its batched steps may likewise write their keys and values, and attend, through that library
(each row over only its own keys, where torch's batched attention reads every row's up to the
longest row's under a mask).

Rows that share a long prompt prefix (n choices of one prompt, a few-shot header, a system
prompt) can attend over that prefix together: its keys and values are read once, from one of
their slots, instead of once per row (`SharedPrefix`). At 32 rows behind a 400-token header, a
step otherwise reads ~1 GB of keys and values that are the same numbers 32 times over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch_invariant import InvariantAttention
from model.gpt2 import GPT
from model.kv_cache import KVCache
from model.native_decode import KVStore, NativeDecode, NativeRoute, compiled_gelu, route_of
from model.quantize import direct_forward


@dataclass(frozen=True)
class _Layer:
    """One block's parameters and linear layers, looked up once."""

    ln_1: tuple[torch.Tensor, torch.Tensor, float]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]
    ln_2: tuple[torch.Tensor, torch.Tensor, float]
    up: Callable[[torch.Tensor], torch.Tensor]  # the MLP's up-projection, GELU included
    down: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SharedPrefix:
    """Rows of a decode batch whose first `length` tokens are the same: their keys and values
    there are equal (up to float rounding), so the rows attend over them as read from `slot`."""

    rows: tuple[int, ...]  # indices into the batch, ascending, at least two
    slot: int  # the cache slot of one of those rows
    length: int  # at most every row's position: those keys and values are in the cache


class DecodeStep:
    """The lean decode step of one model; build it after the model's layers are final (packed,
    quantized), since it holds on to them."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        transformer = model.transformer

        def norm(module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
            return module.weight, module.bias, module.eps

        # Batch-invariant models attend per query, as their prompts do (the same bits), and
        # keep torch's GELU, as their prompts do.
        self.invariant = any(getattr(m, "batch_invariant", False) for m in model.modules())
        on_cpu = model.device.type == "cpu"
        self.layers = [
            _Layer(
                norm(block.ln_1),
                direct_forward(block.attn.c_attn),
                direct_forward(block.attn.c_proj),
                norm(block.ln_2),
                _up_projection(
                    block.mlp.c_fc,
                    compiled=on_cpu and model.dtype == torch.float32 and not self.invariant,
                ),
                direct_forward(block.mlp.c_proj),
            )
            for block in transformer.blocks
        ]
        self.wte, self.wpe = transformer.wte.weight, transformer.wpe.weight
        self.ln_f = norm(transformer.ln_f)
        self.head = direct_forward(model.lm_head)
        # Steps of few rows may run compiled for this CPU (model.native_decode), where the
        # start-up measured that faster; this class stays the reference.
        self.native: NativeRoute | None = None if self.invariant else route_of(model)
        # Batched steps write their keys and values through the compiled library where it loads
        # (the same bytes as torch's indexed assignment, less per-call work).
        self.compiled_writes = on_cpu and model.dtype == torch.float32
        # ... and attend through it, where the start-up chose that (measured faster, or forced)
        self.compiled_attention = self.native is not None and self.native.attention

    def _native_for(self, cache: KVCache, rows: int) -> NativeDecode | None:
        """The compiled step, where it takes a step of `rows` rows over `cache`."""
        native = self.native
        if native is not None and rows <= native.max_rows and native.step.supports(cache):
            return native.step
        return None

    def __call__(
        self,
        cache: KVCache,
        token_ids: list[int],
        slots: list[int],
        positions: list[int],
        shared: Sequence[SharedPrefix] = (),
    ) -> torch.Tensor:
        """Logits (B, vocab) after feeding token_ids[b] at positions[b] of cache slot slots[b].

        Each row's key and value are written to the cache before it attends, as in
        forward_cached. The rows of each `shared` group read their common prefix's keys and
        values once (see SharedPrefix); the logits agree with those without it to float rounding
        (with a 16-bit cache, to its rounding: grouped rows attend in the model's dtype over the
        widened keys, the others in the cache's dtype, or in float32 where the attention is
        compiled, see KVStore). A batch-invariant model ignores
        `shared`: its rows attend per query, each over its own slot, for the same bits as its
        prompts.
        """
        count = len(token_ids)
        compiled = self._native_for(cache, count)
        if compiled is not None:
            return compiled(cache, token_ids, slots, positions)  # shared: not needed
        device = self.wte.device
        config = self.model.config
        width, num_heads, head_dim = config.n_embd, config.n_head, config.head_dim
        kv_dtype = cache.k.dtype
        tokens = torch.tensor(token_ids, device=device)
        where = torch.tensor(positions, device=device)
        x = self.wte[tokens] + self.wpe[where]  # (B, C)
        plan: _SharedPlan | None = None
        per_query: InvariantAttention | None = None
        if self.invariant:
            max_len = cache.k.shape[3]
            per_query = InvariantAttention(slots, [[p] for p in positions], max_len, device)
        store: KVStore | None = None
        compiled_attention = False
        if count == 1:
            slot, position = slots[0], positions[0]
        else:
            slot_index = torch.tensor(slots, device=device)
            if self.compiled_writes:
                # the groups go to the library only where it attends (it checks them)
                groups = [(g.rows, g.slot, g.length) for g in shared if self.compiled_attention]
                store = KVStore.for_step(cache, slots, positions, groups)
                compiled_attention = (
                    store is not None
                    and self.compiled_attention
                    and (not groups or store.attends_shared())
                )
            if compiled_attention:
                pass  # the library attends, shared prefixes included
            elif shared and per_query is None:
                plan = _SharedPlan(slots, positions, shared, device)
            elif per_query is None:
                read, context, mask = key_window(slots, positions, 0, device)
        for index, layer in enumerate(self.layers):
            hidden = F.layer_norm(x, (width,), *layer.ln_1)
            qkv = layer.qkv(hidden).view(count, 3, num_heads, head_dim)
            query, key, value = qkv.unbind(1)  # each (B, nh, hs)
            k_cache, v_cache = cache.k[index], cache.v[index]  # (S, nh, M, hs)
            if count == 1:
                k_cache[slot, :, position] = key[0].to(kv_dtype)
                v_cache[slot, :, position] = value[0].to(kv_dtype)
            elif store is not None:
                store(qkv.view(count, -1), index)
            else:
                k_cache[slot_index, :, where] = key.to(kv_dtype)
                v_cache[slot_index, :, where] = value.to(kv_dtype)
            if per_query is not None:
                attended = per_query(query.unsqueeze(2), k_cache, v_cache)  # (B, nh, 1, hs)
            elif count == 1:  # a row alone attends over exactly its keys: no mask
                attended = F.scaled_dot_product_attention(
                    query.unsqueeze(2).to(kv_dtype),  # a 16-bit cache: SDPA in its dtype
                    k_cache[slot, :, : position + 1][None],  # (1, nh, L, hs)
                    v_cache[slot, :, : position + 1][None],
                )  # (1, nh, 1, hs)
            elif store is not None and compiled_attention:
                attended = store.attend(qkv.view(count, -1), index)  # (B, C)
            elif plan is not None:
                attended = plan.attend(query, k_cache, v_cache)  # (B, nh, hs)
            else:
                attended = F.scaled_dot_product_attention(
                    query.unsqueeze(2).to(kv_dtype),
                    k_cache[read, :, :context],  # (B, nh, L, hs)
                    v_cache[read, :, :context],
                    attn_mask=mask,
                )  # (B, nh, 1, hs)
            x = x + layer.out(attended.reshape(count, width).to(x.dtype))
            x = x + self._mlp(layer, x, width)
        return self.head(F.layer_norm(x, (width,), *self.ln_f))  # (B, vocab)

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor, width: int) -> torch.Tensor:
        hidden = F.layer_norm(x, (width,), *layer.ln_2)
        return layer.down(layer.up(hidden))

    def several(
        self, cache: KVCache, token_ids: list[int], slot: int, position: int
    ) -> torch.Tensor:
        """Logits (T, vocab) after feeding T tokens of one slot at positions position, ...:
        speculative decoding's check of its guesses, as lean as a decode step. Not for
        batch-invariant models (its attention is the plain kind): the runner checks their
        guesses through the model's cached forward."""
        assert not self.invariant, "batch-invariant guesses go through forward_cached"
        count = len(token_ids)
        compiled = self._native_for(cache, count)
        if compiled is not None:
            return compiled(
                cache, token_ids, [slot] * count, list(range(position, position + count))
            )
        device = self.wte.device
        config = self.model.config
        width, num_heads, head_dim = config.n_embd, config.n_head, config.head_dim
        end = position + count
        where = torch.arange(position, end, device=device)
        x = self.wte[torch.tensor(token_ids, device=device)] + self.wpe[where]  # (T, C)
        keys_at = torch.arange(end, device=device)
        mask = keys_at[None, :] <= where[:, None]  # (T, L): causal within the new tokens
        for index, layer in enumerate(self.layers):
            hidden = F.layer_norm(x, (width,), *layer.ln_1)
            qkv = layer.qkv(hidden).view(count, 3, num_heads, head_dim)
            query, key, value = qkv.unbind(1)  # each (T, nh, hs)
            k_cache, v_cache = cache.k[index], cache.v[index]  # (S, nh, M, hs)
            k_cache[slot, :, position:end] = key.transpose(0, 1).to(k_cache.dtype)
            v_cache[slot, :, position:end] = value.transpose(0, 1).to(v_cache.dtype)
            attended = F.scaled_dot_product_attention(
                query.transpose(0, 1)[None].to(k_cache.dtype),
                k_cache[slot, :, :end][None],
                v_cache[slot, :, :end][None],
                attn_mask=mask,
            )  # (1, nh, T, hs)
            x = x + layer.out(attended[0].transpose(0, 1).reshape(count, width).to(x.dtype))
            x = x + self._mlp(layer, x, width)
        return self.head(F.layer_norm(x, (width,), *self.ln_f))  # (T, vocab)


def _up_projection(
    module: nn.Module, compiled: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> gelu(module(x)), tanh approximation: fused into the kernel where the layer offers
    that (`PackedLinear.forward_gelu`), else the layer's direct forward and then the GELU, in
    place on its output through the compiled library where that loads (model.native_decode) and
    `compiled` allows it (not for batch-invariant models: their prompts' bits)."""
    fused = getattr(module, "forward_gelu", None)
    if fused is not None:
        return fused
    linear = direct_forward(module)
    gelu = compiled_gelu() if compiled else None
    if gelu is not None:
        in_place = gelu

        def up_compiled(x: torch.Tensor) -> torch.Tensor:
            return in_place(linear(x))

        return up_compiled

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(linear(x), approximate="tanh")

    return up


def key_window(
    slots: list[int], positions: list[int], start: int, device: torch.device
) -> tuple[slice | torch.Tensor, int, torch.Tensor]:
    """Rows' keys in [start, end): how to read their slots (a view when they are consecutive,
    else an index), `end`, and the (R, 1, 1, L) mask of the keys each row attends to."""
    end = max(positions) + 1
    where = torch.tensor(positions, device=device)
    keys_at = torch.arange(start, end, device=device)
    mask = (keys_at[None, :] <= where[:, None])[:, None, None, :]
    first = slots[0]
    if slots == list(range(first, first + len(slots))):
        return slice(first, first + len(slots)), end, mask
    return torch.tensor(slots, device=device), end, mask


class _SharedPlan:
    """One decode step's attention with shared prefixes, laid out once for all layers: each
    group's queries score its prefix (one slot's keys) and then each row's own suffix, under
    one softmax; the rows in no group attend as usual."""

    def __init__(
        self,
        slots: list[int],
        positions: list[int],
        shared: Sequence[SharedPrefix],
        device: torch.device,
    ) -> None:
        grouped = {row for group in shared for row in group.rows}
        rest = [row for row in range(len(slots)) if row not in grouped]
        self.rest = self._part(rest, slots, positions, 0, device) if rest else None
        self.groups = [
            (
                group.slot,
                group.length,
                self._part(group.rows, slots, positions, group.length, device),
            )
            for group in shared
        ]

    @staticmethod
    def _part(
        rows: Sequence[int],
        slots: list[int],
        positions: list[int],
        start: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, slice | torch.Tensor, int, torch.Tensor]:
        """Rows' index, then their key window from `start` (see key_window)."""
        window = key_window([slots[r] for r in rows], [positions[r] for r in rows], start, device)
        return (torch.tensor(rows, device=device), *window)

    def attend(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """(B, nh, hs) queries -> (B, nh, hs) attended values, for one layer's cache."""
        out = torch.empty_like(query)
        if self.rest is not None:
            rows, read, end, mask = self.rest
            out[rows] = (
                F.scaled_dot_product_attention(
                    query[rows].unsqueeze(2).to(k_cache.dtype),
                    k_cache[read, :, :end],
                    v_cache[read, :, :end],
                    attn_mask=mask,
                )
                .squeeze(2)
                .to(query.dtype)
            )
        scale = 1.0 / math.sqrt(query.shape[-1])
        dtype = query.dtype  # a 16-bit cache's keys and values are widened to it here
        for slot, length, (rows, read, end, mask) in self.groups:
            q = query[rows]  # (R, nh, hs)
            prefix_keys = k_cache[slot, :, :length].to(dtype)  # (nh, P, hs)
            prefix_scores = torch.matmul(q.transpose(0, 1), prefix_keys.mT)
            own_keys = k_cache[read, :, length:end].to(dtype)  # (R, nh, L, hs)
            own_scores = torch.matmul(q.unsqueeze(2), own_keys.mT).squeeze(2)  # (R, nh, L)
            own_scores = own_scores.masked_fill(~mask[:, 0], float("-inf"))
            scores = torch.cat([prefix_scores.transpose(0, 1), own_scores], dim=2) * scale
            weights = torch.softmax(scores, dim=-1)  # (R, nh, P + L)
            attended = torch.matmul(
                weights[:, :, :length].transpose(0, 1), v_cache[slot, :, :length].to(dtype)
            ).transpose(0, 1)  # (R, nh, hs)
            attended += torch.matmul(
                weights[:, :, length:].unsqueeze(2), v_cache[read, :, length:end].to(dtype)
            ).squeeze(2)
            out[rows] = attended
        return out
