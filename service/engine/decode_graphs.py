"""The fast decode path: the single-token step at a few fixed shapes, replayed as CUDA graphs.

A small model's decode step on a GPU is bound by launching its few hundred kernels, not by
their work. Here the step runs at fixed shapes only: the batch is padded up to a bucket
(1, 2, 4, 8, ... up to the largest batch), and keys are read up to a context bucket (64, 128,
256, ... up to the context window). Every (batch, context) pair is captured once at warm-up as
a CUDA graph that reads its inputs from static buffers; a step copies its token ids, slots and
positions into those buffers (one host-to-device copy) and replays the graph.

Padding rows feed token 0 at position 0 of a scratch slot that no request owns (the cache
holds one slot more than the batch), so they never touch a real request's keys and values.

Without capture (on the CPU, or when capturing fails) the same padded step runs eagerly, which
is how the bucketing and padding are tested on machines without a GPU. If capturing or replaying
fails, the runner goes back to the plain eager step for good. Part of the runner: only
`runner.py` uses it.
"""

from __future__ import annotations

import logging

import torch

from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache

logger = logging.getLogger(__name__)

MIN_CONTEXT_BUCKET = 64


def doubling_buckets(smallest: int, largest: int) -> list[int]:
    """`smallest`, doubling while below `largest`, then `largest` itself."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


def batch_buckets(max_batch_size: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, ... below `max_batch_size`, then `max_batch_size`."""
    return doubling_buckets(1, max_batch_size)


def context_buckets(max_model_len: int, smallest: int = MIN_CONTEXT_BUCKET) -> list[int]:
    """Key lengths read: `smallest` doubling below the context window, then the window."""
    return doubling_buckets(smallest, max_model_len)


def bucket_for(value: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `value`."""
    for bucket in buckets:
        if value <= bucket:
            return bucket
    raise ValueError(f"{value} is larger than the largest bucket {buckets[-1]}")


class DecodeGraphs:
    """Decode steps at bucketed shapes from static buffers, as CUDA graphs where possible."""

    def __init__(
        self,
        model: GPT,
        cache: KVCache,
        scratch_slot: int,
        max_batch_size: int,
        max_model_len: int,
        *,
        use_cuda_graphs: bool | None = None,
        smallest_context: int = MIN_CONTEXT_BUCKET,
    ) -> None:
        if not 0 <= scratch_slot < cache.num_slots:
            raise ValueError(f"scratch slot {scratch_slot} is not in the cache")
        self.model = model
        self.cache = cache
        self.scratch_slot = scratch_slot
        self.batch_sizes = batch_buckets(max_batch_size)
        self.context_lens = context_buckets(max_model_len, smallest_context)
        device = model.device
        self.use_cuda_graphs = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.is_active = True
        biggest = self.batch_sizes[-1]
        # One buffer for what changes every step: token ids, slots and positions (3, B).
        self._inputs = torch.zeros((3, biggest), dtype=torch.long, device=device)
        self._key_positions = torch.arange(self.context_lens[-1], device=device)
        self._masks = {
            c: torch.zeros((biggest, c), dtype=torch.bool, device=device) for c in self.context_lens
        }
        self._logits = torch.zeros(
            (biggest, model.config.vocab_size), dtype=model.dtype, device=device
        )
        self._row_index = torch.arange(biggest, device=device)
        self._zeros = torch.zeros(biggest, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far."""
        return len(self._graphs)

    def _layout(self, batch: int, context: int) -> BatchLayout:
        """The batch layout of a padded step: views of the static buffers."""
        slots, positions = self._inputs[1, :batch], self._inputs[2, :batch]
        return BatchLayout(
            positions=positions[:, None],
            write_rows=self._row_index[:batch],
            write_cols=self._zeros[:batch],
            write_slots=slots,
            write_pos=positions,
            read_slots=slots,
            context_len=context,
            attn_mask=self._masks[context][:batch, None, None, :],
            last_index=self._zeros[:batch],
        )

    def _forward(self, batch: int, context: int) -> torch.Tensor:
        """The work a graph captures: the mask from the positions, then the model."""
        positions = self._inputs[2, :batch, None]  # (b, 1)
        torch.le(self._key_positions[:context], positions, out=self._masks[context][:batch])
        idx = self._inputs[0, :batch, None]  # (b, 1)
        return self.model.forward_cached(idx, self.cache, self._layout(batch, context))

    def _forward_into_buffer(self, batch: int, context: int) -> None:
        self._logits[:batch].copy_(self._forward(batch, context))

    def _fill(
        self, token_ids: list[int], slots: list[int], positions: list[int], batch: int
    ) -> None:
        """Copy a step's rows into the static buffers, padding rows up to `batch`."""
        if len(set(slots)) != len(slots) or self.scratch_slot in slots:
            raise ValueError(f"decode rows need distinct slots other than the scratch one: {slots}")
        pad = batch - len(token_ids)
        host = torch.tensor(
            [
                token_ids + [0] * pad,
                slots + [self.scratch_slot] * pad,
                positions + [0] * pad,
            ],
            dtype=torch.long,
        )
        self._inputs[:, :batch].copy_(host, non_blocking=False)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (batch, context) bucket as a CUDA graph; a no-op without CUDA graphs.

        Largest first, all in one memory pool, so the smaller graphs reuse the larger ones'
        memory. On failure the fast path turns itself off and the eager step is used.
        """
        if not self.use_cuda_graphs or not self.is_active or self._graphs:
            return
        try:
            torch.cuda.synchronize()
            pool = torch.cuda.graph_pool_handle()
            # Filling, the eager run and the capture all go on one side stream, in order, so
            # per-stream library state (cuBLAS workspaces) exists before capturing begins.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            for context in reversed(self.context_lens):
                for batch in reversed(self.batch_sizes):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.stream(stream):
                        self._fill([], [], [], batch)  # every row a padding row
                        self._forward_into_buffer(batch, context)
                    # thread_local: the HTTP thread may run while this one captures.
                    with torch.cuda.graph(
                        graph, pool=pool, stream=stream, capture_error_mode="thread_local"
                    ):
                        self._forward_into_buffer(batch, context)
                    self._graphs[(batch, context)] = graph
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            logger.info(
                "captured %d decode CUDA graphs (batch %s x keys %s)",
                len(self._graphs),
                self.batch_sizes,
                self.context_lens,
            )
        except Exception:
            logger.exception("capturing the decode CUDA graphs failed; decoding eagerly")
            self._graphs.clear()
            self.is_active = False

    @torch.inference_mode()
    def __call__(
        self, token_ids: list[int], slots: list[int], positions: list[int]
    ) -> torch.Tensor:
        """Logits (len(token_ids), vocab) of one decode step: row i feeds token_ids[i] at
        positions[i] of slots[i]."""
        count = len(token_ids)
        batch = bucket_for(count, self.batch_sizes)
        context = bucket_for(max(positions) + 1, self.context_lens)
        self._fill(token_ids, slots, positions, batch)
        graph = self._graphs.get((batch, context))
        if graph is not None:
            try:
                graph.replay()
                return self._logits[:count].clone()  # the next replay overwrites the buffer
            except Exception:  # cache writes are idempotent, so the eager rerun is exact
                logger.exception("replaying a decode CUDA graph failed; decoding eagerly")
                self._graphs.clear()
                self.is_active = False
        return self._forward(batch, context)[:count]
