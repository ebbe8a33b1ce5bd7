"""A reference generation loop: one prompt, the KV cache, the batched sampler with one row.

The serving engine does the same for many requests at once; this loop is the plain version
that tests compare the engine (and `transformers`) against, and that scripts can use directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.gpt2 import GPT
from model.kv_cache import BatchLayout, KVCache
from model.sampling import SamplingParams, SamplingState, sample


@torch.no_grad()
def generate(
    model: GPT,
    prompt_token_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Generate up to `max_new_tokens` after the prompt; stops after `eos_token_id` if given."""
    params = params if params is not None else SamplingParams(temperature=0.0)
    prompt = list(prompt_token_ids)
    total = len(prompt) + max_new_tokens
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 1 or total > model.config.block_size:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) must fit the "
            f"model's {model.config.block_size} positions, with max_new_tokens >= 1"
        )
    device, dtype = model.device, model.dtype
    cache = KVCache(model.config, num_slots=1, max_seq_len=total, device=device, dtype=dtype)
    state = SamplingState.create(params, model.config.vocab_size, prompt, device)

    output: list[int] = []
    new_tokens = prompt
    while len(output) < max_new_tokens:
        start = len(prompt) + len(output) - len(new_tokens)
        layout = BatchLayout.build([0], [start], [len(new_tokens)], total, device)
        idx = torch.tensor([new_tokens], dtype=torch.long, device=device)  # (1, T)
        logits = model.forward_cached(idx, cache, layout)  # (1, vocab)
        token = int(sample(logits, [state]).token_ids[0])
        state.record(token)
        output.append(token)
        if token == eos_token_id:
            break
        new_tokens = [token]
    return output
