"""The fast decode path: the single-token step through `torch.compile`, eager as the fallback.

On CUDA the compile uses `mode="reduce-overhead"` (CUDA graphs), which removes most of the
per-kernel launch cost that dominates a small model's decode step; on CPU it is plain inductor
code. Shapes are made few on purpose: keys are read in multiples of CONTEXT_MULTIPLE positions
and slots always by index, so the step specialises on the batch size and little else. If
compiling or running the compiled step fails, the runner goes back to the eager step for good.

Status: checked on CPU only (same greedy tokens as eager). On CPU it is no faster than eager and
still recompiles for a few shapes under traffic (a batch of one, the full-window key length);
it is meant for CUDA, where it has not yet been run or measured.
"""

from __future__ import annotations

import logging

import torch

from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache

logger = logging.getLogger(__name__)

CONTEXT_MULTIPLE = 64


class CompiledDecode:
    """Calls the compiled `forward_cached` for decode steps, falling back to eager on error."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        self._compiled = torch.compile(model.forward_cached, dynamic=True, mode=mode)
        self.is_active = True

    def __call__(self, idx: torch.Tensor, cache: KVCache, layout: BatchLayout) -> torch.Tensor:
        """Logits (B, vocab) of one decode step, as `GPT.forward_cached` computes them."""
        if self.is_active:
            try:
                return self._compiled(idx, cache, layout)
            except Exception:  # cache writes are idempotent, so the eager rerun is exact
                logger.exception("compiled decode step failed; using the eager step from now on")
                self.is_active = False
        return self.model.forward_cached(idx, cache, layout)
