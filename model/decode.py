"""The decode step, lean: one new token per row, straight through the model's layers.

`GPT.forward_cached` serves every shape (prompt chunks of any length, padding, per-row masks) and
pays for that generality on every call: a batch layout of index tensors, a mask, module calls
and views for each of 12+ layers. A decode step has one token per row, so here the same math runs
with what a single token needs: the rows' keys and values are written in place, a row alone
attends over exactly its own keys (no mask), and every layer's modules are called directly. At
one stream on a CPU, where a step reads the weights once and should take no longer than that,
this takes ~3 ms of overhead off a ~25 ms step (gpt2, float32). The layers themselves (packed,
int8 or plain linears) are the model's own, so every weight path goes through here unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.gpt2 import GPT
from model.kv_cache import KVCache


@dataclass(frozen=True)
class _Layer:
    """One block's parameters and linear layers, looked up once."""

    ln_1: tuple[torch.Tensor, torch.Tensor, float]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]
    ln_2: tuple[torch.Tensor, torch.Tensor, float]
    up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


class DecodeStep:
    """The lean decode step of one model; build it after the model's layers are final (packed,
    quantized), since it holds on to them."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        transformer = model.transformer

        def norm(module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
            return module.weight, module.bias, module.eps

        self.layers = [
            _Layer(
                norm(block.ln_1),
                block.attn.c_attn.forward,
                block.attn.c_proj.forward,
                norm(block.ln_2),
                block.mlp.c_fc.forward,
                block.mlp.c_proj.forward,
            )
            for block in transformer.blocks
        ]
        self.wte, self.wpe = transformer.wte.weight, transformer.wpe.weight
        self.ln_f = norm(transformer.ln_f)
        self.head = model.lm_head.forward

    def __call__(
        self, cache: KVCache, token_ids: list[int], slots: list[int], positions: list[int]
    ) -> torch.Tensor:
        """Logits (B, vocab) after feeding token_ids[b] at positions[b] of cache slot slots[b].

        Each row's key and value are written to the cache before it attends, as in
        forward_cached.
        """
        count = len(token_ids)
        device = self.wte.device
        config = self.model.config
        width, num_heads, head_dim = config.n_embd, config.n_head, config.head_dim
        tokens = torch.tensor(token_ids, device=device)
        where = torch.tensor(positions, device=device)
        x = self.wte[tokens] + self.wpe[where]  # (B, C)
        if count == 1:
            slot, position = slots[0], positions[0]
            mask = None
        else:
            slot_index = torch.tensor(slots, device=device)
            context = max(positions) + 1
            keys_at = torch.arange(context, device=device)
            mask = (keys_at[None, :] <= where[:, None])[:, None, None, :]  # (B, 1, 1, L)
            first = slots[0]
            consecutive = slots == list(range(first, first + count))
            read: slice | torch.Tensor = slice(first, first + count) if consecutive else slot_index
        for index, layer in enumerate(self.layers):
            hidden = F.layer_norm(x, (width,), *layer.ln_1)
            qkv = layer.qkv(hidden).view(count, 3, num_heads, head_dim)
            query, key, value = qkv.unbind(1)  # each (B, nh, hs)
            k_cache, v_cache = cache.k[index], cache.v[index]  # (S, nh, M, hs)
            if mask is None:
                k_cache[slot, :, position] = key[0]
                v_cache[slot, :, position] = value[0]
                keys = k_cache[slot, :, : position + 1][None]  # (1, nh, L, hs)
                values = v_cache[slot, :, : position + 1][None]
            else:
                k_cache[slot_index, :, where] = key
                v_cache[slot_index, :, where] = value
                keys = k_cache[read, :, :context]  # (B, nh, L, hs)
                values = v_cache[read, :, :context]
            attended = F.scaled_dot_product_attention(
                query.unsqueeze(2), keys, values, attn_mask=mask
            )  # (B, nh, 1, hs)
            x = x + layer.out(attended.reshape(count, width))
            hidden = F.layer_norm(x, (width,), *layer.ln_2)
            x = x + layer.down(F.gelu(layer.up(hidden), approximate="tanh"))
        return self.head(F.layer_norm(x, (width,), *self.ln_f))  # (B, vocab)

    def several(
        self, cache: KVCache, token_ids: list[int], slot: int, position: int
    ) -> torch.Tensor:
        """Logits (T, vocab) after feeding T tokens of one slot at positions position, ...:
        speculative decoding's check of its guesses, as lean as a decode step."""
        count = len(token_ids)
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
            k_cache[slot, :, position:end] = key.transpose(0, 1)
            v_cache[slot, :, position:end] = value.transpose(0, 1)
            attended = F.scaled_dot_product_attention(
                query.transpose(0, 1)[None],
                k_cache[slot, :, :end][None],
                v_cache[slot, :, :end][None],
                attn_mask=mask,
            )  # (1, nh, T, hs)
            x = x + layer.out(attended[0].transpose(0, 1).reshape(count, width))
            hidden = F.layer_norm(x, (width,), *layer.ln_2)
            x = x + layer.down(F.gelu(layer.up(hidden), approximate="tanh"))
        return self.head(F.layer_norm(x, (width,), *self.ln_f))  # (T, vocab)
