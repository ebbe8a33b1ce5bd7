"""The one place tensors are built: batches in, plain token ids out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.sampling import sample
from service.engine.decode_graphs import DecodeGraphs
from service.engine.request import Request
from service.engine.scheduler import SchedulerOutput


@dataclass
class SampledToken:
    """What the runner hands back for one row: a token id and, when asked, log-probabilities."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None


class ModelRunner:
    """Owns the model and its KV cache; runs prompt chunks and decode steps and samples."""

    def __init__(
        self,
        model: GPT,
        num_slots: int,
        max_model_len: int,
        vocab_size: int | None = None,
        eos_token_id: int | None = None,
        fast_decode: bool = False,
    ) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        # A checkpoint may pad its vocabulary (nanoGPT's 50304): never sample the padding.
        self.vocab_size = vocab_size or model.config.vocab_size
        # The fast path pads batches with rows that write to a scratch slot nobody owns.
        cache_slots = num_slots + 1 if fast_decode else num_slots
        self.cache = KVCache(model.config, cache_slots, max_model_len, self.device, self.dtype)
        self._generators: dict[str, torch.Generator] = {}
        self.decode_graphs = (
            DecodeGraphs(model, self.cache, num_slots, num_slots, max_model_len)
            if fast_decode
            else None
        )

    def capture_decode_graphs(self) -> None:
        """Capture the fast path's CUDA graphs (warm-up does this once, on the engine thread)."""
        if self.decode_graphs is not None:
            self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, work: SchedulerOutput) -> dict[str, SampledToken]:
        """Run one step; returns a sampled token for each request that produced one."""
        sampled_rows: list[Request] = []
        logits_parts: list[torch.Tensor] = []
        if work.prefills:
            logits = self._run_prefill(work)
            keep = [i for i, chunk in enumerate(work.prefills) if chunk.completes_prompt]
            if keep:
                logits_parts.append(logits[keep])
                sampled_rows.extend(work.prefills[i].request for i in keep)
        if work.decodes:
            logits_parts.append(self._run_decode(work.decodes))
            sampled_rows.extend(work.decodes)
        if not sampled_rows:
            return {}
        logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        return self._sample(sampled_rows, logits)

    def _run_prefill(self, work: SchedulerOutput) -> torch.Tensor:
        chunks = work.prefills
        width = max(chunk.length for chunk in chunks)
        rows = [
            chunk.request.prompt_token_ids[chunk.start : chunk.start + chunk.length]
            + [0] * (width - chunk.length)
            for chunk in chunks
        ]
        layout = BatchLayout.build(
            [chunk.request.slot or 0 for chunk in chunks],
            [chunk.start for chunk in chunks],
            [chunk.length for chunk in chunks],
            self.max_model_len,
            self.device,
        )
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B, T)
        return self.model.forward_cached(idx, self.cache, layout)  # (B, vocab)

    def _run_decode(self, requests: list[Request]) -> torch.Tensor:
        # Each decode row feeds the last sampled token, which is not in the cache yet.
        if self.decode_graphs is not None and self.decode_graphs.is_active:
            return self.decode_graphs(
                [r.token_at(r.num_computed_tokens) for r in requests],
                [r.slot or 0 for r in requests],
                [r.num_computed_tokens for r in requests],
            )
        order = sorted(range(len(requests)), key=lambda i: requests[i].slot or 0)
        ordered = [requests[i] for i in order]  # by slot, so the rows' cache is often one view
        layout = BatchLayout.build(
            [r.slot or 0 for r in ordered],
            [r.num_computed_tokens for r in ordered],
            [1] * len(ordered),
            self.max_model_len,
            self.device,
        )
        idx = torch.tensor(
            [[r.token_at(r.num_computed_tokens)] for r in ordered],
            dtype=torch.long,
            device=self.device,
        )  # (B, 1)
        logits = self.model.forward_cached(idx, self.cache, layout)  # (B, vocab), in slot order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return logits[inverse.to(self.device)]

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> dict[str, SampledToken]:
        logits = logits.float()
        if self.vocab_size < logits.shape[-1]:
            logits[:, self.vocab_size :] = float("-inf")
        for row, request in enumerate(requests):
            # Before min_tokens, end-of-text and stop tokens cannot be chosen at all.
            if request.num_output_tokens < request.stop.min_tokens:
                banned = list(request.stop.stop_token_ids)
                if self.eos_token_id is not None and not request.stop.ignore_eos:
                    banned.append(self.eos_token_id)
                if banned:
                    logits[row, banned] = float("-inf")
        result = sample(
            logits,
            [r.sampling for r in requests],
            [self._generator(r) for r in requests],
            [r.output_token_ids for r in requests],
            [r.prompt_token_ids for r in requests],
        )
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        out: dict[str, SampledToken] = {}
        for row, request in enumerate(requests):
            top = None
            wanted = request.sampling.logprobs
            if wanted and top_ids is not None and top_lps is not None:
                top = list(zip(top_ids[row][:wanted], top_lps[row][:wanted], strict=True))
            out[request.request_id] = SampledToken(token_ids[row], logprobs[row], top)
        return out

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = generator
        return generator

    def release(self, request_id: str) -> None:
        """Forget a finished request's per-request state (its random generator)."""
        self._generators.pop(request_id, None)
