"""The GPT-2 architecture, with parameter names that match the published checkpoints.

Two ways to run it: `forward` over whole sequences (training, tests) and `forward_cached`
over a batch of rows that each belong to a KV-cache slot and sit at their own position
(prefill of prompts of different lengths, and single-token decode), as the serving engine does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.batch_invariant import InvariantAttention
from model.config import GPTConfig
from model.kv_cache import BatchLayout, KVCache


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, config: GPTConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.batch_invariant = False  # per-query attention (see model.batch_invariant)

    def forward(
        self,
        x: torch.Tensor,
        layer: int = 0,
        cache: KVCache | None = None,
        layout: BatchLayout | None = None,
        per_query: InvariantAttention | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        v = v.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        # SDPA scales scores by 1/sqrt(hs), as GPT-2 does.
        if cache is None or layout is None:
            y = F.scaled_dot_product_attention(
                q,
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, nh, T, hs)
        else:
            k_cache, v_cache = cache.k[layer], cache.v[layer]  # (S, nh, M, hs)
            # Only real tokens are written, so padding never overwrites a neighbour's entry.
            rows, cols = layout.write_rows, layout.write_cols
            # (N, nh, hs), stored in the cache's dtype (a 16-bit cache rounds them)
            k_cache[layout.write_slots, :, layout.write_pos] = k[rows, cols].to(k_cache.dtype)
            v_cache[layout.write_slots, :, layout.write_pos] = v[rows, cols].to(v_cache.dtype)
            if per_query is not None:  # batch-invariant: laid out by GPT.hidden_cached
                y = per_query(q, k_cache, v_cache)
            else:
                keys = k_cache[layout.read_slots, :, : layout.context_len]  # (B, nh, Lc, hs)
                values = v_cache[layout.read_slots, :, : layout.context_len]  # (B, nh, Lc, hs)
                y = F.scaled_dot_product_attention(
                    q.to(keys.dtype), keys, values, attn_mask=layout.attn_mask
                ).to(q.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads concatenated
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: 4x expansion, tanh-approximated GELU, projection back."""

    def __init__(self, config: GPTConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = getattr(self.c_fc, "forward_gelu", None)  # a packed CPU linear fuses the GELU
        h = up(x) if up else F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, dropout)

    def forward(
        self,
        x: torch.Tensor,
        layer: int = 0,
        cache: KVCache | None = None,
        layout: BatchLayout | None = None,
        per_query: InvariantAttention | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache, layout, per_query)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Embeddings, blocks and final LayerNorm, named as in the published checkpoints."""

    def __init__(self, config: GPTConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(config, dropout) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    @property
    def blocks(self) -> list[Block]:
        """The blocks, typed."""
        return [block for block in self.h if isinstance(block, Block)]


class GPT(nn.Module):
    """GPT-2 language model with its head tied to the token embedding."""

    def __init__(self, config: GPTConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating-point type."""
        return self.transformer.wte.weight.dtype

    def tie_weights(self) -> None:
        """Make the head share the token embedding's parameter (also after loading)."""
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> GPT:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * residual_std)
            elif name.endswith(".weight") and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "ln_" in name and name.endswith(".weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        return self

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tok = self.transformer.wte(idx)  # (B, T, C)
        pos = self.transformer.wpe(positions)  # (B, T, C) or (T, C)
        return self.transformer.drop(tok + pos)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Full-sequence forward without a cache: idx (B, T) -> logits (B, T, vocab)."""
        seq_len = idx.shape[1]
        if seq_len > self.config.block_size:
            raise ValueError(
                f"sequence of {seq_len} tokens exceeds {self.config.block_size} positions"
            )
        x = self._embed(idx, torch.arange(seq_len, device=idx.device))  # (B, T, C)
        for block in self.transformer.blocks:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)

    def hidden_cached(self, idx: torch.Tensor, cache: KVCache, layout: BatchLayout) -> torch.Tensor:
        """Run new tokens of several cache slots at once, reading and extending the cache.

        idx (B, T) holds each row's new tokens left-aligned (padding after them is ignored).
        Returns the final LayerNorm's output for every column (B, T, C); `logits` turns the
        columns that are needed into logits.
        """
        x = self._embed(idx, layout.positions)  # (B, T, C)
        blocks = self.transformer.blocks
        per_query = None
        if blocks and blocks[0].attn.batch_invariant and layout.row_slots is not None:
            positions = layout.row_positions or []  # laid out once, used by every layer
            per_query = InvariantAttention(layout.row_slots, positions, cache.max_seq_len, x.device)
        for layer, block in enumerate(blocks):
            x = block(x, layer, cache, layout, per_query)
        return self.transformer.ln_f(x)  # (B, T, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head: final hidden states (..., C) -> logits (..., vocab)."""
        return self.lm_head(hidden)

    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        layout: BatchLayout,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """`hidden_cached`, then the logits of each row's last real token (B, vocab), or of
        every column (B, T, vocab) with `all_logits`."""
        x = self.hidden_cached(idx, cache, layout)  # (B, T, C)
        if not all_logits:
            x = x[torch.arange(x.shape[0], device=x.device), layout.last_index]  # (B, C)
        return self.lm_head(x)  # (B, vocab) or (B, T, vocab)
